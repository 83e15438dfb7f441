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
               ``shared_experts.gate_proj/up_proj/down_proj.weight``; fp8 checkpoints add
               ``.weight_scale_inv`` [cdiv(out, 128), cdiv(in, 128)] float32 beside each e4m3
               ``.weight`` (a multiplier, despite the name: DeepSeek-V3's ``weight_dequant``)
gpt_oss        ``router.weight``, ``router.bias``; ``experts.gate_up_proj`` [E, H, 2F] (gate and up
               interleaved), ``experts.gate_up_proj_bias`` [E, 2F], ``experts.down_proj``
               [E, F, H], ``experts.down_proj_bias`` [E, H] (bf16); MXFP4 checkpoints store
               ``experts.gate_up_proj_blocks`` [E, 2F, H/32, 16] and ``experts.down_proj_blocks``
               [E, H, F/32, 16] (uint8, two e2m1 values a byte, low nibble first) with
               ``_scales`` [E, 2F, H/32] and [E, H, F/32] (uint8 e8m0, bias 127) instead
=============  ==============================================================================

Quantized checkpoints (``config["quantization_config"]``: DeepSeek-V3's ``fp8`` with 128 x 128
weight blocks and dynamic activation scales, gpt-oss's ``mxfp4``) load as they are stored: the
layer gets the matching ``jax_moe.Quantization`` (``layer_kwargs``) and ``jax_moe.QuantizedArray``
expert weights, transposed and repacked into the library's [E, K, N] layout (fp8 values and their
block scales transposed; MXFP4 bytes, which pack pairs along K already, moved so that K runs down
the rows), never dequantized.

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
from jax_moe import QuantizedArray

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")
GPT_OSS_ALPHA = 1.702  # fixed in gpt-oss's modelling code, not in its config


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}; got {family!r}")


def block_prefix(family: str, layer: int) -> str:
    """Key prefix of decoder layer ``layer``'s MoE block in the family's checkpoints."""
    _check_family(family)
    return f"model.layers.{layer}.{'block_sparse_moe' if family == 'mixtral' else 'mlp'}."


def checkpoint_quantization(family: str, config: Mapping) -> jax_moe.Quantization | None:
    """The ``jax_moe.Quantization`` of a checkpoint's experts from its ``quantization_config``
    (None without one): DeepSeek-V3's fp8 block scaling (w8a8 with ``activation_scheme:
    "dynamic"``), gpt-oss's MXFP4. Raises ValueError for any other."""
    settings = config.get("quantization_config")
    if not settings:
        return None
    method = settings.get("quant_method")
    if family == "deepseek_v3" and method == "fp8":
        block = tuple(settings.get("weight_block_size", (128, 128)))
        if len(block) != 2 or block[0] != block[1]:
            raise ValueError(f"deepseek_v3: weight_block_size must be square, e.g. [128, 128]; got {list(block)}")
        activations = "fp8" if settings.get("activation_scheme", "dynamic") == "dynamic" else "weight"
        return jax_moe.Quantization("fp8", "block", block_size=int(block[0]), activations=activations)
    if family == "gpt_oss" and method == "mxfp4":
        return jax_moe.Quantization("mxfp4")
    raise ValueError(
        f"{family}: quantization_config with quant_method {method!r} is not supported; the loaders read "
        f"deepseek_v3 'fp8' and gpt_oss 'mxfp4' checkpoints"
    )


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
    quantization = checkpoint_quantization(family, config)
    if quantization is not None:
        kwargs["quantization"] = quantization
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


def _stack_experts(tensors: Mapping, prefix: str, num_experts: int, name: str, quantization=None):
    """[E, in, out] from the per-expert [out, in] Linear weights ``experts.{i}.{name}.weight``;
    with fp8 block ``quantization`` a ``QuantizedArray`` of the e4m3 weights and their
    ``weight_scale_inv`` blocks, both transposed."""
    keys = [f"{prefix}experts.{i}.{name}.weight" for i in range(num_experts)]
    values = jnp.stack([jnp.asarray(tensors[key]).T for key in keys])
    if quantization is None:
        return values
    scales = jnp.stack([jnp.asarray(tensors[key + "_scale_inv"]).T for key in keys])
    return QuantizedArray(values, scales.astype(jnp.float32), None, quantization, values.shape)


def _fp8_matrix(tensors: Mapping, key: str, quantization):
    """One [in, out] weight of the x @ w layout from an [out, in] Linear weight, quantized as
    ``experts`` take it (a leading axis of one) when the checkpoint is fp8."""
    weight = jnp.asarray(tensors[key]).T
    if quantization is None:
        return weight
    scales = jnp.asarray(tensors[key + "_scale_inv"]).T.astype(jnp.float32)
    return QuantizedArray(weight[None], scales[None], None, quantization, (1, *weight.shape))


def _split_fp8_shared(w_gate, w_up, w_down, intermediate: int):
    """``jax_moe.split_shared_expert`` for one quantized shared expert of width ``m * F``: its
    values and scale blocks cut into ``m`` experts of width F, which needs F to be a multiple of
    the block size (no block may straddle two experts)."""
    width, block = w_gate.shape[2], w_gate.scheme.block_size
    if width == intermediate:
        return w_gate, w_up, w_down
    if width % intermediate or intermediate % block:
        raise ValueError(
            f"a quantized shared expert of width {width} splits into experts of width F={intermediate} only "
            f"where F divides it and the block size {block} divides F"
        )
    count, hidden = width // intermediate, w_gate.shape[1]

    def columns(q):  # [1, H, m F] -> [m, H, F]
        cut = lambda a: a[0].reshape(a.shape[1], count, -1).transpose(1, 0, 2)  # noqa: E731
        return QuantizedArray(cut(q.values), cut(q.scales), None, q.scheme, (count, hidden, intermediate))

    def rows(q):  # [1, m F, H] -> [m, F, H]
        cut = lambda a: a[0].reshape(count, -1, a.shape[2])  # noqa: E731
        return QuantizedArray(cut(q.values), cut(q.scales), None, q.scheme, (count, intermediate, hidden))

    return columns(w_gate), columns(w_up), rows(w_down)


def _mxfp4_matrix(blocks, scales):
    """gpt-oss MXFP4 storage -> [E, K, N] ``QuantizedArray``: ``blocks`` [E, N, K/32, 16] bytes and
    ``scales`` [E, N, K/32] e8m0 hold the [out = N, in = K] matrix, 32 values of K per block, two a
    byte with the even one in the low nibble; the library wants K down the rows: values
    [E, K/2, N], scales [E, K/32, N]. The bytes move, unchanged."""
    blocks, scales = jnp.asarray(blocks), jnp.asarray(scales)
    num_experts, n_dim, groups, group_bytes = blocks.shape
    values = blocks.reshape(num_experts, n_dim, groups * group_bytes).transpose(0, 2, 1)
    shape = (num_experts, 2 * groups * group_bytes, n_dim)
    return QuantizedArray(values, scales.transpose(0, 2, 1), None, jax_moe.Quantization("mxfp4"), shape)


def convert_block(family: str, tensors: Mapping, config: Mapping, prefix: str = "") -> dict:
    """The layer's parameters ({"gate/kernel": [H, E], "wi_0": [E, H, F], ...}) from the block's
    checkpoint tensors (``tensors`` maps full key names to arrays; extra keys are ignored)."""
    _check_family(family)
    kwargs = layer_kwargs(family, config)
    num_experts, intermediate = kwargs["num_experts"], kwargs["intermediate_size"]
    quantization = kwargs.get("quantization")
    missing = [k for k in _required_keys(family, prefix, num_experts, quantization) if k not in tensors]
    if missing:
        stored_quantized = [k for k in tensors if k.endswith(("_blocks", "_scales", "_scale_inv"))]
        hint = (" (the tensors are quantized: pass the checkpoint's config.json with its quantization_config)"
                if stored_quantized and quantization is None else "")
        raise ValueError(f"{family} checkpoint lacks {len(missing)} keys, e.g. {missing[:3]}{hint}")

    def get(name):
        return jnp.asarray(tensors[prefix + name])

    if family == "gpt_oss":
        gate_up_bias = get("experts.gate_up_proj_bias")
        if quantization is None:
            gate_up, down = get("experts.gate_up_proj"), get("experts.down_proj")
            gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        else:
            # Gate and up interleave along the 2F output rows of the stored matrix.
            blocks, scales = get("experts.gate_up_proj_blocks"), get("experts.gate_up_proj_scales")
            gate = _mxfp4_matrix(blocks[:, 0::2], scales[:, 0::2])
            up = _mxfp4_matrix(blocks[:, 1::2], scales[:, 1::2])
            down = _mxfp4_matrix(get("experts.down_proj_blocks"), get("experts.down_proj_scales"))
        return {
            "gate/kernel": get("router.weight").T,
            "gate/bias": get("router.bias"),
            "wi_0": gate,
            "wi_1": up,
            "wo": down,
            "wi_0_bias": gate_up_bias[..., 0::2],
            "wi_1_bias": gate_up_bias[..., 1::2],
            "wo_bias": get("experts.down_proj_bias"),
        }
    params = {"gate/kernel": get("gate.weight").T}
    for param, name in zip(("wi_0", "wi_1", "wo"), _expert_names(family)):
        params[param] = _stack_experts(tensors, prefix, num_experts, name, quantization)
    if family == "deepseek_v3" and kwargs["use_selection_bias"]:
        params["selection_bias"] = get("gate.e_score_correction_bias").astype(jnp.float32)
    shared = {"qwen2_moe": "shared_expert.", "deepseek_v3": "shared_experts."}.get(family)
    if shared and kwargs.get("num_shared_experts"):
        matrices = (_fp8_matrix(tensors, f"{prefix}{shared}{name}.weight", quantization)
                    for name in ("gate_proj", "up_proj", "down_proj"))
        split = jax_moe.split_shared_expert if quantization is None else _split_fp8_shared
        params["shared_wi_0"], params["shared_wi_1"], params["shared_wo"] = split(*matrices, intermediate)
    if family == "qwen2_moe":
        params["shared_gate"] = get("shared_expert_gate.weight").reshape(-1)
    return params


def _required_keys(family: str, prefix: str, num_experts: int, quantization=None) -> list[str]:
    if family == "gpt_oss":
        names = ("router.weight", "router.bias", "experts.gate_up_proj_bias", "experts.down_proj_bias")
        if quantization is None:
            names += ("experts.gate_up_proj", "experts.down_proj")
        else:
            names += tuple(
                f"experts.{p}_{part}" for p in ("gate_up_proj", "down_proj") for part in ("blocks", "scales")
            )
        return [prefix + n for n in names]
    keys = [f"{prefix}gate.weight"]
    weights = [f"{prefix}experts.{i}.{n}.weight" for i in range(num_experts) for n in _expert_names(family)]
    keys += weights
    if quantization is not None:
        keys += [key + "_scale_inv" for key in weights]
    return keys


def load_block(layer, family: str, tensors: Mapping, config: Mapping, prefix: str = "") -> None:
    """Writes the block's checkpoint weights into an NNX ``FusedMoE`` built from
    ``layer_kwargs(family, config)``, cast to its parameter dtype (quantized weights as stored).
    Shapes and quantization must match exactly."""
    for path, value in convert_block(family, tensors, config, prefix).items():
        owner = layer
        *parents, name = path.split("/")
        for parent in parents:
            owner = getattr(owner, parent)
        variable = getattr(owner, name, None)
        if not isinstance(variable, nnx.Variable):
            raise ValueError(f"the layer has no parameter {path!r} that the {family} checkpoint fills")
        held = variable.get_value()
        if isinstance(value, QuantizedArray) or isinstance(held, QuantizedArray):
            describe = lambda a: a.scheme.describe() if isinstance(a, QuantizedArray) else "float"  # noqa: E731
            if describe(held) != describe(value) or held.shape != value.shape:
                raise ValueError(
                    f"{path}: the layer holds {describe(held)} {list(held.shape)}, the checkpoint gives "
                    f"{describe(value)} {list(value.shape)} (build the layer with layer_kwargs of this config)"
                )
            variable.set_value(value)
            continue
        if tuple(variable.shape) != tuple(value.shape):
            raise ValueError(f"{path}: the layer holds {tuple(variable.shape)}, the checkpoint gives {tuple(value.shape)}")
        variable[...] = value.astype(variable.dtype)


def linen_variables(family: str, tensors: Mapping, config: Mapping, prefix: str = "", param_dtype=jnp.float32) -> dict:
    """The block's weights as variables of ``flax_layers.linen.FusedMoE``:
    ``{"params": {...}}`` plus ``{"routing": {"selection_bias": ...}}`` where it has one and
    ``{"quantized": {...}}`` for quantized expert weights (as stored)."""
    variables = {"params": {}}
    for path, value in convert_block(family, tensors, config, prefix).items():
        if path == "selection_bias":
            variables["routing"] = {"selection_bias": value}
            continue
        if isinstance(value, QuantizedArray):
            variables.setdefault("quantized", {})[path] = value
            continue
        *parents, name = path.split("/")
        node = variables["params"]
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = value.astype(param_dtype)
    return variables
