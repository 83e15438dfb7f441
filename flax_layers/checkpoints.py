"""Hugging Face checkpoints of one MoE block -> ``FusedMoE`` arguments and parameters.

Five families, with the key names of their published checkpoints (``prefix`` is the block's, e.g.
``block_prefix("mixtral", 3) == "model.layers.3.block_sparse_moe."``):

=============  ==============================================================================
family         keys under the prefix (HF ``nn.Linear`` weights are [out, in])
=============  ==============================================================================
mixtral        ``gate.weight``; ``experts.{i}.w1/w3/w2.weight`` (gate, up, down)
qwen2_moe      ``gate.weight``; ``experts.{i}.gate_proj/up_proj/down_proj.weight``;
               ``shared_expert.gate_proj/up_proj/down_proj.weight``; ``shared_expert_gate.weight``
qwen3_moe      ``gate.weight``; ``experts.{i}.gate_proj/up_proj/down_proj.weight``
deepseek_v3    ``gate.weight``, ``gate.e_score_correction_bias``;
               ``experts.{i}.gate_proj/up_proj/down_proj.weight``;
               ``shared_experts.gate_proj/up_proj/down_proj.weight``
gpt_oss        ``router.weight``, ``router.bias``; ``experts.gate_up_proj`` [E, H, 2F] (gate and up
               interleaved), ``experts.gate_up_proj_bias`` [E, 2F], ``experts.down_proj``
               [E, F, H], ``experts.down_proj_bias`` [E, H] (bf16; MXFP4 must be dequantized)
=============  ==============================================================================

A shared expert wider than the routed ones becomes several shared experts of their width
(``jax_moe.split_shared_expert``).

Example (NNX)::

    config = json.load(open(f"{path}/config.json"))
    layer = FusedMoE(**layer_kwargs("qwen3_moe", config), rngs=nnx.Rngs(0))
    tensors = read_safetensors(glob.glob(f"{path}/*.safetensors"), block_prefix("qwen3_moe", 0))
    load_block(layer, "qwen3_moe", tensors, config, prefix=block_prefix("qwen3_moe", 0))
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
from flax import nnx

import jax_moe

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
GPT_OSS_ALPHA = 1.702  # fixed in gpt-oss's modelling code, not in its config


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def block_prefix(family: str, layer: int) -> str:
    """Key prefix of decoder layer ``layer``'s MoE block in the family's checkpoints."""
    _check_family(family)
    return f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}."


def layer_kwargs(family: str, config: Mapping) -> dict:
    """``FusedMoE`` constructor arguments for a Hugging Face ``config.json`` of the family."""
    _check_family(family)
    hidden = config["hidden_size"]
    if family in ("mixtral", "gpt_oss"):
        intermediate, num_experts = config["intermediate_size"], config["num_local_experts"]
        routing = jax_moe.Routing(top_k=config["num_experts_per_tok"])
    elif family in ("qwen2_moe", "qwen3_moe"):
        intermediate, num_experts = config["moe_intermediate_size"], config["num_experts"]
        routing = jax_moe.Routing(
            top_k=config["num_experts_per_tok"], renormalize=bool(config.get("norm_topk_prob", False))
        )
    else:
        intermediate, num_experts = config["moe_intermediate_size"], config["n_routed_experts"]
        routing = jax_moe.Routing(
            top_k=config["num_experts_per_tok"], renormalize=bool(config.get("norm_topk_prob", True)),
            scoring=config.get("scoring_func", "sigmoid"), num_groups=config.get("n_group", 1),
            top_groups=config.get("topk_group", 1),
            routed_scaling_factor=float(config.get("routed_scaling_factor", 1.0)),
        )
    kwargs = dict(hidden_size=hidden, intermediate_size=intermediate, num_experts=num_experts, routing=routing)
    if family == "deepseek_v3":
        kwargs["use_selection_bias"] = config.get("topk_method", "noaux_tc") == "noaux_tc"
        kwargs["num_shared_experts"] = config.get("n_shared_experts", 0) or 0
    if family == "qwen2_moe":
        kwargs["num_shared_experts"] = math.ceil(config["shared_expert_intermediate_size"] / intermediate)
        kwargs["use_shared_expert_gate"] = True
    if family == "gpt_oss":
        kwargs.update(
            activation=jax_moe.Activation("clamped_swiglu", GPT_OSS_ALPHA, float(config.get("swiglu_limit", 7.0))),
            use_router_bias=True, use_expert_bias=True,
        )
    return kwargs


def read_safetensors(files: str | Iterable[str], prefix: str = "") -> dict:
    """The tensors whose names start with ``prefix`` from one or more ``.safetensors`` files (the
    shards of a checkpoint), as JAX arrays in their stored dtype (bf16 included)."""
    from safetensors import safe_open  # optional dependency: the [hf] extra

    tensors = {}
    for file in [files] if isinstance(files, str) else files:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    tensors[name] = f.get_tensor(name)
    return tensors


def _expert_names(family: str) -> tuple[str, str, str]:
    """The gate, up and down projections' names in a per-expert checkpoint."""
    return ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def _stack_experts(tensors: Mapping, prefix: str, num_experts: int, name: str):
    """[E, in, out] from the per-expert [out, in] Linear weights ``experts.{i}.{name}.weight``."""
    return jnp.stack([jnp.asarray(tensors[f"{prefix}experts.{i}.{name}.weight"]).T for i in range(num_experts)])


def convert_block(family: str, tensors: Mapping, config: Mapping, prefix: str = "") -> dict:
    """The layer's parameters ({"gate/kernel": [H, E], "wi_0": [E, H, F], ...}) from the block's
    checkpoint tensors (``tensors`` maps full key names to arrays; extra keys are ignored)."""
    _check_family(family)
    kwargs = layer_kwargs(family, config)
    num_experts, intermediate = kwargs["num_experts"], kwargs["intermediate_size"]
    missing = [k for k in _required_keys(family, prefix, num_experts) if k not in tensors]
    if missing:
        quantized = [k for k in tensors if k.endswith(("_blocks", "_scales"))]
        hint = " (MXFP4-quantized experts: dequantize them first)" if quantized else ""
        raise ValueError(f"{family} checkpoint lacks {len(missing)} keys, e.g. {missing[:3]}{hint}")

    def get(name):
        return jnp.asarray(tensors[prefix + name])

    if family == "gpt_oss":
        gate_up, gate_up_bias = get("experts.gate_up_proj"), get("experts.gate_up_proj_bias")
        return {
            "gate/kernel": get("router.weight").T,
            "gate/bias": get("router.bias"),
            "wi_0": gate_up[..., 0::2],
            "wi_1": gate_up[..., 1::2],
            "wo": get("experts.down_proj"),
            "wi_0_bias": gate_up_bias[..., 0::2],
            "wi_1_bias": gate_up_bias[..., 1::2],
            "wo_bias": get("experts.down_proj_bias"),
        }
    params = {"gate/kernel": get("gate.weight").T}
    for param, name in zip(("wi_0", "wi_1", "wo"), _expert_names(family)):
        params[param] = _stack_experts(tensors, prefix, num_experts, name)
    if family == "deepseek_v3" and kwargs["use_selection_bias"]:
        params["selection_bias"] = get("gate.e_score_correction_bias").astype(jnp.float32)
    shared = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts."}.get(family)
    if shared and kwargs.get("num_shared_experts"):
        params["shared_wi_0"], params["shared_wi_1"], params["shared_wo"] = jax_moe.split_shared_expert(
            get(shared + "gate_proj.weight").T, get(shared + "up_proj.weight").T,
            get(shared + "down_proj.weight").T, intermediate,
        )
    if family == "qwen2_moe":
        params["shared_gate"] = get("shared_expert_gate.weight").reshape(-1)
    return params


def _required_keys(family: str, prefix: str, num_experts: int) -> list[str]:
    if family == "gpt_oss":
        names = ("router.weight", "router.bias", "experts.gate_up_proj", "experts.gate_up_proj_bias",
                 "experts.down_proj", "experts.down_proj_bias")
        return [prefix + n for n in names]
    keys = [f"{prefix}gate.weight"]
    keys += [f"{prefix}experts.{i}.{n}.weight" for i in range(num_experts) for n in _expert_names(family)]
    return keys


def load_block(layer, family: str, tensors: Mapping, config: Mapping, prefix: str = "") -> None:
    """Writes the block's checkpoint weights into an NNX ``FusedMoE`` built from
    ``layer_kwargs(family, config)``, cast to its parameter dtype. Shapes must match exactly."""
    for path, value in convert_block(family, tensors, config, prefix).items():
        owner = layer
        *parents, name = path.split("/")
        for parent in parents:
            owner = getattr(owner, parent)
        variable = getattr(owner, name, None)
        if not isinstance(variable, nnx.Variable):
            raise ValueError(f"the layer has no parameter {path!r} that the {family} checkpoint fills")
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(f"{path}: the layer holds {tuple(variable.shape)}, the checkpoint gives {tuple(value.shape)}")
        variable[...] = value.astype(variable.dtype)


def linen_variables(family: str, tensors: Mapping, config: Mapping, prefix: str = "", param_dtype=jnp.float32) -> dict:
    """The block's weights as variables of ``flax_layers.linen.FusedMoE``:
    ``{"params": {...}}`` plus ``{"routing": {"selection_bias": ...}}`` where it has one."""
    variables = {"params": {}}
    for path, value in convert_block(family, tensors, config, prefix).items():
        if path == "selection_bias":
            variables["routing"] = {"selection_bias": value}
            continue
        *parents, name = path.split("/")
        node = variables["params"]
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value.astype(param_dtype)
    return variables
