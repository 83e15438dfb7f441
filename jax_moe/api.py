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

from jax_moe import backend_triton, pipeline, reference, sharding, tile_configs
from jax_moe.options import SCORINGS, Activation, Routing, as_activation

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


def _checked_expert_params(hidden_states, w_gate, w_up, w_down, gate_bias, up_bias, down_bias,
                           shared_w_gate, shared_w_up, shared_w_down, shared_gate, activation):
    """Checks everything ``moe_experts`` and ``fused_moe`` share; returns the expert parameters
    and the activation."""
    _check_experts(hidden_states, w_gate, w_up, w_down)
    _check_biases(gate_bias, up_bias, down_bias, w_gate)
    _check_shared(hidden_states, w_gate, shared_w_gate, shared_w_up, shared_w_down, shared_gate)
    params = pipeline.ExpertWeights(
        w_gate, w_up, w_down, gate_bias, up_bias, down_bias, shared_w_gate, shared_w_up, shared_w_down
    )
    return params, as_activation(activation)


def _check_routing_options(num_experts: int, routing: Routing, selection_bias) -> None:
    if routing.scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {SCORINGS}; got {routing.scoring!r}")
    groups = routing.num_groups
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"num_groups must be a positive int; got {groups!r}")
    if num_experts % groups:
        raise ValueError(f"num_groups ({groups}) must divide the number of experts E={num_experts}")
    kept = routing.kept_groups
    if isinstance(kept, bool) or not isinstance(kept, (int, np.integer)) or not 1 <= kept <= groups:
        raise ValueError(f"top_groups must be an int in [1, num_groups={groups}]; got {kept!r}")
    eligible = kept * (num_experts // groups)
    if routing.top_k > eligible:
        raise ValueError(
            f"top_k={routing.top_k} exceeds the {eligible} experts of the top_groups={kept} kept groups"
        )
    factor = routing.scaling_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating)) or not np.isfinite(factor):
        raise TypeError(f"routed_scaling_factor must be a finite Python number; got {factor!r}")
    if selection_bias is not None:
        _check_float("selection_bias", selection_bias)
        if tuple(selection_bias.shape) != (num_experts,):
            raise ValueError(
                f"selection_bias must have shape [E] = [{num_experts}]; got {_shape_str(selection_bias.shape)}"
            )


def _check_biases(gate_bias, up_bias, down_bias, w_gate) -> None:
    given = {"gate_bias": gate_bias, "up_bias": up_bias, "down_bias": down_bias}
    if all(b is None for b in given.values()):
        return
    missing = [name for name, b in given.items() if b is None]
    if missing:
        raise ValueError(f"expert biases come as gate_bias, up_bias and down_bias together; missing {missing}")
    num_experts, hidden, intermediate = w_gate.shape
    layouts = {"gate_bias": ((num_experts, intermediate), "[E, F]"),
               "up_bias": ((num_experts, intermediate), "[E, F]"),
               "down_bias": ((num_experts, hidden), "[E, H]")}
    for name, bias in given.items():
        shape, layout = layouts[name]
        _check_float(name, bias)
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must have shape {layout} = {_shape_str(shape)}; got {_shape_str(bias.shape)}")


def _check_shared(hidden_states, w_gate, shared_w_gate, shared_w_up, shared_w_down, shared_gate) -> None:
    given = {"shared_w_gate": shared_w_gate, "shared_w_up": shared_w_up, "shared_w_down": shared_w_down}
    if all(w is None for w in given.values()):
        if shared_gate is not None:
            raise ValueError("shared_gate was given without shared experts (shared_w_gate/up/down)")
        return
    missing = [name for name, w in given.items() if w is None]
    if missing:
        raise ValueError(f"shared experts come as shared_w_gate, shared_w_up and shared_w_down together; missing {missing}")
    _, hidden, intermediate = w_gate.shape
    _check_rank("shared_w_gate", shared_w_gate, 3, "[S, H, F]")
    num_shared = shared_w_gate.shape[0]
    layouts = {"shared_w_gate": ((num_shared, hidden, intermediate), "[S, H, F]"),
               "shared_w_up": ((num_shared, hidden, intermediate), "[S, H, F]"),
               "shared_w_down": ((num_shared, intermediate, hidden), "[S, F, H]")}
    for name, array in given.items():
        shape, layout = layouts[name]
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{name} must have shape {layout} = {_shape_str(shape)} (H, F of the routed experts; "
                f"a wider shared expert is several: see jax_moe.split_shared_expert); got "
                f"{_shape_str(array.shape)}"
            )
        if array.dtype != hidden_states.dtype:
            raise TypeError(f"{name} must have the dtype of hidden_states ({hidden_states.dtype}); got {array.dtype}")
    if num_shared < 1:
        raise ValueError("shared_w_gate must hold at least one expert; got S=0")
    if shared_gate is not None:
        _check_float("shared_gate", shared_gate)
        if tuple(shared_gate.shape) != (hidden,):
            raise ValueError(f"shared_gate must have shape [H] = [{hidden}]; got {_shape_str(shared_gate.shape)}")


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


def _tile_config(backend: str, num_pairs: int, w_gate, top_k: int, num_shared: int) -> tile_configs.TileConfig:
    """Tuned tiles for this GPU and layer shape where configs/ has them, else the fallbacks.
    ``num_pairs`` counts the shared experts' rows too; ``top_k`` only the routed choices."""
    num_experts, hidden, intermediate = w_gate.shape
    dtype = jnp.dtype(w_gate.dtype)
    shape = tile_configs.shape_key(num_experts, hidden, intermediate, top_k, dtype.name, num_shared)
    if backend == "triton":
        tables = tile_configs.device_tables(jax.devices()[0])
        return tile_configs.select(num_pairs, dtype.itemsize, table=tables, shape=shape)
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


def route(
    router_logits, *, top_k: int, renormalize: bool = True, scoring: str = "softmax",
    selection_bias=None, num_groups: int = 1, top_groups: int | None = None,
    routed_scaling_factor: float = 1.0, backend: str = "auto",
):
    """Top-k routing of [..., E] logits (see ``jax_moe.options.Routing`` for the options).

    Returns ``(weights, ids)``: [..., top_k] float32 weights and [..., top_k] int32 expert ids, as
    ``jax_moe.reference.route``. Differentiable with respect to the logits; the selection bias
    gets no gradient (it picks experts, it does not weight them).
    """
    routing = _checked_routing(
        router_logits, top_k, renormalize, scoring, selection_bias, num_groups, top_groups, routed_scaling_factor
    )
    backend = _resolve_backend(backend)
    layout = sharding.layout_of(router_logits, (selection_bias,), backend=backend)
    if layout is not None:
        return sharding.route(layout, router_logits, selection_bias, routing=routing, backend=backend)
    return _route(router_logits, routing, selection_bias, backend)


def _checked_routing(router_logits, top_k, renormalize, scoring, selection_bias, num_groups, top_groups,
                     routed_scaling_factor) -> Routing:
    _check_float("router_logits", router_logits)
    if router_logits.ndim < 1:
        raise ValueError("router_logits must have shape [..., E]; got a scalar")
    num_experts = router_logits.shape[-1]
    _check_top_k(top_k, num_experts)
    routing = Routing(int(top_k), scoring, bool(renormalize), num_groups, top_groups, routed_scaling_factor)
    _check_routing_options(num_experts, routing, selection_bias)
    return routing


def _route(router_logits, routing: Routing, selection_bias, backend: str, num_shared: int = 0):
    """``route`` past its checks; with ``num_shared``, the shared experts follow the routed choices
    (``reference.with_shared_experts`` with weight 1)."""
    num_experts = router_logits.shape[-1]
    lead = router_logits.shape[:-1]
    num_tokens = math.prod(lead)
    if backend == "reference" or num_tokens == 0:
        weights, ids = reference.route_with(router_logits, routing, selection_bias)
        if num_shared:
            ones = jnp.ones((*lead, num_shared), jnp.float32)
            weights, ids = reference.with_shared_experts(weights, ids, num_experts, ones)
        return weights, ids
    weights, ids = pipeline.route(
        router_logits.reshape(num_tokens, num_experts), selection_bias, routing=routing,
        launch=_launcher(backend), num_shared=num_shared,
    )
    slots = routing.top_k + num_shared
    return weights.reshape(*lead, slots), ids.reshape(*lead, slots)


def moe_experts(
    hidden_states,
    weights,
    ids,
    w_gate,
    w_up,
    w_down,
    *,
    gate_bias=None,
    up_bias=None,
    down_bias=None,
    activation="silu",
    shared_w_gate=None,
    shared_w_up=None,
    shared_w_down=None,
    shared_gate=None,
    backend: str = "auto",
    save_activations: bool = False,
):
    """The expert FFNs and combine for tokens routed by the caller.

    ``weights`` and ``ids`` are [..., top_k] (float and integer). Concrete ids outside [0, E) raise
    ``ValueError``; under ``jax.jit`` they can't be checked, and the tokens holding them come out
    NaN rather than silently wrong. The other arguments are those of ``fused_moe``. Returns
    [..., H] in the dtype of ``hidden_states``. Differentiable with respect to everything but
    ``ids``.
    """
    params, activation = _checked_expert_params(
        hidden_states, w_gate, w_up, w_down, gate_bias, up_bias, down_bias,
        shared_w_gate, shared_w_up, shared_w_down, shared_gate, activation,
    )
    num_experts = w_gate.shape[0]
    _check_routing(weights, ids, hidden_states, num_experts)
    backend = _resolve_backend(backend)
    valid = (ids >= 0) & (ids < num_experts)
    weights = jnp.where(valid, weights.astype(jnp.float32), jnp.nan)
    ids = jnp.where(valid, ids, 0).astype(jnp.int32)
    layout = sharding.layout_of(hidden_states, (weights, ids, shared_gate), params, backend=backend)
    if layout is not None:
        return sharding.moe_experts(layout, hidden_states, weights, ids, params, shared_gate, activation=activation,
                                    backend=backend, save_activations=bool(save_activations))
    return _experts(hidden_states, weights, ids, params, shared_gate, activation, backend, save_activations)


def fused_moe(
    hidden_states,
    router_logits,
    w_gate,
    w_up,
    w_down,
    *,
    top_k: int,
    renormalize: bool = True,
    scoring: str = "softmax",
    selection_bias=None,
    num_groups: int = 1,
    top_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
    gate_bias=None,
    up_bias=None,
    down_bias=None,
    activation="silu",
    shared_w_gate=None,
    shared_w_up=None,
    shared_w_down=None,
    shared_gate=None,
    backend: str = "auto",
    save_activations: bool = False,
    return_routing: bool = False,
):
    """A whole Mixture-of-Experts layer: routing, dispatch, gated expert FFNs, weighted combine.

    Args:
      hidden_states: [..., H] bfloat16, float16 or float32 activations.
      router_logits: [..., E] router logits, any float dtype (routing runs in float32).
      w_gate, w_up: [E, H, F] expert weights, dtype of hidden_states.
      w_down: [E, F, H] expert weights, dtype of hidden_states.
      top_k: experts per token, in [1, E].
      renormalize: divide the k routing weights by their sum (Mixtral, Qwen3, DeepSeek-V3,
        gpt-oss) or keep the raw scores (Qwen2-MoE).
      scoring: "softmax" over all experts, or "sigmoid" per expert (DeepSeek-V3).
      selection_bias: [E] added to the scores to rank experts, not to weight them (DeepSeek-V3's
        ``e_score_correction_bias``); gets no gradient.
      num_groups, top_groups: group-limited routing: experts form ``num_groups`` equal groups, a
        token picks only from its ``top_groups`` best groups (scored by their two best experts).
      routed_scaling_factor: multiplies the routed experts' weights (DeepSeek-V3: 2.5).
      gate_bias, up_bias: [E, F]; down_bias: [E, H]: expert biases (gpt-oss), all or none.
      activation: "silu" (SwiGLU), "clamped_swiglu" (gpt-oss: alpha 1.702, limit 7), or a
        ``jax_moe.Activation``.
      shared_w_gate, shared_w_up: [S, H, F]; shared_w_down: [S, F, H]: shared experts that every
        token uses, run in the same kernel launches as the routed ones (extra always-chosen rows).
        A shared expert wider than F is several of them (``jax_moe.split_shared_expert``).
      shared_gate: [H]: scale the shared experts' output by ``sigmoid(x @ shared_gate)``
        (Qwen2-MoE); without it their weight is 1 (DeepSeek-V3).
      backend: "triton", "interpret", "reference" or "auto".
      save_activations: for the backward pass of the kernel backends, keep the gate and up
        pre-activations (``2 * rows * F`` elements, rows ~ T*top_k) instead of recomputing them;
        see ``pipeline.Plan``. The default saves only the dispatch metadata. Saving skips two of
        the backward's eight GEMM-equivalents (measured trade-off: benchmarks/README.md).
      return_routing: also return the routing, for auxiliary losses or logging.

    Differentiable once with respect to hidden_states, router_logits (through the routing
    weights), the expert weights, biases, shared experts and shared gate; the reference backend to
    any order.

    Returns:
      [..., H] in the dtype of hidden_states:
      ``sum_k weight_k * (down_k(act(x @ gate_k + b, x @ up_k + b)) + b_down_k)`` plus the shared
      experts' weighted outputs; with ``return_routing``, the tuple ``(output, weights, ids)``
      with the routed experts' routing of ``route``.
    """
    params, activation = _checked_expert_params(
        hidden_states, w_gate, w_up, w_down, gate_bias, up_bias, down_bias,
        shared_w_gate, shared_w_up, shared_w_down, shared_gate, activation,
    )
    _check_router_logits(router_logits, hidden_states, w_gate.shape[0])
    routing = _checked_routing(
        router_logits, top_k, renormalize, scoring, selection_bias, num_groups, top_groups, routed_scaling_factor
    )
    backend = _resolve_backend(backend)
    layout = sharding.layout_of(hidden_states, (router_logits, selection_bias, shared_gate), params,
                                backend=backend)
    if layout is not None:
        return sharding.fused_moe(
            layout, hidden_states, router_logits, params, selection_bias, shared_gate, routing=routing,
            activation=activation, backend=backend, save_activations=bool(save_activations),
            return_routing=return_routing,
        )
    # The routing kernel appends ungated shared experts to the choices itself (no launch of
    # their own); gated ones take their weights from the activations, in XLA.
    shared_in_routing = params.num_shared if backend != "reference" and shared_gate is None else 0
    num_tokens = math.prod(hidden_states.shape[:-1])
    num_pairs = num_tokens * (top_k + params.num_shared)
    dispatched = config = None
    if (backend != "reference" and shared_in_routing == params.num_shared and num_tokens
            and pipeline.routes_and_dispatches(num_pairs)):
        config = _tile_config(backend, num_pairs, params.w_gate, top_k, params.num_shared)
        weights, ids, dispatched = pipeline.route_and_dispatch(
            router_logits.reshape(num_tokens, -1), selection_bias, routing=routing, launch=_launcher(backend),
            num_shared=shared_in_routing, block_m=config.block_m,
        )
        weights, ids = (a.reshape(*router_logits.shape[:-1], -1) for a in (weights, ids))
    else:
        weights, ids = _route(router_logits, routing, selection_bias, backend, shared_in_routing)
    out = _experts(
        hidden_states, weights, ids, params, shared_gate, activation, backend, save_activations,
        shared_in_routing=shared_in_routing > 0, dispatched=dispatched, config=config,
    )
    if return_routing:
        return out, weights[..., :top_k], ids[..., :top_k]
    return out


def _experts(hidden_states, weights, ids, params: pipeline.ExpertWeights, shared_gate,
             activation: Activation, backend: str, save_activations: bool, shared_in_routing: bool = False,
             dispatched=None, config: tile_configs.TileConfig | None = None, partial_sum: bool = False):
    """``shared_in_routing``: ``weights`` and ``ids`` already end with the shared experts' slots;
    ``dispatched``: their dispatch metadata, from ``pipeline.route_and_dispatch`` with the tiles
    ``config`` (looked up here when not given); ``partial_sum``: one device's share of the layer
    (``pipeline.Plan``; kernel backends only)."""
    if backend == "reference":
        return reference.moe_experts(
            hidden_states, weights, ids, **params._asdict(), activation=activation, shared_gate=shared_gate
        )
    hidden = hidden_states.shape[-1]
    intermediate = params.w_gate.shape[-1]
    num_tokens = math.prod(hidden_states.shape[:-1])
    if num_tokens == 0 or hidden == 0 or intermediate == 0:
        return jnp.zeros(hidden_states.shape, hidden_states.dtype)
    if params.num_shared and not shared_in_routing:
        shared = reference.shared_expert_weights(hidden_states, params.num_shared, shared_gate)
        weights, ids = reference.with_shared_experts(weights, ids, params.num_routed, shared)
    slots = ids.shape[-1]
    out = pipeline.experts(
        hidden_states.reshape(num_tokens, hidden),
        weights.reshape(num_tokens, slots),
        ids.reshape(num_tokens, slots),
        params,
        plan=pipeline.Plan(
            config=config or _tile_config(
                backend, num_tokens * slots, params.w_gate, slots - params.num_shared, params.num_shared
            ),
            dot_precision=_dot_precision(hidden_states.dtype),
            launch=_launcher(backend),
            save_activations=bool(save_activations),
            activation=activation,
            partial_sum=partial_sum,
        ),
        dispatched=dispatched,
    )
    return out.reshape(hidden_states.shape)


def split_shared_expert(w_gate, w_up, w_down, intermediate: int):
    """One shared expert of width ``F_s`` as ``S = cdiv(F_s, F)`` shared experts of width ``F``.

    ``w_gate``, ``w_up``: [H, F_s]; ``w_down``: [F_s, H] (x @ w layouts). A SwiGLU FFN is a sum over
    its intermediate columns, so column chunks of F are experts whose outputs add up to the whole;
    a last partial chunk is padded with zero columns, which contribute exactly zero (and get zero
    gradients). Returns ``([S, H, F], [S, H, F], [S, F, H])`` for ``fused_moe``'s ``shared_*``.
    Meant for load time: it copies the weights.
    """
    hidden, width = w_gate.shape
    if tuple(w_up.shape) != (hidden, width) or tuple(w_down.shape) != (width, hidden):
        raise ValueError(
            f"w_gate, w_up must be [H, F_s] and w_down [F_s, H] alike; got {_shape_str(w_gate.shape)}, "
            f"{_shape_str(w_up.shape)}, {_shape_str(w_down.shape)}"
        )
    if width == 0 or intermediate < 1:
        raise ValueError(f"need F_s >= 1 and intermediate >= 1; got F_s={width}, intermediate={intermediate}")
    num_shared = -(-width // intermediate)
    pad = num_shared * intermediate - width
    w_gate, w_up = (
        jnp.pad(w, ((0, 0), (0, pad))).reshape(hidden, num_shared, intermediate).transpose(1, 0, 2)
        for w in (w_gate, w_up)
    )
    w_down = jnp.pad(w_down, ((0, pad), (0, 0))).reshape(num_shared, intermediate, hidden)
    return w_gate, w_up, w_down
