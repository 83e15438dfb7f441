"""The MoE layers a JAX user could pick instead of jax_moe, all with jax_moe's semantics.

Every route maps (x [T, H], router_logits [T, E], w_gate, w_up [E, H, F], w_down [E, F, H], extras)
to [T, H] and is differentiable, so the forward and the training benchmarks share them. ``extras``
holds the family's other arrays (``arg_specs.MoeInputs.extras``: selection bias, expert biases,
shared experts); the other routes run shared experts the way a user would without jax_moe, as a
separate dense MLP beside the routed experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jax_moe
from jax_moe import Quantization, arg_specs, layer_math, reference

# jax_moe on expert weights (routed and shared alike) quantized once, before any call is timed:
# the families' serving formats. Timed only when named (``moe_bench.py --routes``).
QUANTIZED_ROUTES = {
    "jax_moe_fp8": Quantization("fp8"),  # per output column, bf16 activations
    "jax_moe_fp8_w8a8": Quantization("fp8", "block", activations="fp8"),  # DeepSeek-V3's checkpoints
    "jax_moe_int4": Quantization("int4", "group", group_size=64, zero_point=True),  # AWQ-style; 64 divides every K
    "jax_moe_mxfp4": Quantization("mxfp4"),  # gpt-oss's checkpoints
}
SHARED_WEIGHT_NAMES = ("shared_w_gate", "shared_w_up", "shared_w_down")


def fused(shape: arg_specs.MoeShape, **layer_options):
    """jax_moe.fused_moe with the model's options (and ``layer_options``, e.g. save_activations)."""
    options = {**shape.static_options(), **layer_options}
    return lambda x, logits, wg, wu, wd, extras: jax_moe.fused_moe(
        x, logits, wg, wu, wd, **extras, **options, backend="triton"
    )


def route_weights(name: str, w_gate, w_up, w_down, extras: dict) -> tuple:
    """``(w_gate, w_up, w_down, extras)`` as route ``name`` takes them: quantized with its scheme
    (the shared experts' too) for a quantized route, as given for the others."""
    scheme = QUANTIZED_ROUTES.get(name)
    if scheme is None:
        return w_gate, w_up, w_down, extras
    quantize = functools.partial(jax_moe.quantize, scheme=scheme)
    extras = {key: quantize(value) if key in SHARED_WEIGHT_NAMES else value for key, value in extras.items()}
    return quantize(w_gate), quantize(w_up), quantize(w_down), extras


@functools.cache
def expert_bytes(shape: arg_specs.MoeShape, name: str) -> int:
    """Bytes of one expert's three matrices as route ``name`` reads them: bf16, or the quantized
    values with their scales and zero points."""
    matrices = [(shape.hidden, shape.intermediate)] * 2 + [(shape.intermediate, shape.hidden)]
    scheme = QUANTIZED_ROUTES.get(name)
    if scheme is None:
        return sum(k * n for k, n in matrices) * 2
    one_expert = [jax.ShapeDtypeStruct((1, k, n), jnp.bfloat16) for k, n in matrices]
    stored = jax.eval_shape(lambda ws: [jax_moe.quantize(w, scheme) for w in ws], one_expert)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(stored))


def fused_then_dense_shared(shape: arg_specs.MoeShape):
    """jax_moe for the routed experts only, the shared experts as a separate dense MLP: what
    running the shared experts inside jax_moe's launches saves, measured."""
    options = shape.static_options()
    shared_names = ("shared_w_gate", "shared_w_up", "shared_w_down", "shared_gate")

    def moe(x, logits, wg, wu, wd, extras):
        routed_extras = {k: v for k, v in extras.items() if k not in shared_names}
        routed = jax_moe.fused_moe(x, logits, wg, wu, wd, **routed_extras, **options, backend="triton")
        return (routed.astype(jnp.float32) + _shared_mlp(shape, x, extras)).astype(x.dtype)

    return moe


def reference_routing(shape, logits, extras):
    """The routing every route shares: ``jax_moe.reference.route`` with the model's routing."""
    return reference.route(logits, shape.routing, extras.get("selection_bias"))


def _shared_mlp(shape, x, extras):
    """The shared experts as one dense MLP call (what jax_moe folds into its own launches)."""
    if "shared_w_gate" not in extras:
        return 0.0
    einsum = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    gate = einsum("th,shf->tsf", x, extras["shared_w_gate"])
    up = einsum("th,shf->tsf", x, extras["shared_w_up"])
    out = einsum("tsf,sfh->th", (jax.nn.silu(gate) * up).astype(x.dtype), extras["shared_w_down"])
    if "shared_gate" in extras:
        out = out * layer_math.shared_expert_weights(x, 1, extras["shared_gate"])
    return out


def dense_einsum(shape: arg_specs.MoeShape):
    """Every token through every routed expert, unchosen ones zeroed by the combine weights."""

    def moe(x, logits, w_gate, w_up, w_down, extras):
        weights, ids = reference_routing(shape, logits, extras)
        biases = {k: extras[k] for k in ("gate_bias", "up_bias", "down_bias") if k in extras}
        experts = jax_moe.ExpertWeights(w_gate, w_up, w_down, **biases)
        routed = reference.moe_experts(x, weights, ids, experts, shape.activation)
        return (routed.astype(jnp.float32) + _shared_mlp(shape, x, extras)).astype(x.dtype)

    return moe


def sorted_ragged(shape: arg_specs.MoeShape, ragged_dot, *, products_in_input_dtype: bool = False):
    """Sort the (token, slot) pairs by expert, three ragged GEMMs, weight, scatter-add back.

    The GEMMs return float32, or with ``products_in_input_dtype`` the activations' dtype: tokamax's
    backward multiplies each GEMM's cotangent with its other operand and needs both of one dtype.
    """
    activation = shape.activation
    top_k = shape.top_k

    def moe(x, logits, w_gate, w_up, w_down, extras):
        num_tokens = x.shape[0]
        num_experts = w_gate.shape[0]
        weights, ids = reference_routing(shape, logits, extras)
        order = jnp.argsort(ids.reshape(-1), stable=True)
        tokens = order // top_k
        sorted_ids = ids.reshape(-1)[order]
        group_sizes = jnp.bincount(ids.reshape(-1), length=num_experts).astype(jnp.int32)
        rows = x[tokens]
        product_dtype = x.dtype if products_in_input_dtype else jnp.float32
        dot = functools.partial(ragged_dot, group_sizes=group_sizes, preferred_element_type=product_dtype)
        gate, up = (dot(rows, w).astype(jnp.float32) for w in (w_gate, w_up))
        if "gate_bias" in extras:
            gate = gate + extras["gate_bias"][sorted_ids]
            up = up + extras["up_bias"][sorted_ids]
        act = reference.swiglu(gate, up, activation).astype(x.dtype)
        out = dot(act, w_down).astype(jnp.float32)
        if "down_bias" in extras:
            out = out + extras["down_bias"][sorted_ids]
        out = out * weights.reshape(-1)[order][:, None]
        routed = jnp.zeros((num_tokens, x.shape[1]), jnp.float32).at[tokens].add(out)
        return (routed + _shared_mlp(shape, x, extras)).astype(x.dtype)

    return moe


def available(shape: arg_specs.MoeShape, quantized: bool = False) -> dict:
    """Route name -> layer function, for every route this machine can run; with ``quantized``
    the quantized routes too (forward only: they take ``route_weights``' weights)."""
    routes = {
        "jax_moe": fused(shape),
        "jax_moe_batch_invariant": fused(shape, batch_invariant=True),
        "dense_einsum": dense_einsum(shape),
        "ragged_dot": sorted_ragged(shape, jax.lax.ragged_dot),
    }
    if quantized:
        routes |= {name: fused(shape) for name in QUANTIZED_ROUTES}
    if shape.num_shared:
        routes["jax_moe+dense_shared"] = fused_then_dense_shared(shape)
    try:
        import tokamax
    except Exception as e:  # not installed, or its dependencies are not
        print(f"tokamax routes left out: {type(e).__name__}: {e}")
        return routes
    from absl import flags

    # tokamax reads its absl flags on first use and parses sys.argv then, which fails on this
    # script's own arguments: leave them at their defaults instead.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    for implementation in ("mosaic", "triton"):
        ragged = functools.partial(tokamax.ragged_dot, implementation=implementation)
        routes[f"tokamax_{implementation}"] = sorted_ragged(shape, ragged, products_in_input_dtype=True)
    return routes
