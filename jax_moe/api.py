"""Public entry points: validate the arguments, then dispatch to a backend.

Backends:

* ``"triton"``: the Triton kernels on an NVIDIA GPU, through jax-triton.
* ``"interpret"``: the same kernels on the CPU, through Triton's interpreter (slow; for tests).
* ``"reference"``: ``jax_moe.reference``, pure JAX.
* ``"auto"``: ``"triton"`` when it can run here, else ``"reference"``.

Every error is raised at trace time, before any kernel runs.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import backend_triton, pipeline, reference, tile_configs

BACKENDS = ("auto", "triton", "interpret", "reference")
ACTIVATION_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _shape_str(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _check_rank(name: str, array, rank: int, layout: str) -> None:
    if array.ndim != rank:
        raise ValueError(f"{name} must have shape {layout}; got shape {_shape_str(array.shape)}")


def _check_float(name: str, array) -> None:
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype; got {array.dtype}")


def _check_top_k(top_k, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise TypeError(f"top_k must be a Python int; got {type(top_k).__name__} {top_k!r}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must lie in [1, {num_experts}] (the number of experts); got {top_k}")


def _check_experts(hidden_states, w_gate, w_up, w_down) -> None:
    """Checks the activations and the three expert weight arrays against each other."""
    if hidden_states.ndim < 1:
        raise ValueError("hidden_states must have shape [..., H]; got a scalar")
    if jnp.dtype(hidden_states.dtype) not in ACTIVATION_DTYPES:
        raise TypeError(
            f"hidden_states must be bfloat16, float16 or float32; got {hidden_states.dtype}"
        )
    hidden = hidden_states.shape[-1]
    _check_rank("w_gate", w_gate, 3, "[E, H, F]")
    num_experts, _, intermediate = w_gate.shape
    expected = {
        "w_gate": (w_gate, (num_experts, hidden, intermediate), "[E, H, F]"),
        "w_up": (w_up, (num_experts, hidden, intermediate), "[E, H, F]"),
        "w_down": (w_down, (num_experts, intermediate, hidden), "[E, F, H]"),
    }
    for name, (array, shape, layout) in expected.items():
        _check_rank(name, array, 3, layout)
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{name} must have shape {layout} = {_shape_str(shape)} to match H={hidden} of "
                f"hidden_states and E={num_experts}, F={intermediate} of w_gate; got "
                f"{_shape_str(array.shape)}"
            )
        if array.dtype != hidden_states.dtype:
            raise TypeError(
                f"{name} must have the dtype of hidden_states ({hidden_states.dtype}); got {array.dtype}"
            )
    if num_experts < 1:
        raise ValueError("w_gate must hold at least one expert; got E=0")


def _check_router_logits(router_logits, hidden_states, num_experts: int) -> None:
    _check_float("router_logits", router_logits)
    expected = (*hidden_states.shape[:-1], num_experts)
    if tuple(router_logits.shape) != expected:
        raise ValueError(
            f"router_logits must have shape [..., E] = {_shape_str(expected)} (leading dims of "
            f"hidden_states, E of w_gate); got {_shape_str(router_logits.shape)}"
        )


def _check_routing(weights, ids, hidden_states, num_experts: int) -> None:
    lead = hidden_states.shape[:-1]
    for name, array in (("weights", weights), ("ids", ids)):
        if array.ndim != len(lead) + 1 or tuple(array.shape[:-1]) != lead:
            raise ValueError(
                f"{name} must have shape [..., top_k] with the leading dims of hidden_states "
                f"{_shape_str(lead)}; got {_shape_str(array.shape)}"
            )
    if weights.shape != ids.shape:
        raise ValueError(
            f"weights and ids must have the same shape; got {_shape_str(weights.shape)} and "
            f"{_shape_str(ids.shape)}"
        )
    _check_float("weights", weights)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must have an integer dtype; got {ids.dtype}")
    _check_top_k(ids.shape[-1], num_experts)
    try:
        concrete = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return  # traced: out-of-range ids poison their tokens instead (see moe_experts)
    if concrete.size and (concrete.min() < 0 or concrete.max() >= num_experts):
        raise ValueError(
            f"ids must lie in [0, {num_experts - 1}]; got values from {concrete.min()} to "
            f"{concrete.max()}"
        )


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


@functools.cache
def _auto_backend() -> str:
    reason = backend_triton.unavailable_reason()
    if reason is None:
        return "triton"
    if any(d.platform == "gpu" for d in jax.devices()):
        warnings.warn(f"jax_moe: using the slow reference backend on this GPU because {reason}")
    return "reference"


def _resolve_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return _auto_backend()
    if backend == "triton":
        reason = backend_triton.unavailable_reason()
        if reason is not None:
            raise ValueError(f'backend="triton" can\'t run here: {reason}')
    return backend


def _launcher(backend: str):
    if backend == "triton":
        return backend_triton.launch
    from jax_moe import backend_interpret  # imports triton's interpreter only when asked for

    return backend_interpret.launch


def _tile_config(backend: str, num_pairs: int, w_gate, top_k: int) -> tile_configs.TileConfig:
    """Tuned tiles for this GPU and layer shape where configs/ has them, else the fallbacks."""
    num_experts, hidden, intermediate = w_gate.shape
    dtype = jnp.dtype(w_gate.dtype)
    shape = tile_configs.shape_key(num_experts, hidden, intermediate, top_k, dtype.name)
    if backend == "triton":
        table = tile_configs.gpu_table_name(jax.devices()[0].device_kind)
        return tile_configs.select(num_pairs, dtype.itemsize, table=table, shape=shape)
    # The interpreter has no shared memory to fit: its tiles need no narrowing for fp32.
    return tile_configs.select(num_pairs, table="interpret", shape=shape)


def _dot_precision(dtype) -> str:
    """How fp32 operands meet the tensor cores, following JAX's matmul precision setting.

    Plain tf32 loses about 2e-3 relative over the layer's two chained GEMMs, which is more than an
    fp32 user expects by default; tf32x3 (three tf32 products) keeps fp32 accuracy on the tensor
    cores. Asking JAX for "tensorfloat32" (or less) gets tf32, "highest" gets exact fp32 FMA.
    """
    if dtype != jnp.float32:
        return "tf32"  # ignored for 16-bit operands
    setting = jax.config.jax_default_matmul_precision
    if setting in ("highest", "float32"):
        return "ieee"
    if setting in ("tensorfloat32", "bfloat16", "fastest", "bfloat16_3x"):
        return "tf32"
    return "tf32x3"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def route(router_logits, *, top_k: int, renormalize: bool = True, backend: str = "auto"):
    """Softmax top-k routing of [..., E] logits.

    Returns ``(weights, ids)``: [..., top_k] float32 weights (divided by their sum when
    ``renormalize``) and [..., top_k] int32 expert ids; see ``jax_moe.reference.route``.
    """
    _check_float("router_logits", router_logits)
    if router_logits.ndim < 1:
        raise ValueError("router_logits must have shape [..., E]; got a scalar")
    num_experts = router_logits.shape[-1]
    _check_top_k(top_k, num_experts)
    backend = _resolve_backend(backend)
    lead = router_logits.shape[:-1]
    num_tokens = math.prod(lead)
    if backend == "reference" or num_tokens == 0:
        return reference.route(router_logits, top_k=top_k, renormalize=renormalize)
    weights, ids = pipeline.route(
        router_logits.reshape(num_tokens, num_experts),
        top_k=top_k,
        renormalize=bool(renormalize),
        launch=_launcher(backend),
    )
    return weights.reshape(*lead, top_k), ids.reshape(*lead, top_k)


def moe_experts(
    hidden_states,
    weights,
    ids,
    w_gate,
    w_up,
    w_down,
    *,
    backend: str = "auto",
    save_activations: bool = False,
):
    """The expert FFNs and combine for tokens routed by the caller.

    ``weights`` and ``ids`` are [..., top_k] (float and integer). Concrete ids outside [0, E) raise
    ``ValueError``; under ``jax.jit`` they can't be checked, and the tokens holding them come out
    NaN rather than silently wrong. Returns [..., H] in the dtype of ``hidden_states``.
    Differentiable with respect to everything but ``ids``; ``save_activations`` as in ``fused_moe``.
    """
    _check_experts(hidden_states, w_gate, w_up, w_down)
    num_experts = w_gate.shape[0]
    _check_routing(weights, ids, hidden_states, num_experts)
    backend = _resolve_backend(backend)
    valid = (ids >= 0) & (ids < num_experts)
    weights = jnp.where(valid, weights.astype(jnp.float32), jnp.nan)
    ids = jnp.where(valid, ids, 0).astype(jnp.int32)
    return _experts(hidden_states, weights, ids, w_gate, w_up, w_down, backend, save_activations)


def fused_moe(
    hidden_states,
    router_logits,
    w_gate,
    w_up,
    w_down,
    *,
    top_k: int,
    renormalize: bool = True,
    backend: str = "auto",
    save_activations: bool = False,
    return_routing: bool = False,
):
    """A whole Mixture-of-Experts layer: routing, dispatch, SwiGLU expert FFNs, weighted combine.

    Args:
      hidden_states: [..., H] bfloat16, float16 or float32 activations.
      router_logits: [..., E] router logits, any float dtype (routing runs in float32).
      w_gate, w_up: [E, H, F] expert weights, dtype of hidden_states.
      w_down: [E, F, H] expert weights, dtype of hidden_states.
      top_k: experts per token, in [1, E].
      renormalize: divide the k routing weights by their sum (Mixtral, Qwen3) or keep the raw
        softmax probabilities (Qwen2-MoE).
      backend: "triton", "interpret", "reference" or "auto".
      save_activations: for the backward pass of the kernel backends, keep the gate and up
        pre-activations (``2 * rows * F`` elements, rows ~ T*top_k) instead of recomputing them;
        see ``pipeline.Plan``. The default saves only the dispatch metadata.
      return_routing: also return the routing, for auxiliary losses or logging.

    Differentiable once with respect to hidden_states, router_logits (through the routing
    weights) and the three expert weights; the reference backend to any order.

    Returns:
      [..., H] in the dtype of hidden_states:
      ``sum_k weight_k * down_k(silu(x @ gate_k) * (x @ up_k))``; with ``return_routing``, the
      tuple ``(output, weights, ids)`` with the routing of ``route``.
    """
    _check_experts(hidden_states, w_gate, w_up, w_down)
    num_experts = w_gate.shape[0]
    _check_router_logits(router_logits, hidden_states, num_experts)
    _check_top_k(top_k, num_experts)
    weights, ids = route(router_logits, top_k=top_k, renormalize=renormalize, backend=backend)
    backend = _resolve_backend(backend)
    out = _experts(hidden_states, weights, ids, w_gate, w_up, w_down, backend, save_activations)
    return (out, weights, ids) if return_routing else out


def _experts(hidden_states, weights, ids, w_gate, w_up, w_down, backend: str, save_activations: bool):
    if backend == "reference":
        return reference.moe_experts(hidden_states, weights, ids, w_gate, w_up, w_down)
    hidden = hidden_states.shape[-1]
    intermediate = w_gate.shape[-1]
    top_k = ids.shape[-1]
    num_tokens = math.prod(hidden_states.shape[:-1])
    if num_tokens == 0 or hidden == 0 or intermediate == 0:
        return jnp.zeros(hidden_states.shape, hidden_states.dtype)
    out = pipeline.experts(
        hidden_states.reshape(num_tokens, hidden),
        weights.reshape(num_tokens, top_k),
        ids.reshape(num_tokens, top_k),
        w_gate,
        w_up,
        w_down,
        plan=pipeline.Plan(
            config=_tile_config(backend, num_tokens * top_k, w_gate, top_k),
            dot_precision=_dot_precision(hidden_states.dtype),
            launch=_launcher(backend),
            save_activations=bool(save_activations),
        ),
    )
    return out.reshape(hidden_states.shape)
