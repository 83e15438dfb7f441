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

Arrays on a mesh of Auto axes carry no sharding in their types: ``jax.sharding.explicit_axes``
gives a call explicit ones.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
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


def layout_of(hidden_states, others=(), params: ExpertWeights | None = None, *,
              backend: str, exchange: str = "all_gather") -> Layout | None:
    """The layout of a call from its arguments' types: None when no argument is sharded on an
    Explicit mesh of more than one device (then the call runs as on one device).

    ``hidden_states``: the activations (for ``route``: the router logits), whose leading dims are
    the tokens; ``others``: the other arrays (None allowed); ``params``: the expert weights;
    ``exchange``: see ``EXPERT_EXCHANGES`` (a ValueError where this layout can't use it). On a
    mesh of Auto axes the kernel backends warn: the kernels would run once over whole arrays (XLA
    partitions the reference backend by itself).
    """
    arrays = [a for a in (hidden_states, *others, *(params or ())) if a is not None]
    meshes = [m for m in map(_mesh, arrays) if m is not None and not m.empty and math.prod(m.shape.values()) > 1]
    if not meshes:
        return None
    mesh = meshes[0]
    if mesh.manual_axes:
        return None  # already per device: inside a shard_map
    if not mesh.explicit_axes:
        if backend == "reference":
            return None
        warnings.warn(
            "jax_moe: the arguments live on a mesh of Auto axes, whose types don't say how they "
            "are sharded: the layer runs as one program over whole arrays. Use a mesh of Explicit "
            "axes (jax.make_mesh's default) or jax.sharding.explicit_axes to spread it over the mesh.",
            stacklevel=3,
        )
        return None
    if not any(entry is not None for a in arrays for entry in _spec(a)):
        return None
    expert = tensor = ()
    if params is not None:
        expert_entry, _, tensor_entry = _spec(params.w_gate)
        expert, tensor = _axes(expert_entry), _axes(tensor_entry)
    layout = Layout(mesh, _spec(hidden_states)[:-1], expert, tensor, exchange)
    if exchange == "all_to_all" and expert:
        _check_all_to_all(layout)
    return layout


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


def route(layout: Layout, body, router_logits, selection_bias):
    """``body(router_logits, selection_bias)`` (``jax_moe.route`` past its checks, on one device's
    arrays) on each device's tokens."""
    spec = _token_spec(layout)
    return _shard_map(
        layout, lambda a: body(a["router_logits"], a.get("selection_bias")),
        dict(router_logits=router_logits, selection_bias=selection_bias), (spec, spec),
    )


def moe_experts(layout: Layout, body, hidden_states, weights, ids, experts: ExpertWeights, *,
                activation: Activation, backend: str, save_activations: bool):
    """``jax_moe.moe_experts`` past its checks (ids valid, weights float32) in ``layout``: with data
    parallelism alone ``body(hidden_states, weights, ids, experts)`` on each device's shards."""
    num_routed = experts.num_routed

    def per_device(arrays):
        args = (arrays["hidden_states"], arrays["weights"], arrays["ids"], _experts(arrays))
        if layout.data_parallel_only:
            return body(*args)
        return _sharded_experts(layout, *args, num_routed=num_routed, activation=activation, backend=backend,
                                save_activations=save_activations)

    arrays = dict(hidden_states=hidden_states, weights=weights, ids=ids, **experts._asdict())
    return _shard_map(layout, per_device, arrays, _token_spec(layout))


def fused_moe(layout: Layout, body, route_body, hidden_states, router_logits, selection_bias,
              experts: ExpertWeights, *, routing: Routing, activation: Activation, backend: str,
              save_activations: bool):
    """``jax_moe.fused_moe`` past its checks in ``layout``: (output, weights, ids). With data
    parallelism alone each device runs ``body(hidden_states, router_logits, selection_bias,
    experts)`` on its shards; otherwise it routes its tokens with ``route_body(router_logits,
    selection_bias)`` and computes its share of the pairs (``_sharded_experts``)."""
    num_routed = experts.num_routed

    def per_device(arrays):
        x, logits, bias, local = arrays["hidden_states"], arrays["router_logits"], arrays.get("selection_bias"), _experts(arrays)
        if layout.data_parallel_only:
            return body(x, logits, bias, local)
        weights, ids = route_body(logits, bias)
        out = _sharded_experts(
            layout, x, weights, ids, local, num_routed=num_routed, activation=activation, backend=backend,
            save_activations=save_activations, capacity=routing.expert_capacity(math.prod(x.shape[:-1]), num_routed),
        )
        return out, weights, ids

    arrays = dict(hidden_states=hidden_states, router_logits=router_logits, selection_bias=selection_bias,
                  **experts._asdict())
    spec = _token_spec(layout)
    return _shard_map(layout, per_device, arrays, (spec, spec, spec))


def _sharded_experts(layout: Layout, hidden_states, weights, ids, params: ExpertWeights, *,
                     num_routed: int, activation: Activation, backend: str, save_activations: bool,
                     capacity: int | None = None):
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
            shared_in_ids=True, partial_sum=True, layer_top_k=layer_top_k,
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
