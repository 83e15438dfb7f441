"""Public entry points: validate the arguments, then dispatch to a backend.

Backends:

* ``"triton"``: the Triton kernels on an NVIDIA GPU, through jax-triton.
* ``"interpret"``: the same kernels on the CPU, through Triton's interpreter (slow; for tests).
* ``"reference"``: ``jax_moe.reference``, pure JAX.
* ``"auto"``: ``"triton"`` when it can run here, else ``"reference"`` (so on a CPU, ``"auto"``
  runs the pure-JAX reference).

Every error is raised at trace time, before any kernel runs. The kernel backends' plan (tiles,
launches, where the shared experts go) is ``jax_moe.pipeline``'s.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import backend_triton, pipeline, quantization, reference, sharding
from jax_moe.layer_math import drop_over_capacity
from jax_moe.options import Activation, ExpertWeights, Routing, gather
from jax_moe.quantization import QuantizedArray

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


def _check_experts(hidden_states, experts: ExpertWeights) -> None:
    """Checks the activations and every expert parameter against each other."""
    if hidden_states.ndim < 1:
        raise ValueError("hidden_states must have shape [..., H]; got a scalar")
    if jnp.dtype(hidden_states.dtype) not in ACTIVATION_DTYPES:
        raise TypeError(
            f"hidden_states must be bfloat16, float16 or float32; got {hidden_states.dtype}"
        )
    hidden = hidden_states.shape[-1]
    _check_rank("w_gate", experts.w_gate, 3, "[E, H, F]")
    num_experts, _, intermediate = experts.w_gate.shape
    expected = {
        "w_gate": (experts.w_gate, (num_experts, hidden, intermediate), "[E, H, F]"),
        "w_up": (experts.w_up, (num_experts, hidden, intermediate), "[E, H, F]"),
        "w_down": (experts.w_down, (num_experts, intermediate, hidden), "[E, F, H]"),
    }
    for name, (array, shape, layout) in expected.items():
        _check_rank(name, array, 3, layout)
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{name} must have shape {layout} = {_shape_str(shape)} to match H={hidden} of "
                f"hidden_states and E={num_experts}, F={intermediate} of w_gate; got "
                f"{_shape_str(array.shape)}"
            )
        _check_weight_dtype(name, array, hidden_states)
    if num_experts < 1:
        raise ValueError("w_gate must hold at least one expert; got E=0")
    _check_biases(experts)
    _check_shared(hidden_states, experts)
    _weight_scheme(experts)


def _check_weight_dtype(name: str, array, hidden_states) -> None:
    """A float weight has the activations' dtype; a quantized one is checked against its scheme."""
    if isinstance(array, QuantizedArray):
        _check_quantized(name, array)
    elif array.dtype != hidden_states.dtype:
        raise TypeError(f"{name} must have the dtype of hidden_states ({hidden_states.dtype}); got {array.dtype}")


def _check_quantized(name: str, q: QuantizedArray) -> None:
    """The arrays of a quantized weight against its scheme and logical [E, K, N] shape."""
    scheme = q.scheme
    scheme.check_k(name, q.shape[1])
    parts = {
        "values": (q.values, scheme.values_shape(q.shape), scheme.values_dtype),
        "scales": (q.scales, scheme.scales_shape(q.shape), scheme.scales_dtype),
    }
    if scheme.zero_point:
        parts["zeros"] = (q.zeros, scheme.scales_shape(q.shape), jnp.dtype(jnp.float32))
    elif q.zeros is not None:
        raise ValueError(f"{name}: zeros given, but the scheme ({scheme.describe()}) has no zero points")
    for part, (array, shape, dtype) in parts.items():
        if array is None:
            raise ValueError(f"{name}.{part} is missing; {scheme.describe()} needs it")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(
                f"{name}.{part} must have shape {_shape_str(shape)} for a {_shape_str(q.shape)} weight "
                f"quantized {scheme.describe()}; got {_shape_str(array.shape)}"
            )
        if jnp.dtype(array.dtype) != dtype:
            raise TypeError(f"{name}.{part} must be {dtype} for {scheme.describe()}; got {array.dtype}")


def _weight_scheme(experts: ExpertWeights):
    """The one quantization of every expert matrix (None: all float); mixed schemes raise."""
    names = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")
    given = {name: getattr(experts, name) for name in names if getattr(experts, name) is not None}
    schemes = {name: w.scheme if isinstance(w, QuantizedArray) else None for name, w in given.items()}
    if len(set(schemes.values())) > 1:
        described = ", ".join(f"{n}: {'float' if s is None else s.describe()}" for n, s in schemes.items())
        raise ValueError(f"expert weights must all be float or all share one quantization; got {described}")
    return schemes["w_gate"]


def _frozen_weights(experts: ExpertWeights) -> ExpertWeights:
    """The experts with each quantized weight ``quantization.frozen``: differentiating one raises."""
    return experts._replace(**{
        name: quantization.frozen(w, name) for name, w in experts._asdict().items() if isinstance(w, QuantizedArray)
    })


def _layout(hidden_states, others, experts: ExpertWeights, *, backend: str, exchange: str):
    """``sharding.layout_of`` the call; None for an empty layer. Quantized weights run on one
    device only: a call whose arguments are sharded over several raises ValueError."""
    if _is_empty(hidden_states, experts):
        return None
    if _weight_scheme(experts) is None:
        return sharding.layout_of(hidden_states, others, experts, backend=backend, exchange=exchange)
    layout = sharding.layout_of(hidden_states, (*others, *jax.tree.leaves(experts)), backend=backend)
    if isinstance(layout, sharding.Deferred):
        raise ValueError(
            "quantized expert weights take arguments on one device, and under jax.jit on a mesh of "
            "Auto axes the triton backend can't tell how they are split: call the layer outside "
            "that mesh (jax.set_mesh) or on a mesh of Explicit axes"
        )
    if layout is not None:
        raise ValueError(
            "quantized expert weights take arguments on one device: multi-device layouts (data, "
            "expert or tensor parallel) support float weights only; got arguments sharded over a mesh"
        )
    return None


def _check_biases(experts: ExpertWeights) -> None:
    given = {"gate_bias": experts.gate_bias, "up_bias": experts.up_bias, "down_bias": experts.down_bias}
    if all(b is None for b in given.values()):
        return
    missing = [name for name, b in given.items() if b is None]
    if missing:
        raise ValueError(f"expert biases come as gate_bias, up_bias and down_bias together; missing {missing}")
    num_experts, hidden, intermediate = experts.w_gate.shape
    layouts = {"gate_bias": ((num_experts, intermediate), "[E, F]"),
               "up_bias": ((num_experts, intermediate), "[E, F]"),
               "down_bias": ((num_experts, hidden), "[E, H]")}
    for name, bias in given.items():
        shape, layout = layouts[name]
        _check_float(name, bias)
        if tuple(bias.shape) != shape:
            raise ValueError(f"{name} must have shape {layout} = {_shape_str(shape)}; got {_shape_str(bias.shape)}")


def _check_shared(hidden_states, experts: ExpertWeights) -> None:
    given = {"shared_w_gate": experts.shared_w_gate, "shared_w_up": experts.shared_w_up,
             "shared_w_down": experts.shared_w_down}
    if all(w is None for w in given.values()):
        if experts.shared_gate is not None:
            raise ValueError("shared_gate was given without shared experts (shared_w_gate/up/down)")
        return
    missing = [name for name, w in given.items() if w is None]
    if missing:
        raise ValueError(f"shared experts come as shared_w_gate, shared_w_up and shared_w_down together; missing {missing}")
    _, hidden, intermediate = experts.w_gate.shape
    _check_rank("shared_w_gate", experts.shared_w_gate, 3, "[S, H, F]")
    num_shared = experts.shared_w_gate.shape[0]
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
        _check_weight_dtype(name, array, hidden_states)
    if num_shared < 1:
        raise ValueError("shared_w_gate must hold at least one expert; got S=0")
    if experts.shared_gate is not None:
        _check_float("shared_gate", experts.shared_gate)
        if tuple(experts.shared_gate.shape) != (hidden,):
            raise ValueError(f"shared_gate must have shape [H] = [{hidden}]; got {_shape_str(experts.shared_gate.shape)}")


def _check_router_logits(router_logits, routing: Routing, selection_bias) -> None:
    _check_float("router_logits", router_logits)
    if router_logits.ndim < 1:
        raise ValueError("router_logits must have shape [..., E]; got a scalar")
    num_experts = router_logits.shape[-1]
    routing.check_experts(num_experts)
    if selection_bias is not None:
        _check_float("selection_bias", selection_bias)
        if tuple(selection_bias.shape) != (num_experts,):
            raise ValueError(
                f"selection_bias must have shape [E] = [{num_experts}]; got {_shape_str(selection_bias.shape)}"
            )


def _check_batch_invariant(batch_invariant, backend: str, routing: Routing | None = None,
                           experts: ExpertWeights | None = None) -> None:
    if not isinstance(batch_invariant, (bool, np.bool_)):
        raise TypeError(f"batch_invariant must be a bool; got {type(batch_invariant).__name__}")
    if not batch_invariant:
        return
    if backend == "reference":
        raise ValueError(
            'batch_invariant=True needs a kernel backend ("triton" or "interpret"); the reference '
            "backend's XLA dots may reduce in an order that depends on the batch"
        )
    if routing is not None and routing.capacity_factor is not None:
        raise ValueError(
            "batch_invariant=True can't take a routing with a capacity_factor: which pairs an "
            "expert's capacity drops depends on the other tokens of the batch"
        )
    if experts is not None and experts.shared_gate is not None:
        raise ValueError(
            "batch_invariant=True can't take a shared_gate: the gate's product with the tokens "
            "runs in XLA, whose reduction order may follow the batch"
        )


def _check_exchange(expert_exchange) -> None:
    if expert_exchange not in sharding.EXPERT_EXCHANGES:
        raise ValueError(f"expert_exchange must be one of {sharding.EXPERT_EXCHANGES}; got {expert_exchange!r}")


def _check_logits_match(router_logits, hidden_states, num_experts: int) -> None:
    expected = (*hidden_states.shape[:-1], num_experts)
    if tuple(router_logits.shape) != expected:
        raise ValueError(
            f"router_logits must have shape [..., E] = {_shape_str(expected)} (leading dims of "
            f"hidden_states, E of w_gate); got {_shape_str(router_logits.shape)}"
        )


def _check_choices(weights, ids, hidden_states, num_experts: int) -> None:
    """The routing a caller of ``moe_experts`` made: [..., k] weights and ids."""
    lead = hidden_states.shape[:-1]
    layout = _shape_str((*lead, "k"))
    for name, array in (("weights", weights), ("ids", ids)):
        if array.ndim != len(lead) + 1 or tuple(array.shape[:-1]) != lead:
            raise ValueError(
                f"{name} must have shape [..., k] = {layout} (the leading dims of hidden_states, then "
                f"each token's experts); got shape {_shape_str(array.shape)}"
            )
    if weights.shape != ids.shape:
        raise ValueError(
            f"weights and ids must have the same shape; got {_shape_str(weights.shape)} and "
            f"{_shape_str(ids.shape)}"
        )
    _check_float("weights", weights)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must have an integer dtype; got {ids.dtype}")
    if not 1 <= ids.shape[-1] <= num_experts:
        raise ValueError(
            f"ids: each token's number of experts (its last dim) must lie in [1, {num_experts}] (E of "
            f"w_gate); got {ids.shape[-1]}"
        )
    try:
        concrete = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:
        return  # traced: out-of-range ids poison their tokens instead (see moe_experts)
    if concrete.size and (concrete.min() < -1 or concrete.max() >= num_experts):
        raise ValueError(
            f"ids must lie in [0, {num_experts - 1}], or be -1 for a dropped pair; got values from "
            f"{concrete.min()} to {concrete.max()}"
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


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def route(router_logits, routing: Routing | None = None, *, selection_bias=None, backend: str = "auto",
          batch_invariant: bool = False, **routing_keywords):
    """Top-k routing of [..., E] logits.

    ``routing`` is a ``jax_moe.Routing``, or its fields come as keywords (``top_k=2, ...``).
    ``selection_bias``: [E], added to the scores to rank experts, not to weight them
    (DeepSeek-V3's ``e_score_correction_bias``); it gets no gradient. ``batch_invariant``: as
    ``fused_moe``'s.

    Returns ``(weights, ids)``: [..., top_k] float32 weights and [..., top_k] int32 expert ids, as
    ``jax_moe.reference.route``. Differentiable with respect to the logits. A token with a NaN
    logit (or, with softmax scoring, a +inf one) gets NaN weights.
    """
    _, routing = gather("route", routing=routing, keywords=routing_keywords, takes_experts=False)
    _check_router_logits(router_logits, routing, selection_bias)
    backend = _resolve_backend(backend)
    _check_batch_invariant(batch_invariant, backend, routing)
    body = functools.partial(_route_on_device, routing=routing, backend=backend, batch_invariant=batch_invariant)
    layout = sharding.layout_of(router_logits, (selection_bias,), backend=backend)
    if layout is not None:
        return sharding.route(layout, body, router_logits, selection_bias)
    return body(router_logits, selection_bias)


def _route_on_device(router_logits, selection_bias, *, routing: Routing, backend: str, batch_invariant: bool):
    """``route`` past its checks, on the arrays one device holds."""
    lead, num_experts = router_logits.shape[:-1], router_logits.shape[-1]
    num_tokens = math.prod(lead)
    if backend == "reference" or num_tokens == 0:
        return reference.route(router_logits, routing, selection_bias)
    weights, ids = pipeline.top_k_routing(
        router_logits.reshape(num_tokens, num_experts), selection_bias, routing=routing,
        launch=pipeline.launcher(backend), batch_invariant=batch_invariant,
    )
    weights, ids = drop_over_capacity(weights, ids, routing, num_experts)
    return weights.reshape(*lead, routing.top_k), ids.reshape(*lead, routing.top_k)


def moe_experts(hidden_states, weights, ids, w_gate=None, w_up=None, w_down=None, *,
                experts: ExpertWeights | None = None, activation: str | Activation = "silu",
                backend: str = "auto", save_activations: bool = False, expert_exchange: str = "all_gather",
                batch_invariant: bool = False, **expert_keywords):
    """The expert FFNs and combine for tokens routed by the caller.

    ``weights`` and ``ids`` are [..., k] (float and integer). An id of -1 is a dropped pair (as
    ``route`` returns with a capacity): it contributes nothing and its weight gets no gradient.
    Other concrete ids outside [0, E) raise ``ValueError``; under ``jax.jit`` they can't be
    checked, and the tokens holding them come out NaN rather than silently wrong. The experts
    come as ``experts=jax_moe.ExpertWeights(...)`` or as ``w_gate, w_up, w_down`` with the
    optional arrays as keywords (``gate_bias=...``); the other arguments are those of
    ``fused_moe``. Returns [..., H] in the dtype of
    ``hidden_states``. Differentiable with respect to everything but ``ids``.
    """
    experts, _ = gather(
        "moe_experts", w_gate=w_gate, w_up=w_up, w_down=w_down, experts=experts, keywords=expert_keywords,
        takes_routing=False,
    )
    _check_experts(hidden_states, experts)
    activation = Activation.of(activation)
    num_experts = experts.num_routed
    _check_choices(weights, ids, hidden_states, num_experts)
    backend = _resolve_backend(backend)
    valid = (ids >= 0) & (ids < num_experts)
    dropped = ids == -1
    weights = jnp.where(valid, weights.astype(jnp.float32), jnp.where(dropped, 0.0, jnp.nan))
    ids = jnp.where(valid | dropped, ids, 0).astype(jnp.int32)
    _check_batch_invariant(batch_invariant, backend, experts=experts)
    kernel_options = dict(save_activations=bool(save_activations), batch_invariant=bool(batch_invariant))
    body = functools.partial(_moe_experts_on_device, activation=activation, backend=backend, **kernel_options)
    _check_exchange(expert_exchange)
    experts = _frozen_weights(experts)
    layout = _layout(hidden_states, (weights, ids), experts, backend=backend, exchange=expert_exchange)
    if layout is not None:
        return sharding.moe_experts(layout, body, hidden_states, weights, ids, experts, backend=backend,
                                    activation=activation, **kernel_options)
    return body(hidden_states, weights, ids, experts)


def _moe_experts_on_device(hidden_states, weights, ids, experts: ExpertWeights, *, activation: Activation,
                           backend: str, save_activations: bool, batch_invariant: bool):
    """``moe_experts`` past its checks (ids in range or -1, weights float32, 0 where dropped), on
    one device's arrays."""
    if backend == "reference" or _is_empty(hidden_states, experts):
        return reference.moe_experts(hidden_states, weights, ids, experts, activation)
    # A dropped pair runs on expert 0 with weight 0: the kernels' combine waits for each of a
    # token's pairs, and a routing that drops is fused_moe's, which skips them instead.
    ids = jnp.maximum(ids, 0)
    num_tokens, hidden = math.prod(hidden_states.shape[:-1]), hidden_states.shape[-1]
    out = pipeline.moe_experts(
        hidden_states.reshape(num_tokens, hidden), weights.reshape(num_tokens, -1), ids.reshape(num_tokens, -1),
        experts, activation, backend=backend, save_activations=save_activations, batch_invariant=batch_invariant,
    )
    return out.reshape(hidden_states.shape)


def _is_empty(hidden_states, experts: ExpertWeights) -> bool:
    """No token, or no hidden or intermediate column: the kernels have nothing to compute, and
    the reference, which costs nothing then, gives the result (zeros, or with F = 0 the down
    biases' weighted sum)."""
    return hidden_states.size == 0 or experts.w_gate.shape[2] == 0


def fused_moe(hidden_states, router_logits, w_gate=None, w_up=None, w_down=None, *,
              experts: ExpertWeights | None = None, routing: Routing | None = None, selection_bias=None,
              activation: str | Activation = "silu", backend: str = "auto", save_activations: bool = False,
              expert_exchange: str = "all_gather", batch_invariant: bool = False, return_routing: bool = False,
              **keywords):
    """A whole Mixture-of-Experts layer: routing, dispatch, gated expert FFNs, weighted combine.

    The options come typed or flat, never both:

    * experts: ``experts=jax_moe.ExpertWeights(w_gate, w_up, w_down, ...)``, or ``w_gate, w_up,
      w_down`` positionally with the optional arrays as keywords (``gate_bias``, ``up_bias``,
      ``down_bias``, ``shared_w_gate``, ``shared_w_up``, ``shared_w_down``, ``shared_gate``);
    * routing: ``routing=jax_moe.Routing(top_k, ...)``, or its fields as keywords (``top_k``,
      ``scoring``, ``renormalize``, ``num_groups``, ``top_groups``, ``routed_scaling_factor``,
      ``capacity_factor``).

    ``jax_moe.ExpertWeights`` and ``jax_moe.Routing`` document every field.

    Args:
      hidden_states: [..., H] bfloat16, float16 or float32 activations.
      router_logits: [..., E] router logits, any float dtype (routing runs in float32).
      w_gate, w_up: [E, H, F]; w_down: [E, F, H]: expert weights, dtype of hidden_states, or
        ``jax_moe.QuantizedArray``s of these logical shapes, all of one ``jax_moe.Quantization``
        (shared experts included; biases and the shared gate stay float). Quantized weights are
        frozen: differentiating with respect to them raises ValueError.
      selection_bias: [E], added to the scores to rank experts, not to weight them (DeepSeek-V3's
        ``e_score_correction_bias``); gets no gradient.
      activation: "silu" (SwiGLU), "clamped_swiglu" (gpt-oss: alpha 1.702, limit 7), or a
        ``jax_moe.Activation``.
      backend: "triton", "interpret", "reference" or "auto" (triton where it can run, else the
        reference: on a CPU, "auto" runs the pure-JAX reference).
      save_activations: for the backward pass of the kernel backends, keep the gate and up
        pre-activations (``2 * rows * F`` elements, rows ~ T*top_k) instead of recomputing them;
        see ``pipeline.Plan``. The default saves only the dispatch metadata.
      expert_exchange: how expert parallelism (weights split on E over a mesh) brings the pairs to
        their experts' devices: "all_gather" (default; every backend) or "all_to_all" (GPUs);
        ``jax_moe.sharding.EXPERT_EXCHANGES`` describes both. Ignored on one device.
      batch_invariant: a token's output (and routing) is bitwise the same whatever else is in the
        batch: the kernels take the tiles of the largest batches at every size, so each reduction
        runs in one order. Kernel backends only (the reference's XLA dots promise no such thing),
        without a capacity (its drops follow the batch) or a shared gate (an XLA product). Small
        batches pay for it (see the benchmark guide).
      return_routing: also return the routed experts' routing, for auxiliary losses or logging
        (with a capacity, a dropped pair has id -1 and weight 0).

    Differentiable once with respect to hidden_states, router_logits (through the routing
    weights), the float expert weights, biases, shared experts and shared gate; the reference
    backend to any order.

    NaN: a token with a NaN router logit (or, with softmax scoring, a +inf one) gets NaN routing
    weights and a NaN output; other tokens are unaffected.

    Returns:
      [..., H] in the dtype of hidden_states:
      ``sum_k weight_k * (down_k(act(x @ gate_k + b, x @ up_k + b)) + b_down_k)`` plus the shared
      experts' weighted outputs; with ``return_routing``, the tuple ``(output, weights, ids)``
      with the [..., top_k] routing of ``route``.
    """
    experts, routing = gather(
        "fused_moe", w_gate=w_gate, w_up=w_up, w_down=w_down, experts=experts, routing=routing, keywords=keywords
    )
    _check_experts(hidden_states, experts)
    activation = Activation.of(activation)
    _check_logits_match(router_logits, hidden_states, experts.num_routed)
    _check_router_logits(router_logits, routing, selection_bias)
    backend = _resolve_backend(backend)
    _check_batch_invariant(batch_invariant, backend, routing, experts)
    kernel_options = dict(save_activations=bool(save_activations), batch_invariant=bool(batch_invariant))
    body = functools.partial(
        _fused_moe_on_device, routing=routing, activation=activation, backend=backend, **kernel_options
    )
    _check_exchange(expert_exchange)
    experts = _frozen_weights(experts)
    layout = _layout(hidden_states, (router_logits, selection_bias), experts, backend=backend, exchange=expert_exchange)
    if layout is not None:
        route_body = functools.partial(
            _route_on_device, routing=routing, backend=backend, batch_invariant=bool(batch_invariant)
        )
        out, weights, ids = sharding.fused_moe(
            layout, body, route_body, hidden_states, router_logits, selection_bias, experts, routing=routing,
            activation=activation, backend=backend, **kernel_options,
        )
    else:
        out, weights, ids = body(hidden_states, router_logits, selection_bias, experts)
    if return_routing:
        return out, weights, ids
    return out


def _fused_moe_on_device(hidden_states, router_logits, selection_bias, experts: ExpertWeights, *, routing: Routing,
                         activation: Activation, backend: str, save_activations: bool, batch_invariant: bool):
    """``fused_moe`` past its checks, on the arrays one device holds: (output, weights, ids)."""
    lead = hidden_states.shape[:-1]
    num_tokens, hidden = math.prod(lead), hidden_states.shape[-1]
    if backend == "reference" or _is_empty(hidden_states, experts):
        weights, ids = reference.route(router_logits, routing, selection_bias)
        return reference.moe_experts(hidden_states, weights, ids, experts, activation), weights, ids
    out, weights, ids = pipeline.fused_moe(
        hidden_states.reshape(num_tokens, hidden), router_logits.reshape(num_tokens, -1),
        selection_bias, experts, routing, activation, backend=backend,
        save_activations=save_activations, batch_invariant=batch_invariant,
    )
    return out.reshape(hidden_states.shape), *(a.reshape(*lead, routing.top_k) for a in (weights, ids))


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
