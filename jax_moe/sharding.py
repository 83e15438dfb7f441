"""Multi-device layouts of a layer call, read from the shardings of its arguments.

Under ``jax.jit``, an array on a mesh whose axes are Explicit (``jax.make_mesh``'s default) carries
its sharding in its type. ``layout_of`` reads the layout of one call from those types:

* data parallel: the leading (token) dims of ``hidden_states`` split over mesh axes. Each device
  routes and computes its own tokens; the output keeps their sharding.
* expert parallel: the E dim of ``w_gate`` split over mesh axes. Each device computes the pairs
  of its own experts only: the tokens and routing of the devices that split the experts are
  gathered, absent pairs (another device's experts) are skipped in dispatch, and each device's
  partial output is reduce-scattered back to the tokens' devices (summed where the tokens are not
  split over those axes).
* tensor parallel: the F dim of ``w_gate`` (``w_up``; ``w_down``'s second dim) split. Each device
  computes its F columns; the partial down projections are summed the same way.
* weights split on H (FSDP-style storage) are gathered by XLA before the call, outside the kernels.

``w_gate``'s sharding decides the expert and tensor axes; the other arguments are resharded to
match (``w_up``, ``w_down``, the biases, the shared experts: F split like the routed ones, the rest
replicated) and ``router_logits``, ``weights`` and ``ids`` to the token sharding of
``hidden_states``. Weight gradients are summed over the data axes by the transpose of
``jax.shard_map``.

Each call becomes one ``jax.shard_map`` over the whole mesh. With data parallelism alone its body is
the single-device layer on each device's shards; otherwise it is ``_sharded_experts``, which runs
the same kernels on the device's share of the pairs (``pipeline.Plan.partial_sum``).

Arrays on a mesh of Auto axes carry no sharding in their types. Outside ``jax.jit`` their own
shardings give the layout; under it, the triton backend's call is deferred to XLA's partitioner
(``Deferred``, ``_partitioned``), which hands it the shardings its arguments have there.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from jax_moe import pipeline, reference
from jax_moe.layer_math import shared_expert_weights, with_shared_experts
from jax_moe.options import Activation, ExpertWeights, Routing


# How expert parallelism brings each (token, expert) pair to the device holding the expert:
# * "all_gather": every device gathers the tokens and routing of the devices that split the
#   experts, computes the pairs of its own experts, and the partial outputs are reduce-scattered
#   back. Moves every token to every device of the group; runs on every backend.
# * "all_to_all": each device sends each pair's token row to the device of the pair's expert and
#   gets the weighted expert output back (``jax.lax.ragged_all_to_all``, both ways). Moves only
#   the rows the pairs need; XLA runs it on GPUs only. The receive buffer is sized for the worst
#   case (all pairs of the group on one device), or for the experts' capacity where the routing
#   has one.
EXPERT_EXCHANGES = ("all_gather", "all_to_all")
# Backends whose calls under jax.jit on a mesh of Auto axes are laid out when XLA partitions the
# program (``_partitioned``): custom calls can be placed per device there, host callbacks can't.
DEFERRED_BACKENDS = ("triton",)


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _entry(axes: tuple[str, ...]):
    """A PartitionSpec entry for these axes."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _spec(array) -> tuple:
    """The PartitionSpec entries of an array's type, one per dimension."""
    spec = tuple(getattr(getattr(jax.typeof(array), "sharding", None), "spec", None) or ())
    return spec + (None,) * (array.ndim - len(spec))


def _mesh(array):
    return getattr(getattr(jax.typeof(array), "sharding", None), "mesh", None)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one layer call is spread over a mesh: the PartitionSpec entries of the token dims of
    ``hidden_states`` (``batch``), and the mesh axes that split the experts (``expert``) and the
    intermediate dim F (``tensor``), and how the pairs reach the devices of their experts
    (``exchange``, one of ``EXPERT_EXCHANGES``)."""

    mesh: jax.sharding.AbstractMesh
    batch: tuple
    expert: tuple[str, ...] = ()
    tensor: tuple[str, ...] = ()
    exchange: str = "all_gather"

    def size(self, axes) -> int:
        return math.prod(self.mesh.shape[a] for a in axes)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        return tuple(a for entry in self.batch for a in _axes(entry))

    @property
    def gathered(self) -> tuple[str, ...]:
        """Axes that split both the tokens and one token's work: tokens are gathered over them
        and the outputs reduce-scattered back."""
        return tuple(a for a in self.batch_axes if a in self.expert + self.tensor)

    @property
    def summed(self) -> tuple[str, ...]:
        """Axes that split one token's work but not the tokens: the outputs are summed over them."""
        return tuple(a for a in self.expert + self.tensor if a not in self.batch_axes)

    @property
    def data_parallel_only(self) -> bool:
        return not self.expert and not self.tensor

    def specs(self, arrays: dict) -> dict:
        """The PartitionSpec of each named argument in this layout."""
        batch, expert, tensor = self.batch, _entry(self.expert), _entry(self.tensor)
        by_name = dict(
            hidden_states=(*batch, None), router_logits=(*batch, None), weights=(*batch, None),
            ids=(*batch, None), w_gate=(expert, None, tensor), w_up=(expert, None, tensor),
            w_down=(expert, tensor, None), gate_bias=(expert, tensor), up_bias=(expert, tensor),
            down_bias=(expert, None), shared_w_gate=(None, None, tensor), shared_w_up=(None, None, tensor),
            shared_w_down=(None, tensor, None), shared_gate=(None,), selection_bias=(None,),
        )
        return {name: PartitionSpec(*by_name[name]) for name in arrays}


@dataclasses.dataclass(frozen=True)
class Deferred:
    """A call under ``jax.jit`` on a mesh of Auto axes, whose types don't say how the arguments
    are split: its layout is read when XLA partitions the program (``_partitioned``), from the
    shardings the arguments have there. ``token_dims``: the leading dims of the first argument
    that are tokens."""

    mesh: jax.sharding.AbstractMesh
    token_dims: int
    exchange: str = "all_gather"


def layout_of(hidden_states, others=(), params: ExpertWeights | None = None, *,
              backend: str, exchange: str = "all_gather") -> Layout | Deferred | None:
    """The layout of a call from its arguments' shardings: None when no argument is sharded on a
    mesh of more than one device (then the call runs as on one device).

    ``hidden_states``: the activations (for ``route``: the router logits), whose leading dims are
    the tokens; ``others``: the other arrays (None allowed); ``params``: the expert weights;
    ``exchange``: see ``EXPERT_EXCHANGES`` (a ValueError where this layout can't use it).

    On a mesh of Explicit axes the arguments' types say how they are split. On a mesh of Auto
    axes, concrete arrays say it themselves; under ``jax.jit`` nothing does until XLA partitions
    the program: the backends of ``DEFERRED_BACKENDS`` then get a ``Deferred`` layout; the
    reference backend gets none (XLA partitions it by itself) and the interpret backend none
    either, with a warning (XLA can't place its host callbacks per device there).
    """
    arrays = [a for a in (hidden_states, *others, *(params or ())) if a is not None]
    # Under jax.jit, arrays placed by in_shardings carry no mesh on Auto axes: the context mesh
    # (jax.set_mesh) names it then.
    meshes = [m for m in (*map(_mesh, arrays), jax.sharding.get_abstract_mesh())
              if m is not None and not m.empty and math.prod(m.shape.values()) > 1]
    if not meshes:
        return None
    mesh = meshes[0]
    if mesh.manual_axes:
        return None  # already per device: inside a shard_map
    spec_of = _spec
    if not mesh.explicit_axes:
        if any(isinstance(a, jax.core.Tracer) for a in arrays):
            if backend in DEFERRED_BACKENDS:
                return Deferred(mesh, hidden_states.ndim - 1, exchange)
            if backend != "reference":
                warnings.warn(
                    f'jax_moe: under jax.jit on a mesh of Auto axes the {backend} backend runs as one '
                    f'program over whole arrays (its host callbacks can\'t run inside XLA\'s partitioner). '
                    f'Use a mesh of Explicit axes (jax.make_mesh\'s default) or jax.sharding.explicit_axes.',
                    stacklevel=3,
                )
            return None
        spec_of = _concrete_spec
    if not any(entry is not None for a in arrays for entry in spec_of(a)):
        return None
    expert = tensor = ()
    if params is not None:
        expert_entry, _, tensor_entry = spec_of(params.w_gate)
        expert, tensor = _axes(expert_entry), _axes(tensor_entry)
    layout = Layout(mesh, spec_of(hidden_states)[:-1], expert, tensor, exchange)
    if exchange == "all_to_all" and expert:
        _check_all_to_all(layout)
    return layout


def _concrete_spec(array) -> tuple:
    """The PartitionSpec entries of a concrete array's own sharding, one per dimension."""
    sharding = getattr(array, "sharding", None)
    spec = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    return spec + (None,) * (array.ndim - len(spec))


def _check_all_to_all(layout: Layout) -> None:
    split = [a for a in layout.expert if a in layout.batch_axes]
    if split and len(split) < len(layout.expert):
        raise ValueError(
            f'expert_exchange="all_to_all": the tokens must be split over all of the expert axes '
            f'{layout.expert} or none of them; they are split over {tuple(split)} only'
        )
    if split and not ragged_all_to_all_available():
        raise ValueError(
            f'expert_exchange="all_to_all" needs XLA\'s ragged all-to-all, which the '
            f'{jax.default_backend()} backend lacks (it runs on GPUs); use "all_gather"'
        )


def ragged_all_to_all_available() -> bool:
    """Whether XLA on the default backend runs ``jax.lax.ragged_all_to_all`` (XLA:CPU does not)."""
    return jax.default_backend() != "cpu"


def _shard_map(layout: Layout, body, arrays: dict, out_specs):
    """``body(arrays)`` on each device's shards of ``arrays`` (None entries dropped), resharded
    to ``layout.specs`` first where their types differ."""
    arrays = {name: a for name, a in arrays.items() if a is not None}
    specs = layout.specs(arrays)
    mesh = _device_mesh(arrays.values(), layout.mesh)
    resharded = {}
    for name, array in arrays.items():
        if _mesh(array) != layout.mesh or _spec(array) != tuple(specs[name]) + (None,) * (
            array.ndim - len(specs[name])
        ):
            place = jax.sharding.reshard if isinstance(array, jax.core.Tracer) else jax.device_put
            array = place(array, NamedSharding(mesh, specs[name]))
        resharded[name] = array
    # check_vma=False: the kernels' outputs (callbacks, custom calls) carry no per-device types.
    # Transposing then psums the cotangent of every argument over the axes it is replicated on.
    return jax.shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=out_specs, check_vma=False)(resharded)


def _device_mesh(arrays, mesh):
    """The devices' mesh of a concrete argument on ``mesh`` (outside ``jax.jit`` the other
    arguments are put on it), else ``mesh`` itself (under ``jax.jit`` they are resharded onto it)."""
    for array in arrays:
        if isinstance(array, jax.Array) and not isinstance(array, jax.core.Tracer):
            device_mesh = getattr(array.sharding, "mesh", None)
            if device_mesh is not None and not device_mesh.empty and device_mesh.abstract_mesh == mesh:
                return device_mesh
    return mesh


def _token_spec(layout: Layout) -> PartitionSpec:
    return PartitionSpec(*layout.batch, None)


def _experts(arrays: dict) -> ExpertWeights:
    return ExpertWeights(**{name: arrays.get(name) for name in ExpertWeights._fields})


def route(layout: Layout | Deferred, body, router_logits, selection_bias):
    """``body(router_logits, selection_bias)`` (``jax_moe.route`` past its checks, on one device's
    arrays) on each device's tokens: (weights, ids)."""

    def per_device_of(layout: Layout):
        return lambda a: body(a["router_logits"], a.get("selection_bias"))

    return _run(layout, per_device_of, dict(router_logits=router_logits, selection_bias=selection_bias), 2)


def moe_experts(layout: Layout | Deferred, body, hidden_states, weights, ids, experts: ExpertWeights, *,
                activation: Activation, backend: str, save_activations: bool, batch_invariant: bool = False):
    """``jax_moe.moe_experts`` past its checks (ids valid, weights float32) in ``layout``: with data
    parallelism alone ``body(hidden_states, weights, ids, experts)`` on each device's shards."""
    num_routed = experts.num_routed

    def per_device_of(layout: Layout):
        def per_device(arrays):
            args = (arrays["hidden_states"], arrays["weights"], arrays["ids"], _experts(arrays))
            if layout.data_parallel_only:
                return body(*args)
            return _sharded_experts(layout, *args, num_routed=num_routed, activation=activation, backend=backend,
                                    save_activations=save_activations, batch_invariant=batch_invariant)

        return per_device

    arrays = dict(hidden_states=hidden_states, weights=weights, ids=ids, **experts._asdict())
    return _run(layout, per_device_of, arrays, 1)


def fused_moe(layout: Layout | Deferred, body, route_body, hidden_states, router_logits, selection_bias,
              experts: ExpertWeights, *, routing: Routing, activation: Activation, backend: str,
              save_activations: bool, batch_invariant: bool = False):
    """``jax_moe.fused_moe`` past its checks in ``layout``: (output, weights, ids). With data
    parallelism alone each device runs ``body(hidden_states, router_logits, selection_bias,
    experts)`` on its shards; otherwise it routes its tokens with ``route_body(router_logits,
    selection_bias)`` and computes its share of the pairs (``_sharded_experts``)."""
    num_routed = experts.num_routed

    def per_device_of(layout: Layout):
        def per_device(arrays):
            x, logits, bias = arrays["hidden_states"], arrays["router_logits"], arrays.get("selection_bias")
            local = _experts(arrays)
            if layout.data_parallel_only:
                return body(x, logits, bias, local)
            weights, ids = route_body(logits, bias)
            out = _sharded_experts(
                layout, x, weights, ids, local, num_routed=num_routed, activation=activation, backend=backend,
                save_activations=save_activations, batch_invariant=batch_invariant,
                capacity=routing.expert_capacity(math.prod(x.shape[:-1]), num_routed),
            )
            return out, weights, ids

        return per_device

    arrays = dict(hidden_states=hidden_states, router_logits=router_logits, selection_bias=selection_bias,
                  **experts._asdict())
    return _run(layout, per_device_of, arrays, 3)


def _run(layout: Layout | Deferred, per_device_of, arrays: dict, num_outputs: int):
    """``per_device_of(layout)`` on each device's shards of ``arrays`` (the first one holds the
    tokens in its leading dims), its ``num_outputs`` outputs sharded as the tokens: one
    ``jax.shard_map`` for a known layout, a ``_partitioned`` op for a deferred one."""
    if isinstance(layout, Deferred):
        return _partitioned(layout, per_device_of, arrays, num_outputs)
    spec = _token_spec(layout)
    return _shard_map(layout, per_device_of(layout), arrays, spec if num_outputs == 1 else (spec,) * num_outputs)


# --------------------------------------------------------------------------------------------
# Meshes of Auto axes: the layout is read when XLA partitions the program
# --------------------------------------------------------------------------------------------

# Factors of the Shardy rule of each argument, after the token dims (named t0, t1, ...). The
# weights' factors are their own: a dim the weights share with the activations (H, E) is not tied
# to theirs, so that no sharding of the weights spreads to the activations or back.
_RULE_FACTORS = dict(
    hidden_states="h", router_logits="l", weights="k", ids="k", w_gate="we wh wf", w_up="we wh wf",
    w_down="we wf wh", gate_bias="we wf", up_bias="we wf", down_bias="we wh", shared_w_gate="ws wh wf",
    shared_w_up="ws wh wf", shared_w_down="ws wf wh", shared_gate="wh", selection_bias="b",
)
_TOKEN_ARRAYS = ("hidden_states", "router_logits", "weights", "ids")


def _sharding_rule(names, ranks, out_factors, token_results=None) -> tuple[str, tuple[str, ...]]:
    """The einsum-like Shardy rule of a partitioned op over the arguments ``names`` (the first
    holds the tokens, ``ranks[0] - 1`` leading dims of them) and its reduction factors (those of no
    result, in order of first appearance, as Shardy wants them). Each result has the token dims
    and then its ``out_factors`` entry, or with ``token_results[i]`` False only that entry."""
    tokens = [f"t{i}" for i in range(ranks[0] - 1)]

    def factors(name):
        return " ".join(tokens * (name in _TOKEN_ARRAYS) + [_RULE_FACTORS[name]])

    token_results = token_results or [True] * len(out_factors)
    operands = [factors(name) for name in names]
    results = [
        " ".join(tokens * is_token + [factor])
        for factor, is_token in zip(out_factors, token_results)
    ]
    rule = ", ".join(operands) + " -> " + ", ".join(results)
    in_result = set(" ".join(results).split())
    order = list(dict.fromkeys(" ".join(operands).split()))
    return rule, tuple(f for f in order if f not in in_result)


def _layout_of_shardings(deferred: Deferred, mesh, names, shardings) -> Layout:
    """The layout the partitioner's shardings of the arguments ask for: the token dims of the
    first argument, the E and F dims of ``w_gate`` (see ``layout_of``)."""
    specs = {name: tuple(sharding.spec) + (None,) * 3 for name, sharding in zip(names, shardings)}
    expert = tensor = ()
    if "w_gate" in specs:
        expert, tensor = _axes(specs["w_gate"][0]), _axes(specs["w_gate"][2])
    layout = Layout(mesh.abstract_mesh, specs[names[0]][: deferred.token_dims], expert, tensor, deferred.exchange)
    if deferred.exchange == "all_to_all" and expert:
        _check_all_to_all(layout)
    return layout


def _unmentioned(layout: Layout, spec: PartitionSpec) -> tuple[str, ...]:
    """The mesh axes that do not split an array of this spec: it is replicated over them."""
    mentioned = {a for entry in spec for a in _axes(entry)}
    return tuple(a for a in layout.mesh.axis_names if a not in mentioned)


def _partitioned(deferred: Deferred, per_device_of, arrays: dict, num_outputs: int):
    """``per_device_of(layout)`` over the mesh, with ``layout`` read from the shardings XLA's
    partitioner gives the arguments (``jax.experimental.custom_partitioning``, with a Shardy rule):
    what ``_shard_map`` does for a layout known at trace time. Differentiable: the backward pass is
    a second partitioned op that recomputes the forward on each device and transposes it as
    ``jax.shard_map`` would (cotangents of replicated outputs split, gradients of replicated
    arguments summed)."""
    names = tuple(name for name, a in arrays.items() if a is not None)
    values = tuple(arrays[name] for name in names)
    token_dims = deferred.token_dims

    def as_tuple(out):
        return tuple(out) if num_outputs > 1 else (out,)

    def local(layout: Layout):
        per_device = per_device_of(layout)
        return lambda *v: as_tuple(per_device(dict(zip(names, v))))

    one_device = local(Layout(deferred.mesh, (None,) * token_dims))
    out_avals = jax.eval_shape(one_device, *values)
    float_in = [jnp.issubdtype(v.dtype, jnp.floating) for v in values]
    float_out = [jnp.issubdtype(a.dtype, jnp.floating) for a in out_avals]
    out_factors = ("h",) + ("k",) * (num_outputs - 1) if "hidden_states" in names else ("k",) * num_outputs

    def layout_and_specs(mesh, arg_shapes):
        layout = _layout_of_shardings(deferred, mesh, names, [a.sharding for a in arg_shapes[: len(names)]])
        specs = layout.specs(dict(zip(names, values)))
        return layout, [NamedSharding(mesh, specs[name]) for name in names]

    def token_shardings(mesh, layout, count):
        return (NamedSharding(mesh, _token_spec(layout)),) * count

    def partition_forward(mesh, arg_shapes, result_shape):
        layout, arg_shardings = layout_and_specs(mesh, arg_shapes)
        return mesh, local(layout), token_shardings(mesh, layout, num_outputs), tuple(arg_shardings)

    def infer_forward(mesh, arg_shapes, result_shape):
        layout, _ = layout_and_specs(mesh, arg_shapes)
        return token_shardings(mesh, layout, num_outputs)

    forward = custom_partitioning(one_device)
    rule, reduced = _sharding_rule(names, [v.ndim for v in values], out_factors)
    forward.def_partition(partition=partition_forward, infer_sharding_from_operands=infer_forward,
                          sharding_rule=rule, reduction_factors=reduced)

    def gradients(fn, split=1.0, summed_over=None):
        """The float arguments' gradients of ``fn`` for the float outputs' cotangents ``cts``."""

        def grads(*values_and_cts):
            v, cts = values_and_cts[: len(names)], iter(values_and_cts[len(names):])
            outs, vjp = jax.vjp(fn, *v)
            full = tuple(next(cts) / split if is_float else np.zeros(o.shape, jax.dtypes.float0)
                         for is_float, o in zip(float_out, outs))
            out = [g for g, is_float in zip(vjp(full), float_in) if is_float]
            if summed_over is not None:
                out = [jax.lax.psum(g, axes) if axes else g for g, axes in zip(out, summed_over)]
            return tuple(out)

        return grads

    def partition_backward(mesh, arg_shapes, result_shape):
        layout, arg_shardings = layout_and_specs(mesh, arg_shapes)
        num_float_out = sum(float_out)
        split = layout.size(_unmentioned(layout, _token_spec(layout)))
        summed_over = [_unmentioned(layout, s.spec) for s, f in zip(arg_shardings, float_in) if f]
        grad_shardings = tuple(s for s, f in zip(arg_shardings, float_in) if f)
        lower = gradients(local(layout), split, summed_over)
        return mesh, lower, grad_shardings, (*arg_shardings, *token_shardings(mesh, layout, num_float_out))

    def infer_backward(mesh, arg_shapes, result_shape):
        _, arg_shardings = layout_and_specs(mesh, arg_shapes)
        return tuple(s for s, f in zip(arg_shardings, float_in) if f)

    backward = custom_partitioning(gradients(one_device))
    grad_names = [name for name, f in zip(names, float_in) if f]
    ct_names = [("hidden_states" if factor == "h" else "weights") for factor, f in zip(out_factors, float_out) if f]
    rule, reduced = _sharding_rule(
        [*names, *ct_names], [v.ndim for v in values] + [a.ndim for a, f in zip(out_avals, float_out) if f],
        [_RULE_FACTORS[name] for name in grad_names], token_results=[name in _TOKEN_ARRAYS for name in grad_names],
    )
    backward.def_partition(partition=partition_backward, infer_sharding_from_operands=infer_backward,
                           sharding_rule=rule, reduction_factors=reduced)

    @jax.custom_vjp
    def op(*v):
        return forward(*v)

    def op_forward(*v):
        return forward(*v), v

    def op_backward(v, cts):
        grads = iter(backward(*v, *(c for c, f in zip(cts, float_out) if f)))
        return tuple(next(grads) if f else None for f in float_in)

    op.defvjp(op_forward, op_backward)
    outs = op(*values)
    return outs if num_outputs > 1 else outs[0]


def _sharded_experts(layout: Layout, hidden_states, weights, ids, params: ExpertWeights, *,
                     num_routed: int, activation: Activation, backend: str, save_activations: bool,
                     batch_invariant: bool = False, capacity: int | None = None):
    """One device's part of an expert- or tensor-parallel layer: [..., H] local tokens with their
    [..., k] routing (id -1: a dropped pair), ``params`` the device's shards of the weights,
    ``num_routed`` the global E, ``capacity`` the routing's expert capacity (``Routing``) if any.

    The tokens of the devices that split the work (``layout.gathered``) are gathered, except over
    expert axes whose pairs are exchanged (``_exchanged_pairs``). With gathered tokens, the pairs
    of this device's experts ``[first, first + E_local)`` keep their ids, shifted to
    ``[0, E_local)``; a shared expert's pair stays on one device of the expert axes per token (the
    tokens split into equal runs, one per device); every other pair is absent (id -1). The
    partial outputs are reduce-scattered over the gathered axes and summed over ``layout.summed``.
    """
    lead, hidden = hidden_states.shape[:-1], hidden_states.shape[-1]
    x = hidden_states.reshape(-1, hidden)
    num_tokens = x.shape[0]
    weights = weights.reshape(num_tokens, ids.shape[-1]).astype(jnp.float32)
    ids = ids.reshape(num_tokens, ids.shape[-1]).astype(jnp.int32)
    top_k = ids.shape[-1]
    if params.num_shared:
        shared = shared_expert_weights(x, params.num_shared, params.shared_gate)
        weights, ids = with_shared_experts(weights, ids, num_routed, shared)
    params = params._replace(shared_gate=None)
    if layout.tensor and params.has_bias:
        # Every F shard adds the down bias to its partial sum: only the first one keeps it.
        first_shard = jax.lax.axis_index(layout.tensor) == 0
        params = params._replace(down_bias=jnp.where(first_shard, params.down_bias, 0))

    def local_pairs(x, weights, ids, layer_top_k=None):
        if backend == "reference":
            return _reference_partial(x, weights, ids, params, activation)
        return pipeline.moe_experts(
            x, weights, ids, params, activation, backend=backend, save_activations=save_activations,
            shared_in_ids=True, partial_sum=True, layer_top_k=layer_top_k, batch_invariant=batch_invariant,
        )

    exchanged = _exchanged(layout)
    gathered = tuple(a for a in layout.gathered if a not in exchanged)
    routed_tokens = num_tokens
    if gathered:
        x, weights, ids = (jax.lax.all_gather(a, gathered, axis=0, tiled=True) for a in (x, weights, ids))
    if exchanged:
        per_expert = None if capacity is None else capacity * x.shape[0] // routed_tokens
        out = _exchanged_pairs(
            layout, x, weights, ids, local_pairs, num_routed=num_routed, num_local=params.num_routed,
            top_k=top_k, routed_per_expert=per_expert,
        )
    else:
        out = local_pairs(x, weights, _local_ids(layout, ids, num_routed=num_routed, num_local=params.num_routed))
    if gathered:
        out = jax.lax.psum_scatter(out, gathered, scatter_dimension=0, tiled=True)
    if layout.summed:
        out = jax.lax.psum(out, layout.summed)
    return out.astype(hidden_states.dtype).reshape(*lead, hidden)


def _exchanged(layout: Layout) -> tuple[str, ...]:
    """The expert axes over which pairs are exchanged (all-to-all) rather than tokens gathered."""
    if layout.exchange == "all_to_all" and set(layout.expert) <= set(layout.batch_axes):
        return layout.expert
    return ()


def _ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    return jax.lax.ragged_all_to_all(
        operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name=axis_name
    )


def _exchanged_pairs(layout: Layout, x, weights, ids, local_pairs, *, num_routed: int, num_local: int, top_k: int,
                     routed_per_expert: int | None):
    """The expert-axis exchange of ``expert_exchange="all_to_all"``: [T, H] tokens with [T, K]
    routing (global ids; shared experts ``E + s`` after the ``top_k`` routed slots; -1 dropped)
    -> [T, H] float32, each token's sum over its pairs.

    Each pair goes to the device of its expert (a shared expert's stays here), its token row, id
    and weight sorted by destination and sent with ``ragged_all_to_all``; the receiver runs
    ``local_pairs`` on its rows, one pair each, and sends the weighted output rows back the same
    way. ``routed_per_expert``: the most routed pairs of these T tokens one expert takes (the
    capacity), which bounds the receive buffer; None: every routed pair of every device may come.
    """
    axes = layout.expert
    peers = layout.size(axes)
    rank = jax.lax.axis_index(axes)
    num_tokens, slots = ids.shape
    num_shared = slots - top_k
    flat_ids = ids.reshape(-1)
    destination = jnp.where(flat_ids >= num_routed, rank, flat_ids // num_local)
    destination = jnp.where(flat_ids < 0, peers, destination)  # dropped pairs sort last, unsent
    order = jnp.argsort(destination, stable=True)
    send_sizes = jnp.zeros(peers + 1, jnp.int32).at[destination].add(1)[:peers]
    sizes = jax.lax.all_gather(send_sizes, axes)  # [sender, receiver]
    send_starts = jnp.cumsum(sizes, axis=1) - sizes  # where a sender's rows for each receiver start
    recv_starts = jnp.cumsum(sizes, axis=0) - sizes  # where they land in the receiver's buffer

    routed_from_peer = num_tokens * top_k
    if routed_per_expert is not None:
        routed_from_peer = min(routed_from_peer, num_local * routed_per_expert)
    buffer_rows = peers * routed_from_peer + num_tokens * num_shared

    def there(rows, fill):
        return _ragged_all_to_all(
            rows, jnp.full((buffer_rows, *rows.shape[1:]), fill, rows.dtype), send_starts[rank], send_sizes,
            recv_starts[rank], sizes[:, rank], axis_name=axes,
        )

    pair_token = order // slots
    recv_x = there(x[pair_token], 0)
    recv_weights = there(weights.reshape(-1)[order], 0.0)
    recv_ids = there(flat_ids[order], -1)
    local_ids = jnp.where(recv_ids >= num_routed, recv_ids - num_routed + num_local, recv_ids - rank * num_local)
    local_ids = jnp.where(recv_ids >= 0, local_ids, -1)
    rows = local_pairs(recv_x, recv_weights[:, None], local_ids[:, None], layer_top_k=top_k)
    back = _ragged_all_to_all(
        rows, jnp.zeros((num_tokens * slots, rows.shape[1]), rows.dtype), recv_starts[:, rank], sizes[:, rank],
        send_starts[:, rank], send_sizes, axis_name=axes,
    )
    # back[i] is the output of pair order[i]; the dropped pairs' rows stay zero.
    pair_rows = jnp.zeros_like(back).at[order].set(back)
    return jnp.sum(pair_rows.reshape(num_tokens, slots, -1).astype(jnp.float32), axis=1)


def _local_ids(layout: Layout, ids, *, num_routed: int, num_local: int):
    """Global expert ids (routed ``[0, E)``, shared ``E + s``) -> this device's: its routed experts
    ``[0, E_local)``, shared experts ``E_local + s`` for the tokens it owns, -1 (absent) else."""
    rank = jax.lax.axis_index(layout.expert) if layout.expert else 0
    first = rank * num_local
    num_tokens = ids.shape[0]
    owner = jnp.arange(num_tokens) * layout.size(layout.expert) // max(num_tokens, 1)
    routed = (ids >= first) & (ids < first + num_local)
    shared = (ids >= num_routed) & (owner == rank)[:, None]
    return jnp.where(routed, ids - first, jnp.where(shared, ids - num_routed + num_local, -1))


def _reference_partial(x, weights, ids, params: ExpertWeights, activation: Activation):
    """``reference.moe_experts`` over this device's experts (shared ones numbered after the
    routed ones, as in ``_local_ids``); absent pairs (id -1) weigh nothing."""
    present = ids >= 0
    weights, ids = jnp.where(present, weights, 0.0), jnp.where(present, ids, 0)
    if params.num_shared:
        params = reference.shared_as_routed(params)
    return reference.moe_experts(x, weights, ids, params, activation)
