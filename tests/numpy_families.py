"""Float64 numpy re-derivations of each family's MoE block, written from its published modelling
code (Hugging Face transformers' Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-V3 / gpt-oss blocks),
reading the checkpoint's own tensors by their key names. Independent of jax_moe: this is what
loading a checkpoint into ``FusedMoE`` must reproduce.

Each block returns ``(out, margin)``: ``margin[t]`` is how far token t's routing decision is from a
tie (the smallest gap at a selection boundary), so a test can set aside the rare tokens whose
experts a float32 rounding could flip.
"""

import numpy as np

from numpy_moe import as_f64


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _softmax(v):
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _linear(x, tensors, key, bias_key=None):
    y = x @ as_f64(tensors[key]).T  # nn.Linear: weight is [out, in]
    return y + as_f64(tensors[bias_key]) if bias_key else y


def _top_k(ranking, k):
    """Ids of the k largest (ties to the lower index) and the gap between the k-th and the next."""
    order = np.argsort(-ranking, axis=-1, kind="stable")
    ids = order[:, :k]
    ranked = np.take_along_axis(ranking, order, axis=-1)
    gap = ranked[:, k - 1] - ranked[:, k] if k < ranking.shape[-1] else np.full(len(ranking), np.inf)
    return ids, gap


def _swiglu_mlp(x, tensors, prefix, names=("gate_proj", "up_proj", "down_proj")):
    gate, up, down = (f"{prefix}{n}.weight" for n in names)
    return _linear(_silu(_linear(x, tensors, gate)) * _linear(x, tensors, up), tensors, down)


def _routed_sum(x, ids, weights, expert_fn):
    out = np.zeros_like(x)
    for e in np.unique(ids):
        tokens, slots = np.nonzero(ids == e)  # a token picks an expert at most once
        out[tokens] += weights[tokens, slots][:, None] * expert_fn(int(e), x[tokens])
    return out


def mixtral_block(x, tensors, prefix, config):
    """MixtralSparseMoeBlock: softmax, top-k, renormalize, w2(silu(w1 x) * w3 x)."""
    x = as_f64(x)
    probs = _softmax(_linear(x, tensors, prefix + "gate.weight"))
    ids, margin = _top_k(probs, config["num_experts_per_tok"])
    weights = np.take_along_axis(probs, ids, axis=-1)
    weights /= weights.sum(axis=-1, keepdims=True)
    expert = lambda e, xt: _swiglu_mlp(xt, tensors, f"{prefix}experts.{e}.", ("w1", "w3", "w2"))
    return _routed_sum(x, ids, weights, expert), margin


def qwen_moe_block(x, tensors, prefix, config):
    """Qwen2MoeSparseMoeBlock / Qwen3MoeSparseMoeBlock: softmax, top-k, optional renormalization;
    Qwen2-MoE adds ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``."""
    x = as_f64(x)
    probs = _softmax(_linear(x, tensors, prefix + "gate.weight"))
    ids, margin = _top_k(probs, config["num_experts_per_tok"])
    weights = np.take_along_axis(probs, ids, axis=-1)
    if config.get("norm_topk_prob", False):
        weights /= weights.sum(axis=-1, keepdims=True)
    expert = lambda e, xt: _swiglu_mlp(xt, tensors, f"{prefix}experts.{e}.")
    out = _routed_sum(x, ids, weights, expert)
    if prefix + "shared_expert.gate_proj.weight" in tensors:
        gate = _sigmoid(_linear(x, tensors, prefix + "shared_expert_gate.weight"))
        out += gate * _swiglu_mlp(x, tensors, prefix + "shared_expert.")
    return out, margin


def family_routing(logits, selection_bias, *, top_k, scoring="softmax", renormalize=True, num_groups=1,
          top_groups=None, routed_scaling_factor=1.0):
    """Routing as DeepSeek-V3's gate generalizes it (softmax or sigmoid scores, selection bias,
    groups scored by their top-2 sum with the others masked to -inf as in DeepSeek's reference code,
    renormalization, scaling): ``(weights, ids, margin)``."""
    logits = as_f64(logits)
    scores = _softmax(logits) if scoring == "softmax" else _sigmoid(logits)
    choice = scores if selection_bias is None else scores + as_f64(selection_bias)
    num_tokens, num_experts = choice.shape
    margin = np.full(num_tokens, np.inf)
    if num_groups > 1:
        grouped = choice.reshape(num_tokens, num_groups, num_experts // num_groups)
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)
        kept_groups, margin = _top_k(group_scores, top_groups or num_groups)
        kept = np.zeros((num_tokens, num_groups), bool)
        np.put_along_axis(kept, kept_groups, True, axis=-1)
        choice = np.where(kept[..., None], grouped, -np.inf).reshape(num_tokens, num_experts)
    ids, expert_margin = _top_k(choice, top_k)
    weights = np.take_along_axis(scores, ids, axis=-1)
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True) + 1e-20
    return weights * routed_scaling_factor, ids, np.minimum(margin, expert_margin)


def deepseek_v3_block(x, tensors, prefix, config):
    """DeepseekV3MoE: sigmoid scores; ``e_score_correction_bias`` for selection; groups scored by
    their top-2 sum, ``topk_group`` kept; weights = chosen unbiased scores, renormalized, times
    ``routed_scaling_factor`` (``route``); plus the shared experts."""
    x = as_f64(x)
    weights, ids, margin = family_routing(
        _linear(x, tensors, prefix + "gate.weight"), tensors[prefix + "gate.e_score_correction_bias"],
        top_k=config["num_experts_per_tok"], scoring="sigmoid",
        renormalize=config.get("norm_topk_prob", True), num_groups=config["n_group"],
        top_groups=config["topk_group"], routed_scaling_factor=config["routed_scaling_factor"],
    )
    expert = lambda e, xt: _swiglu_mlp(xt, tensors, f"{prefix}experts.{e}.")
    out = _routed_sum(x, ids, weights, expert) + _swiglu_mlp(x, tensors, prefix + "shared_experts.")
    return out, margin


def gpt_oss_block(x, tensors, prefix, config):
    """GptOssMLP: router with bias, top-k on the logits, softmax over the k; experts with the
    interleaved gate_up projection (+ bias), clamped SwiGLU, down projection (+ bias)."""
    x = as_f64(x)
    logits = _linear(x, tensors, prefix + "router.weight", prefix + "router.bias")
    ids, margin = _top_k(logits, config["num_experts_per_tok"])
    weights = _softmax(np.take_along_axis(logits, ids, axis=-1))
    alpha, limit = 1.702, config.get("swiglu_limit", 7.0)
    gate_up_w = as_f64(tensors[prefix + "experts.gate_up_proj"])
    gate_up_b = as_f64(tensors[prefix + "experts.gate_up_proj_bias"])
    down_w = as_f64(tensors[prefix + "experts.down_proj"])
    down_b = as_f64(tensors[prefix + "experts.down_proj_bias"])

    def expert(e, xt):
        gate_up = xt @ gate_up_w[e] + gate_up_b[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = np.minimum(gate, limit)
        up = np.clip(up, -limit, limit)
        glu = gate * _sigmoid(gate * alpha)
        return ((up + 1) * glu) @ down_w[e] + down_b[e]

    return _routed_sum(x, ids, weights, expert), margin


BLOCKS = {
    "mixtral": mixtral_block,
    "qwen2_moe": qwen_moe_block,
    "qwen3_moe": qwen_moe_block,
    "deepseek_v3": deepseek_v3_block,
    "gpt_oss": gpt_oss_block,
}


def random_checkpoint(family: str, config: dict, prefix: str, rng: np.random.Generator) -> dict:
    """A random float32 block with the family's checkpoint key names and [out, in] layouts.

    Scales keep activations O(1); gpt-oss's gate/up projections are scaled up so that its clamps
    (limit 7) actually bind on some elements.
    """
    h = config["hidden_size"]

    def normal(shape, fan_in, gain=1.0):
        return (rng.standard_normal(shape) * gain / np.sqrt(fan_in)).astype(np.float32)

    if family == "gpt_oss":
        e, f = config["num_local_experts"], config["intermediate_size"]
        return {
            prefix + "router.weight": normal((e, h), h, 3.0),
            prefix + "router.bias": normal((e,), 1, 0.5),
            prefix + "experts.gate_up_proj": normal((e, h, 2 * f), h, 5.0),
            prefix + "experts.gate_up_proj_bias": normal((e, 2 * f), 1, 1.0),
            prefix + "experts.down_proj": normal((e, f, h), f),
            prefix + "experts.down_proj_bias": normal((e, h), 1, 0.5),
        }
    if family == "mixtral":
        e, f, names = config["num_local_experts"], config["intermediate_size"], ("w1", "w3", "w2")
    elif family == "deepseek_v3":
        e, f, names = config["n_routed_experts"], config["moe_intermediate_size"], ("gate_proj", "up_proj", "down_proj")
    else:
        e, f, names = config["num_experts"], config["moe_intermediate_size"], ("gate_proj", "up_proj", "down_proj")
    tensors = {prefix + "gate.weight": normal((e, h), h, 3.0)}

    def mlp(mlp_prefix, width):
        tensors[f"{mlp_prefix}{names[0]}.weight"] = normal((width, h), h)
        tensors[f"{mlp_prefix}{names[1]}.weight"] = normal((width, h), h)
        tensors[f"{mlp_prefix}{names[2]}.weight"] = normal((h, width), width)

    for i in range(e):
        mlp(f"{prefix}experts.{i}.", f)
    if family == "qwen2_moe":
        mlp(prefix + "shared_expert.", config["shared_expert_intermediate_size"])
        tensors[prefix + "shared_expert_gate.weight"] = normal((1, h), h, 2.0)
    if family == "deepseek_v3":
        mlp(prefix + "shared_experts.", f * config["n_shared_experts"])
        tensors[prefix + "gate.e_score_correction_bias"] = (0.3 * rng.standard_normal(e)).astype(np.float32)
    return tensors
