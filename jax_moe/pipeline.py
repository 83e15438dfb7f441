"""The fused layer as kernel launches: route, dispatch, gate/up, down + combine, and the backward.
At decode sizes route and dispatch are one launch (``route_and_dispatch``).

Forward and backward are written once against a ``launch`` function (``backend_triton.launch`` on the GPU,
``backend_interpret.launch`` on the CPU), so both backends run the same kernels with the same
grids. Every size here is static at trace time; grids cover the worst case any routing can need
and the kernels let surplus programs exit, so nothing waits on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import triton

from jax_moe import kernels, reference
from jax_moe.options import SILU, Activation, Routing
from jax_moe.tile_configs import GemmTiles, TileConfig, WeightGradTiles

Launch = Callable[..., tuple[jax.Array, ...]]

# Pairs a dispatch program ranks at once; the rank computation holds a [RANK, RANK] comparison.
DISPATCH_RANK_BLOCK = 128
# Every dispatch program histograms all the pairs, so the kernel's work grows with programs x
# pairs: large layers place up to DISPATCH_MAX_CHUNK pairs per program, for about
# DISPATCH_CHUNK_PROGRAMS programs. Fewer programs make each one's chain of steps longer. (H100,
# ncu: DeepSeek-V3 at T = 8192, 73728 pairs, took 449 us in 576 programs of 128 pairs and 169 us
# in 105 of up to 2048; Qwen3 at T = 2048 16 us in 128 programs of 128 pairs and 26 us in 64 of 256.)
DISPATCH_MAX_CHUNK = 2048
DISPATCH_CHUNK_PROGRAMS = 128
# Rows a dispatch program describes per step, as whole row blocks.
DISPATCH_ROWS_PER_STEP = 1024
# Most expert ids a dispatch program histograms per step (of all NUM_PAIRS, in every program).
DISPATCH_HIST_BLOCK = 4096
# Smallest padded expert count: keeps the routing and dispatch tiles out of degenerate layouts.
MIN_EXPERTS_PAD = 16
# Elements of the [BLOCK_T, EXPERTS_PAD] logits tile of one routing program (BLOCK_T at most
# next_power_of_2(T): decode routes 1-8 tokens). The program is one warp: its ~30 dependent row
# reductions (DeepSeek-V3's groups) then never cross warps through shared memory and barriers,
# and 16 elements a thread keep it to few instructions per token.
ROUTE_TILE_ELEMENTS = 512
ROUTE_WARPS = 1
# Up to this many pairs, routing and dispatch run as one program of ROUTE_WARPS warps
# (route_dispatch_kernel): one launch instead of two at decode sizes. Its dispatch describes the
# row blocks at most ROUTE_DISPATCH_TILE_ELEMENTS (block x expert) comparisons at a time.
ROUTE_DISPATCH_MAX_PAIRS = 64
ROUTE_DISPATCH_TILE_ELEMENTS = 2048


def experts_pad(num_experts: int) -> int:
    return max(MIN_EXPERTS_PAD, triton.next_power_of_2(num_experts))


def max_row_blocks(num_experts: int, num_pairs: int, block_m: int) -> int:
    """Most row blocks any routing can fill: each non-empty expert wastes at most one partial block."""
    return min(num_experts, num_pairs) + triton.cdiv(num_pairs, block_m)


@functools.cache
def _differentiable_route(routing: Routing, launch: Launch, num_shared: int, dispatch_block_m: int | None):
    """The routing launch as a differentiable op: ``route_kernel``, or with ``dispatch_block_m``
    ``route_dispatch_kernel`` (three more outputs: the dispatch metadata for that row block)."""

    @jax.custom_vjp
    def route_op(logits, selection_bias):
        num_tokens, num_experts = logits.shape
        padded = experts_pad(num_experts)
        block_t = max(1, min(64, ROUTE_TILE_ELEMENTS // padded, triton.next_power_of_2(num_tokens)))
        slots = routing.top_k + num_shared
        routing_shapes = (
            jax.ShapeDtypeStruct((num_tokens, slots), jnp.float32),
            jax.ShapeDtypeStruct((num_tokens, slots), jnp.int32),
        )
        if dispatch_block_m is None:
            kernel, out_shapes, dispatch_args = kernels.route_kernel, routing_shapes, {}
            grid = triton.cdiv(num_tokens, block_t)
        else:
            dispatch_shapes, dispatch_args = _one_program_dispatch(
                num_tokens * slots, num_experts + num_shared, dispatch_block_m
            )
            kernel, out_shapes, grid = kernels.route_dispatch_kernel, routing_shapes + dispatch_shapes, 1
        return launch(
            kernel,
            logits,
            logits if selection_bias is None else selection_bias,
            out_shapes=out_shapes,
            grid=(grid,),
            num_warps=ROUTE_WARPS,
            NUM_TOKENS=num_tokens,
            NUM_EXPERTS=num_experts,
            EXPERTS_PAD=padded,
            TOP_K=routing.top_k,
            TOP_K_PAD=triton.next_power_of_2(routing.top_k),
            SCORING=routing.scoring,
            HAS_SELECTION_BIAS=selection_bias is not None,
            NUM_GROUPS=routing.num_groups,
            GROUPS_PAD=triton.next_power_of_2(routing.num_groups),
            TOP_GROUPS=routing.kept_groups,
            RENORMALIZE=routing.renormalize,
            SCALING_FACTOR=float(routing.scaling_factor),
            NUM_SHARED=num_shared,
            SHARED_PAD=triton.next_power_of_2(max(1, num_shared)),
            BLOCK_T=block_t,
            **dispatch_args,
        )

    def forward(logits, selection_bias):
        (logits,) = _first_order_only(logits)
        outputs = route_op(logits, selection_bias)
        return outputs, (logits, outputs[1])

    def backward(residuals, cotangents):
        logits, ids = residuals
        grad_weights = cotangents[0]  # the rest are integers: no gradient
        # The shared experts' slots weigh a constant 1: only the routed ones have a gradient.
        ids, grad_weights = ids[:, : routing.top_k], grad_weights[:, : routing.top_k]
        logits, grad_weights = _first_order_only(logits, grad_weights)
        _, pullback = jax.vjp(lambda l: reference.route_weights(l, ids, routing), logits)
        # The selection bias only changes which experts win: no gradient flows to it.
        return (*pullback(grad_weights), None)

    route_op.defvjp(forward, backward)
    return route_op


def route(logits: jax.Array, selection_bias: jax.Array | None, *, routing: Routing, launch: Launch,
          num_shared: int = 0):
    """[T, E] logits -> ([T, top_k + num_shared] float32 weights, [T, top_k + num_shared] int32
    expert ids): the routed choices, then the ``num_shared`` shared experts (ids ``E + s``, weight
    1) as ``experts`` takes them.

    Differentiable with respect to the logits through the routed weights.
    """
    if selection_bias is not None:
        selection_bias = jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
    return _differentiable_route(routing, launch, num_shared, None)(logits, selection_bias)


def routes_and_dispatches(num_pairs: int) -> bool:
    """Whether ``route_and_dispatch`` takes this many pairs (shared experts' included)."""
    return num_pairs <= ROUTE_DISPATCH_MAX_PAIRS


def route_and_dispatch(logits: jax.Array, selection_bias: jax.Array | None, *, routing: Routing, launch: Launch,
                       num_shared: int, block_m: int):
    """``route`` and ``dispatch`` of its expert ids (``num_experts = E + num_shared``) in one
    launch, for at most ROUTE_DISPATCH_MAX_PAIRS pairs: ``(weights, ids, (sorted_pairs,
    block_expert, expert_row_end))``, the last three as ``experts`` takes them."""
    num_pairs = logits.shape[0] * (routing.top_k + num_shared)
    if not routes_and_dispatches(num_pairs):
        raise ValueError(f"route_and_dispatch takes at most {ROUTE_DISPATCH_MAX_PAIRS} pairs; got {num_pairs}")
    if selection_bias is not None:
        selection_bias = jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
    weights, ids, *dispatched = _differentiable_route(routing, launch, num_shared, block_m)(logits, selection_bias)
    return weights, ids, tuple(dispatched)


def _dispatch_layout(num_pairs: int, num_experts: int, block_m: int, rank_block: int, tile_elements: int | None = None):
    """What both dispatch launches share: their outputs' shapes, and the constexprs that size the
    kernel's steps (at most ``tile_elements`` block x expert comparisons a step, when given)."""
    blocks = max_row_blocks(num_experts, num_pairs, block_m)
    padded = experts_pad(num_experts)
    blocks_per_step = min(triton.next_power_of_2(blocks), max(1, DISPATCH_ROWS_PER_STEP // block_m))
    if tile_elements is not None:
        blocks_per_step = min(blocks_per_step, max(1, tile_elements // padded))
    shapes = (
        jax.ShapeDtypeStruct((blocks * block_m,), jnp.int32),
        jax.ShapeDtypeStruct((blocks,), jnp.int32),
        jax.ShapeDtypeStruct((padded,), jnp.int32),
    )
    return shapes, dict(
        BLOCK_M=block_m,
        MAX_BLOCKS=blocks,
        RANK_BLOCK=min(rank_block, max(16, triton.next_power_of_2(num_pairs))),
        BLOCKS_PER_STEP=blocks_per_step,
    )


def _one_program_dispatch(num_pairs: int, num_experts: int, block_m: int):
    """``route_dispatch_kernel``'s dispatch outputs and constexprs."""
    shapes, sizes = _dispatch_layout(
        num_pairs, num_experts, block_m, DISPATCH_RANK_BLOCK, ROUTE_DISPATCH_TILE_ELEMENTS
    )
    hist_block = max(sizes["RANK_BLOCK"], triton.next_power_of_2(num_pairs))
    return shapes, dict(sizes, SLOT_EXPERTS_PAD=experts_pad(num_experts), HIST_BLOCK=hist_block)


def dispatch(expert_ids: jax.Array, *, num_experts: int, block_m: int, launch: Launch,
             hist_block: int = DISPATCH_HIST_BLOCK, rank_block: int = DISPATCH_RANK_BLOCK,
             chunk_programs: int = DISPATCH_CHUNK_PROGRAMS):
    """[T, top_k] expert ids -> sorted_pairs [MAX_BLOCKS * block_m], block_expert [MAX_BLOCKS],
    expert_row_end [EXPERTS_PAD]. See ``kernels.dispatch_kernel`` for their layout. The keyword
    sizes are the kernel's; tests make them small to reach every path at small sizes."""
    num_pairs = expert_ids.size
    shapes, sizes = _dispatch_layout(num_pairs, num_experts, block_m, rank_block)
    chunk = max(
        sizes["RANK_BLOCK"],
        min(DISPATCH_MAX_CHUNK, triton.next_power_of_2(triton.cdiv(num_pairs, chunk_programs))),
    )
    num_programs = max(
        triton.cdiv(num_pairs, chunk), triton.cdiv(sizes["MAX_BLOCKS"], sizes["BLOCKS_PER_STEP"])
    )
    return launch(
        kernels.dispatch_kernel,
        expert_ids.reshape(num_pairs),
        out_shapes=shapes,
        grid=(num_programs,),
        num_warps=4,
        NUM_PAIRS=num_pairs,
        EXPERTS_PAD=experts_pad(num_experts),
        CHUNK=chunk,
        NUM_PROGRAMS=num_programs,
        HIST_BLOCK=min(hist_block, max(chunk, triton.next_power_of_2(num_pairs))),
        **sizes,
    )


@jax.custom_jvp
def _first_order_only(*arrays):
    """Identity on the inputs of a custom_vjp rule, refusing to be differentiated itself: only
    second-order differentiation ever differentiates the rules."""
    return arrays


@_first_order_only.defjvp
def _no_second_derivatives(primals, tangents):
    raise NotImplementedError(
        "jax_moe: the triton and interpret backends differentiate once; higher-order derivatives "
        "(grad of grad, jvp of a gradient, hessians) are not supported. Use backend='reference' "
        "for those."
    )


class ExpertWeights(NamedTuple):
    """The expert parameters one layer call reads. Optional parts are ``None``.

    ``w_gate``, ``w_up`` [E, H, F] and ``w_down`` [E, F, H]: the routed experts. ``gate_bias``,
    ``up_bias`` [E, F] and ``down_bias`` [E, H]: their biases (all three or none). ``shared_*``:
    S shared experts in the same layouts ([S, H, F], [S, F, H]), expert ids ``E .. E + S - 1``.
    """

    w_gate: jax.Array
    w_up: jax.Array
    w_down: jax.Array
    gate_bias: jax.Array | None = None
    up_bias: jax.Array | None = None
    down_bias: jax.Array | None = None
    shared_w_gate: jax.Array | None = None
    shared_w_up: jax.Array | None = None
    shared_w_down: jax.Array | None = None

    @property
    def num_routed(self) -> int:
        return self.w_gate.shape[0]

    @property
    def num_shared(self) -> int:
        return 0 if self.shared_w_gate is None else self.shared_w_gate.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None

    def shared_or_routed(self):
        """The shared weight arrays, or the routed ones standing in (never read) when there are none."""
        if self.shared_w_gate is None:
            return self.w_gate, self.w_up, self.w_down
        return self.shared_w_gate, self.shared_w_up, self.shared_w_down


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one layer call: tiles, dot precision, launcher, activation, residuals.

    ``save_activations=False`` (default) keeps only the dispatch metadata as residuals (about
    ``4 * (rows + row blocks + E)`` bytes, rows ~ ``T*k + E*block_m``) and recomputes the gate
    and up projections in the backward pass: one more pair of GEMMs. ``True`` stores both
    pre-activations instead: ``2 * rows * F`` elements of the activation dtype (Mixtral at
    T = 8192, bf16: 0.94 GB per layer).

    ``partial_sum=True``: the call computes one device's share of the layer (expert or tensor
    parallelism, ``jax_moe.sharding``). Expert ids < 0 mark absent pairs (another device's
    experts), which get no rows and zero routing-weight gradients. The down projection and the
    input gradient write each pair's row, and XLA sums a token's present rows: the result is in
    ``_partial_dtype`` (float32, or bfloat16 for bf16 activations), the dtype the caller then
    sums across devices in.
    """

    config: TileConfig
    dot_precision: str
    launch: Launch
    save_activations: bool = False
    activation: Activation = SILU
    partial_sum: bool = False

    def activation_args(self) -> dict:
        return dict(
            ACTIVATION=self.activation.name,
            ALPHA=float(self.activation.alpha),
            LIMIT=float(self.activation.limit),
        )


def _partial_dtype(out_dtype):
    """The dtype of per-pair partial rows: bf16 halves their traffic for bf16 outputs (and rounds
    each term as the bf16 output rounds their sum); fp16 keeps fp32, as a term may overflow where
    the sum does not."""
    return jnp.bfloat16 if jnp.dtype(out_dtype) == jnp.bfloat16 else jnp.float32


def _combined_rows(plan: Plan, num_tokens: int, top_k: int) -> tuple[int, int]:
    """(output rows, slots per row) of the combine launches: a token's ``top_k`` pairs summed in
    the kernel, or with ``partial_sum`` one row per pair (each its own one-slot token), summed by
    ``_sum_present_pairs``."""
    return (num_tokens * top_k, 1) if plan.partial_sum else (num_tokens, top_k)


def _sum_present_pairs(pair_rows, ids):
    """[T * k, N] rows of each pair -> [T, N]: the sum of each token's rows whose id is >= 0 (an
    absent pair's row is never written), in float32, returned in the rows' dtype."""
    rows = pair_rows.reshape(*ids.shape, -1).astype(jnp.float32)
    return jnp.sum(jnp.where((ids >= 0)[..., None], rows, 0.0), axis=1).astype(pair_rows.dtype)


def _half_blocks(plan: Plan) -> bool:
    """Whether the gate/up and down/combine kernels (forward, and the input gradient's combine)
    compute only the first half of a row block whose second half is padding: where that half is
    still at least one warpgroup's 64-row MMA."""
    return plan.config.block_m >= 128


def _row_block_args(plan: Plan, tiles, *, num_pairs: int, top_k: int, blocks: int, num_routed: int) -> dict:
    """Launch options and constexprs shared by the kernels that work per row block."""
    return dict(
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        NUM_PAIRS=num_pairs,
        TOP_K=top_k,
        NUM_ROUTED=num_routed,
        MAX_BLOCKS=blocks,
        BLOCK_M=plan.config.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=plan.config.group_m,
        DOT_PRECISION=plan.dot_precision,
    )


def _arrival_counters(num_tokens: int, n_dim: int, tiles: GemmTiles, top_k: int) -> int:
    """How many arrival counters ``_combine`` needs: one per token and column tile, none when each
    token has one expert (the kernel then writes the output directly)."""
    return num_tokens * triton.cdiv(n_dim, tiles.block_n) if top_k > 1 else 0


def _zeros_for(counters: int, grid: int):
    """The zeros output of a kernel that zeroes ``counters`` int32s for the next launch
    (``kernels._zero_fill``) over ``grid`` programs: its shape and constexprs."""
    return jax.ShapeDtypeStruct((max(1, counters),), jnp.int32), dict(
        NUM_ZEROS=counters, ZERO_BLOCK=triton.next_power_of_2(max(1, triton.cdiv(counters, grid)))
    )


def _combine(plan: Plan, tiles: GemmTiles, a, b, shared_b, a2, b2, shared_b2, bias, routing_weights,
             sorted_pairs, block_expert, expert_row_end, zeroed_arrivals, *, num_tokens: int, top_k: int,
             num_routed: int, k_dim: int, n_dim: int, transposed_b: bool, second_term: bool, scale: bool,
             out_dtype):
    """One launch of ``expert_gemm_combine_kernel``: [T, n_dim] in ``out_dtype``.
    ``zeroed_arrivals``: ``_arrival_counters`` zeros, made by the launch before."""
    blocks = block_expert.shape[0]
    col_tiles = triton.cdiv(n_dim, tiles.block_n)
    combines = top_k > 1  # with one expert per token the kernel writes the output directly
    # The partial rows are written once and read back once: in bf16 for bf16 outputs (Qwen3's
    # T = 4096 forward, H100: 1123 -> 1058 us).
    partial_dtype = _partial_dtype(out_dtype)
    inputs = (
        a, b, shared_b, a2, b2, shared_b2, a if bias is None else bias, routing_weights,
        sorted_pairs, block_expert, expert_row_end, zeroed_arrivals,
    )
    out, _, _ = plan.launch(
        kernels.expert_gemm_combine_kernel,
        *inputs,
        out_shapes=(
            jax.ShapeDtypeStruct((num_tokens, n_dim), out_dtype),
            jax.ShapeDtypeStruct((num_tokens * top_k, n_dim) if combines else (1, 1), partial_dtype),
            jax.ShapeDtypeStruct(zeroed_arrivals.shape, zeroed_arrivals.dtype),
        ),
        grid=(blocks * col_tiles,),
        in_place_zeros={len(inputs) - 1: 2} if combines else {},
        K=k_dim,
        N=n_dim,
        STRIDE_BK=1 if transposed_b else n_dim,
        STRIDE_BN=k_dim if transposed_b else 1,
        SECOND_TERM=second_term,
        HAS_BIAS=bias is not None,
        SCALE_BY_ROUTING_WEIGHT=scale,
        HALF_BLOCKS=_half_blocks(plan),
        **_row_block_args(
            plan, tiles, num_pairs=num_tokens * top_k, top_k=top_k, blocks=blocks, num_routed=num_routed
        ),
    )
    return out


def _experts_forward(plan: Plan, x, weights, ids, params: ExpertWeights, dispatched):
    num_tokens, hidden = x.shape
    num_experts = params.num_routed + params.num_shared
    intermediate = params.w_gate.shape[2]
    top_k = ids.shape[1]
    block_m = plan.config.block_m
    blocks = max_row_blocks(num_experts, num_tokens * top_k, block_m)
    if dispatched is None:
        dispatched = dispatch(ids, num_experts=num_experts, block_m=block_m, launch=plan.launch)
    sorted_pairs, block_expert, expert_row_end = dispatched
    if sorted_pairs.shape != (blocks * block_m,):
        raise ValueError(
            f"dispatched: the metadata is for {sorted_pairs.shape[0]} rows, the plan's tiles need "
            f"{blocks * block_m} ({blocks} blocks of {block_m})"
        )
    shared_w_gate, shared_w_up, shared_w_down = params.shared_or_routed()
    rows_shape = (blocks * block_m, intermediate) if plan.save_activations else (1, 1)
    tiles = plan.config.gate_up
    grid = blocks * triton.cdiv(intermediate, tiles.block_n)
    out_rows, combine_k = _combined_rows(plan, num_tokens, top_k)
    zeros_shape, zero_args = _zeros_for(_arrival_counters(out_rows, hidden, plan.config.down, combine_k), grid)
    act, gate_preact, up_preact, zeroed_arrivals = plan.launch(
        kernels.gate_up_kernel,
        x, params.w_gate, params.w_up, shared_w_gate, shared_w_up,
        *((params.gate_bias, params.up_bias) if params.has_bias else (x, x)),
        sorted_pairs, block_expert, expert_row_end,
        out_shapes=(
            jax.ShapeDtypeStruct((blocks * block_m, intermediate), x.dtype),
            jax.ShapeDtypeStruct(rows_shape, x.dtype),
            jax.ShapeDtypeStruct(rows_shape, x.dtype),
            zeros_shape,
        ),
        grid=(grid,),
        HIDDEN=hidden,
        INTERMEDIATE=intermediate,
        HAS_BIAS=params.has_bias,
        SAVE_PREACTIVATIONS=plan.save_activations,
        HALF_BLOCKS=_half_blocks(plan),
        **zero_args,
        **plan.activation_args(),
        **_row_block_args(
            plan, tiles, num_pairs=num_tokens * top_k, top_k=top_k, blocks=blocks,
            num_routed=params.num_routed,
        ),
    )
    flat_weights = weights.reshape(-1)
    out = _combine(
        plan, plan.config.down, act, params.w_down, shared_w_down, act, params.w_down, shared_w_down,
        params.down_bias, flat_weights, sorted_pairs, block_expert, expert_row_end, zeroed_arrivals,
        num_tokens=out_rows, top_k=combine_k, num_routed=params.num_routed, k_dim=intermediate,
        n_dim=hidden, transposed_b=False, second_term=False, scale=True,
        out_dtype=_partial_dtype(x.dtype) if plan.partial_sum else x.dtype,
    )
    if plan.partial_sum:
        out = _sum_present_pairs(out, ids)
    saved = (gate_preact, up_preact) if plan.save_activations else None
    return out, (x, flat_weights, ids, params, sorted_pairs, block_expert, expert_row_end, saved)


def _experts_backward(plan: Plan, residuals, grad_out):
    x, flat_weights, ids, params, sorted_pairs, block_expert, expert_row_end, saved = residuals
    x, flat_weights, params, saved, grad_out = _first_order_only(
        x, flat_weights, params, saved, grad_out.astype(x.dtype)
    )
    num_tokens, hidden = x.shape
    num_routed = params.num_routed
    intermediate = params.w_gate.shape[2]
    top_k = ids.shape[1]
    num_pairs = num_tokens * top_k
    rows = sorted_pairs.shape[0]
    blocks = block_expert.shape[0]
    tiles = plan.config.gate_up_backward
    f_tiles = triton.cdiv(intermediate, tiles.block_n)
    shared_w_gate, shared_w_up, shared_w_down = params.shared_or_routed()
    gate_preact, up_preact = saved if saved is not None else (x, x)  # unread when recomputing
    grid = blocks * f_tiles
    out_rows, combine_k = _combined_rows(plan, num_tokens, top_k)
    zeros_shape, zero_args = _zeros_for(_arrival_counters(out_rows, hidden, plan.config.input_grad, combine_k), grid)
    weighted_act, grad_gate, grad_up, grad_weight_parts, zeroed_arrivals = plan.launch(
        kernels.gate_up_backward_kernel,
        x, params.w_gate, params.w_up, params.w_down, shared_w_gate, shared_w_up, shared_w_down,
        *((params.gate_bias, params.up_bias) if params.has_bias else (x, x)),
        grad_out, flat_weights, gate_preact, up_preact, sorted_pairs, block_expert, expert_row_end,
        out_shapes=(
            jax.ShapeDtypeStruct((rows, intermediate), x.dtype),
            jax.ShapeDtypeStruct((rows, intermediate), x.dtype),
            jax.ShapeDtypeStruct((rows, intermediate), x.dtype),
            jax.ShapeDtypeStruct((num_pairs, f_tiles), jnp.float32),
            zeros_shape,
        ),
        grid=(grid,),
        HIDDEN=hidden,
        INTERMEDIATE=intermediate,
        HAS_BIAS=params.has_bias,
        RECOMPUTE=saved is None,
        **zero_args,
        **plan.activation_args(),
        **_row_block_args(
            plan, tiles, num_pairs=num_pairs, top_k=top_k, blocks=blocks, num_routed=num_routed
        ),
    )
    grad_x = _combine(
        plan, plan.config.input_grad, grad_gate, params.w_gate, shared_w_gate, grad_up, params.w_up, shared_w_up,
        None, flat_weights, sorted_pairs, block_expert, expert_row_end, zeroed_arrivals,
        num_tokens=out_rows, top_k=combine_k, num_routed=num_routed, k_dim=intermediate, n_dim=hidden,
        transposed_b=True, second_term=True, scale=False,
        out_dtype=_partial_dtype(x.dtype) if plan.partial_sum else x.dtype,
    )
    if plan.partial_sum:
        grad_x = _sum_present_pairs(grad_x, ids).astype(x.dtype)
    common = dict(
        routing_weights=flat_weights, sorted_pairs=sorted_pairs, expert_row_end=expert_row_end,
        params=params, top_k=top_k,
    )
    grad_w_down, grad_shared_w_down, _, _, grad_down_bias, _ = _weight_grad(
        plan, plan.config.down_weight_grad, weighted_act, grad_out, None, m_dim=intermediate, n_dim=hidden,
        a_by_token=False, b_by_token=True, weighted_bias_grad=True, **common,
    )
    grad_w_gate, grad_shared_w_gate, grad_w_up, grad_shared_w_up, grad_gate_bias, grad_up_bias = _weight_grad(
        plan, plan.config.gate_up_weight_grad, x, grad_gate, grad_up, m_dim=hidden, n_dim=intermediate,
        a_by_token=True, b_by_token=False, weighted_bias_grad=False, **common,
    )
    grad_weights = jnp.sum(grad_weight_parts, axis=1).reshape(num_tokens, top_k)
    if params.has_bias:
        # A routed expert's output includes its down bias: <bias[e], grad_out[t]> joins the
        # routing weight's gradient (shared experts have no bias).
        bias_dots = jnp.einsum(
            "th,eh->te", grad_out, params.down_bias.astype(x.dtype), preferred_element_type=jnp.float32
        )
        is_routed = (ids >= 0) & (ids < num_routed)
        grad_weights += jnp.where(
            is_routed, jnp.take_along_axis(bias_dots, jnp.where(is_routed, ids, 0), axis=1), 0.0
        )
    if plan.partial_sum:
        grad_weights = jnp.where(ids >= 0, grad_weights, 0.0)  # absent pairs' parts were never written
    has_bias, has_shared = params.has_bias, params.num_shared > 0
    grad_params = ExpertWeights(
        grad_w_gate, grad_w_up, grad_w_down,
        *((grad_gate_bias, grad_up_bias, grad_down_bias) if has_bias else (None, None, None)),
        *((grad_shared_w_gate, grad_shared_w_up, grad_shared_w_down) if has_shared else (None, None, None)),
    )
    return grad_x, grad_weights, None, grad_params, None


def _weight_grad(plan: Plan, tiles: WeightGradTiles, a, b, b2, *, routing_weights, sorted_pairs, expert_row_end,
                 params: ExpertWeights, top_k: int, m_dim: int, n_dim: int, a_by_token: bool, b_by_token: bool,
                 weighted_bias_grad: bool):
    """One launch of ``expert_weight_grad_kernel``: the routed [E, m_dim, n_dim] and shared
    [S, m_dim, n_dim] gradients for ``b`` and (``DUAL``) ``b2``, and with biases the [E, n_dim]
    bias gradients of both. Outputs that don't apply are 1-element placeholders."""
    dual = b2 is not None
    num_routed, num_shared = params.num_routed, params.num_shared
    placeholder = jax.ShapeDtypeStruct((1,), a.dtype)

    def maybe(condition, shape, dtype=a.dtype):
        return jax.ShapeDtypeStruct(shape, dtype) if condition else placeholder

    routed = jax.ShapeDtypeStruct((num_routed, m_dim, n_dim), a.dtype)
    shared = maybe(num_shared > 0, (num_shared, m_dim, n_dim))
    bias_dtype = params.gate_bias.dtype if params.has_bias else a.dtype
    return plan.launch(
        kernels.expert_weight_grad_kernel,
        a, b, b2 if dual else b, routing_weights, sorted_pairs, expert_row_end,
        out_shapes=(
            routed,
            shared,
            routed if dual else placeholder,
            shared if dual else placeholder,
            maybe(params.has_bias, (num_routed, n_dim), bias_dtype),
            maybe(params.has_bias and dual, (num_routed, n_dim), bias_dtype),
        ),
        grid=(
            (num_routed + num_shared)
            * triton.cdiv(m_dim, tiles.block_m)
            * triton.cdiv(n_dim, tiles.block_n),
        ),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        NUM_PAIRS=routing_weights.shape[0],
        TOP_K=top_k,
        NUM_ROUTED=num_routed,
        M=m_dim,
        N=n_dim,
        A_BY_TOKEN=a_by_token,
        B_BY_TOKEN=b_by_token,
        DUAL=dual,
        BIAS_GRAD=params.has_bias,
        WEIGHTED_BIAS_GRAD=weighted_bias_grad,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=tiles.group_m,
        DOT_PRECISION=plan.dot_precision,
    )


@functools.cache
def _differentiable_experts(plan: Plan):
    # Without differentiation nothing reads the residuals: never store pre-activations then.
    inference_plan = dataclasses.replace(plan, save_activations=False)

    @jax.custom_vjp
    def experts_op(x, weights, ids, params, dispatched):
        return _experts_forward(inference_plan, x, weights, ids, params, dispatched)[0]

    def forward(x, weights, ids, params, dispatched):
        x, weights, params = _first_order_only(x, weights, params)
        return _experts_forward(plan, x, weights, ids, params, dispatched)

    experts_op.defvjp(forward, functools.partial(_experts_backward, plan))
    return experts_op


def experts(x, weights, expert_ids, params: ExpertWeights, *, plan: Plan, dispatched=None) -> jax.Array:
    """Expert FFNs and combine for [T, H] tokens routed to ``expert_ids`` with ``weights``
    ([T, k] each; ids ``>= E`` name the shared experts). ``dispatched``: the ids' dispatch
    metadata if ``route_and_dispatch`` made it already, else it is made here.

    Differentiable (once) with respect to x, weights and every expert parameter.
    """
    return _differentiable_experts(plan)(x, weights.astype(jnp.float32), expert_ids, params, dispatched)
