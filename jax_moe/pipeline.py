"""The fused layer as kernel launches, and the plan that decides how one call runs.

``fused_moe`` and ``moe_experts`` (and ``top_k_routing``, for ``jax_moe.route``) are what
``jax_moe.api`` calls for the kernel backends, after its checks, with 2-D ``[T, ...]`` arrays.
They make the call's ``Plan`` (``make_plan``: tiles from the tables, dot precision, launcher,
TMA) and decide the launches:

* routing and dispatch are one launch (``route_and_dispatch``) at decode sizes, else two;
* ungated shared experts are appended to every token's choices by the routing kernel itself; a
  gated one (Qwen2-MoE) takes its weight from the activations, in XLA, before dispatch;
* then the gate/up kernel and the down + combine kernel (``experts``).

Forward and backward are written once against a ``launch`` function (``backend_triton.launch`` on
the GPU, ``backend_interpret.launch`` on the CPU), so both backends run the same kernels with the
same grids. Every size here is static at trace time; grids cover the worst case any routing can
need and the kernels let surplus programs exit, so nothing waits on the host.

Absent optional operands follow one convention: an input the kernel does not read (its constexpr
switch is off) is passed as ``_absent(dtype)``, one element of the dtype the kernel would read;
an output it does not write is declared as ``_absent_output(dtype)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import triton

from jax_moe import kernels, stacks, tile_configs
from jax_moe.layer_math import drop_over_capacity, route_weights, shared_expert_weights, with_shared_experts
from jax_moe.options import SILU, Activation, ExpertWeights, Routing
from jax_moe.quantization import Quantization, QuantizedArray, activation_block, fake_quantize_activations
from jax_moe.tile_configs import GemmTiles, TileConfig, WeightGradTiles

Launch = Callable[..., tuple[jax.Array, ...]]

# Pairs a dispatch program ranks at once; the rank computation holds a [RANK, RANK] comparison.
DISPATCH_RANK_BLOCK = 128
# Every dispatch program histograms all the pairs, so the kernel's work grows with programs x
# pairs: large layers place up to DISPATCH_MAX_CHUNK pairs per program, for about
# DISPATCH_CHUNK_PROGRAMS programs. Fewer programs make each one's chain of steps longer
# (the trade-off is measured in benchmarks/README.md).
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
def _differentiable_route(routing: Routing, launch: Launch, num_shared: int, dispatch_block_m: int | None,
                          batch_invariant: bool = False):
    """The routing launch as a differentiable op: ``route_kernel``, or with ``dispatch_block_m``
    ``route_dispatch_kernel`` (three more outputs: the dispatch metadata for that row block).
    ``batch_invariant``: the token tile is the same for any number of tokens, and so is the
    order of every row's reductions."""

    @jax.custom_vjp
    def route_op(logits, selection_bias):
        num_tokens, num_experts = logits.shape
        padded = experts_pad(num_experts)
        most_tokens = 64 if batch_invariant else triton.next_power_of_2(num_tokens)
        block_t = max(1, min(64, ROUTE_TILE_ELEMENTS // padded, most_tokens))
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
            _absent(jnp.float32) if selection_bias is None else selection_bias,
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
            SCALING_FACTOR=float(routing.routed_scaling_factor),
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
        _, pullback = jax.vjp(lambda l: route_weights(l, ids, routing), logits)
        # The selection bias only changes which experts win: no gradient flows to it.
        return (*pullback(grad_weights), None)

    route_op.defvjp(forward, backward)
    return route_op


def top_k_routing(logits: jax.Array, selection_bias: jax.Array | None, *, routing: Routing, launch: Launch,
                  num_shared: int = 0, batch_invariant: bool = False):
    """[T, E] logits -> ([T, top_k + num_shared] float32 weights, [T, top_k + num_shared] int32
    expert ids): the routed choices, then the ``num_shared`` shared experts (ids ``E + s``, weight
    1) as ``experts`` takes them. ``batch_invariant``: see ``make_plan``.

    Differentiable with respect to the logits through the routed weights.
    """
    if selection_bias is not None:
        selection_bias = jax.lax.stop_gradient(selection_bias.astype(jnp.float32))
    return _differentiable_route(routing, launch, num_shared, None, batch_invariant)(logits, selection_bias)


def routes_and_dispatches(num_pairs: int) -> bool:
    """Whether ``route_and_dispatch`` takes this many pairs (shared experts' included)."""
    return num_pairs <= ROUTE_DISPATCH_MAX_PAIRS


def route_and_dispatch(logits: jax.Array, selection_bias: jax.Array | None, *, routing: Routing, launch: Launch,
                       num_shared: int, block_m: int):
    """``top_k_routing`` and ``dispatch`` of its expert ids (``num_experts = E + num_shared``) in one
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


def _absent(dtype) -> jax.Array:
    """An optional input the kernel does not read: one element of the dtype it would read."""
    return jnp.zeros((1,), dtype)


def _absent_output(dtype) -> jax.ShapeDtypeStruct:
    """An output the kernel does not write."""
    return jax.ShapeDtypeStruct((1,), dtype)


# A scale block at least this long spans a whole matrix dimension: the kernels' scales per tensor
# or per output column, and per token for fp8 activations.
WHOLE = 2**30
WEIGHT_NAMES = ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down")


def _scheme(params: ExpertWeights) -> Quantization | None:
    """The quantization of every expert matrix (``jax_moe.api`` checked they share it), or None."""
    return params.w_gate.scheme if isinstance(params.w_gate, QuantizedArray) else None


def _act_fp8(params: ExpertWeights) -> bool:
    scheme = _scheme(params)
    return scheme is not None and scheme.activations == "fp8"


def _quantization_args(params: ExpertWeights, *, act_fp8: bool) -> dict:
    """The kernels' quantization constexprs (``kernels.gate_up_kernel`` documents them); ``act_fp8``:
    the launch's activation operand is fp8 (the forward GEMMs of a w8a8 layer)."""
    scheme = _scheme(params)
    if scheme is None:
        return dict(W_FORMAT="none", SCALE_BLOCK_K=WHOLE, SCALE_BLOCK_N=WHOLE, HAS_ZEROS=False, ACT_FP8=False,
                    ACT_BLOCK=WHOLE)
    block_k, block_n = {"tensor": (WHOLE, WHOLE), "channel": (WHOLE, 1), "block": (scheme.block_size,) * 2,
                        "group": (scheme.group_size, 1)}[scheme.granularity]
    return dict(W_FORMAT=scheme.format, SCALE_BLOCK_K=block_k, SCALE_BLOCK_N=block_n, HAS_ZEROS=scheme.zero_point,
                ACT_FP8=act_fp8, ACT_BLOCK=activation_block(scheme) or WHOLE)


def _kernel_weights(params: ExpertWeights) -> dict[str, tuple[jax.Array, jax.Array, jax.Array]]:
    """The six weights the row-block kernels take (routed gate, up, down, then the shared ones,
    which the kernels read only for ids >= E), each as ``(values, scales, zero points)``: float
    weights have absent scales and zero points, fp8 values travel as their bytes, and whatever a
    layer lacks is absent (never read)."""
    operands = {}
    for name in WEIGHT_NAMES:
        w = getattr(params, name)
        if w is None:
            operands[name] = tuple(_absent(part.dtype) for part in operands["w_gate"])
        elif isinstance(w, QuantizedArray):
            values = jax.lax.bitcast_convert_type(w.values, jnp.uint8) if w.scheme.format == "fp8" else w.values
            operands[name] = (values, w.scales, _absent(jnp.float32) if w.zeros is None else w.zeros)
        else:
            operands[name] = (w, _absent(jnp.float32), _absent(jnp.float32))
    return operands


def _fp8_activations(a, params: ExpertWeights):
    """``a`` as the fp8 GEMMs of a w8a8 layer read it: (e4m3 bytes, float32 scales per row and
    ``ACT_BLOCK`` channels), from ``quantization.fake_quantize_activations`` (in XLA, before the
    launch). The reference backend rounds activations the same way."""
    scheme = _scheme(params)
    values, scales = fake_quantize_activations(a, activation_block(scheme))
    return jax.lax.bitcast_convert_type(values, jnp.uint8), scales


def _biases(params: ExpertWeights, dtype) -> tuple[jax.Array, jax.Array]:
    """The gate and up biases the gate/up kernels take (read only with ``HAS_BIAS``)."""
    return (params.gate_bias, params.up_bias) if params.has_bias else (_absent(dtype), _absent(dtype))


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one layer call: tiles, dot precision, launcher, activation, residuals.

    ``save_activations=False`` (default) keeps only the dispatch metadata as residuals (about
    ``4 * (rows + row blocks + E)`` bytes, rows ~ ``T*k + E*block_m``) and recomputes the gate
    and up projections in the backward pass: one more pair of GEMMs. ``True`` stores both
    pre-activations instead: ``2 * rows * F`` elements of the activation dtype (Mixtral at
    T = 8192, bf16: 0.94 GB per layer). ``make_plan`` makes the plan of a call.

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
    tma: bool = False  # the config asks for TMA weight tiles and the backend can give them
    partial_sum: bool = False

    def activation_args(self) -> dict:
        return dict(
            ACTIVATION=self.activation.name,
            ALPHA=float(self.activation.alpha),
            LIMIT=float(self.activation.limit),
        )


def _use_tma(plan: Plan, n_dim: int, dtype) -> bool:
    """Whether a GEMM over row-major [K, n_dim] float weights reads them through TMA descriptors:
    where the plan has them and the weights' rows (and so every expert's matrix) are 16-byte
    aligned. Quantized weights never do: their tiles are dequantized from registers."""
    return plan.tma and n_dim * jnp.dtype(dtype).itemsize % 16 == 0


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


def _combine(plan: Plan, tiles: GemmTiles, *, first_term, second_term, bias, routing_weights, dispatched,
             zeroed_arrivals, num_tokens: int, top_k: int, num_routed: int, k_dim: int, n_dim: int,
             transposed_b: bool, scale: bool, out_dtype, params: ExpertWeights, a_scales=None):
    """One launch of ``expert_gemm_combine_kernel``: [T, n_dim] in ``out_dtype``.

    ``first_term`` and ``second_term`` (or None) are ``(rows, routed weights, shared weights)``,
    each weight ``_kernel_weights``' ``(values, scales, zero points)`` of ``params``' scheme;
    ``a_scales``: the first term's rows are fp8 with these scales (w8a8); ``dispatched`` is
    ``(sorted_pairs, block_expert, expert_row_end)``; ``zeroed_arrivals``: ``_arrival_counters``
    zeros, made by the launch before."""
    blocks = dispatched[1].shape[0]
    col_tiles = triton.cdiv(n_dim, tiles.block_n)
    combines = top_k > 1  # with one expert per token the kernel writes the output directly
    partial_dtype = _partial_dtype(out_dtype)
    a, b, shared_b = first_term
    absent_weight = tuple(_absent(part.dtype) for part in b)
    a2, b2, shared_b2 = second_term or (_absent(a.dtype), absent_weight, absent_weight)
    inputs = (
        a, b[0], shared_b[0], a2, b2[0], shared_b2[0], _absent(a.dtype) if bias is None else bias, routing_weights,
        *dispatched, _absent(jnp.float32) if a_scales is None else a_scales, *b[1:], *shared_b[1:], *b2[1:],
        *shared_b2[1:], zeroed_arrivals,
    )
    out, _, _ = plan.launch(
        kernels.expert_gemm_combine_kernel,
        *inputs,
        out_shapes=(
            jax.ShapeDtypeStruct((num_tokens, n_dim), out_dtype),
            jax.ShapeDtypeStruct((num_tokens * top_k, n_dim), partial_dtype) if combines else _absent_output(partial_dtype),
            jax.ShapeDtypeStruct(zeroed_arrivals.shape, zeroed_arrivals.dtype),
        ),
        grid=(blocks * col_tiles,),
        in_place_zeros={len(inputs) - 1: 2} if combines else {},
        K=k_dim,
        N=n_dim,
        B_TRANSPOSED=transposed_b,
        SECOND_TERM=second_term is not None,
        HAS_BIAS=bias is not None,
        SCALE_BY_ROUTING_WEIGHT=scale,
        HALF_BLOCKS=_half_blocks(plan),
        USE_TMA=not transposed_b and _scheme(params) is None and _use_tma(plan, n_dim, b[0].dtype),
        **_quantization_args(params, act_fp8=a_scales is not None),
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
    weights_in = _kernel_weights(params)
    act_fp8 = _act_fp8(params)
    x_in, x_scales = _fp8_activations(x, params) if act_fp8 else (x, None)
    preact = (
        jax.ShapeDtypeStruct((blocks * block_m, intermediate), x.dtype) if plan.save_activations
        else _absent_output(x.dtype)
    )
    tiles = plan.config.gate_up
    grid = blocks * triton.cdiv(intermediate, tiles.block_n)
    out_rows, combine_k = _combined_rows(plan, num_tokens, top_k)
    zeros_shape, zero_args = _zeros_for(_arrival_counters(out_rows, hidden, plan.config.down, combine_k), grid)
    act, gate_preact, up_preact, zeroed_arrivals = plan.launch(
        kernels.gate_up_kernel,
        x_in, *(weights_in[name][0] for name in ("w_gate", "w_up", "shared_w_gate", "shared_w_up")),
        *_biases(params, x.dtype),
        sorted_pairs, block_expert, expert_row_end,
        *_gate_up_quantization_inputs(weights_in, x_scales),
        out_shapes=(
            jax.ShapeDtypeStruct((blocks * block_m, intermediate), x.dtype),
            preact,
            preact,
            zeros_shape,
        ),
        grid=(grid,),
        HIDDEN=hidden,
        INTERMEDIATE=intermediate,
        HAS_BIAS=params.has_bias,
        SAVE_PREACTIVATIONS=plan.save_activations,
        HALF_BLOCKS=_half_blocks(plan),
        USE_TMA=_scheme(params) is None and _use_tma(plan, intermediate, x.dtype),
        **_quantization_args(params, act_fp8=act_fp8),
        **zero_args,
        **plan.activation_args(),
        **_row_block_args(
            plan, tiles, num_pairs=num_tokens * top_k, top_k=top_k, blocks=blocks,
            num_routed=params.num_routed,
        ),
    )
    flat_weights = weights.reshape(-1)
    act, act_scales = _fp8_activations(act, params) if act_fp8 else (act, None)
    out = _combine(
        plan, plan.config.down, first_term=(act, weights_in["w_down"], weights_in["shared_w_down"]),
        second_term=None, bias=params.down_bias, routing_weights=flat_weights, dispatched=dispatched,
        zeroed_arrivals=zeroed_arrivals, num_tokens=out_rows, top_k=combine_k, num_routed=params.num_routed,
        k_dim=intermediate, n_dim=hidden, transposed_b=False, scale=True,
        out_dtype=_partial_dtype(x.dtype) if plan.partial_sum else x.dtype, params=params, a_scales=act_scales,
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
    weights_in = _kernel_weights(params)
    # The recomputation reads x as the forward did: fp8 under w8a8.
    act_fp8 = _act_fp8(params) and saved is None
    x_in, x_scales = _fp8_activations(x, params) if act_fp8 else (x, None)
    gate_preact, up_preact = saved if saved is not None else (_absent(x.dtype),) * 2
    grid = blocks * f_tiles
    out_rows, combine_k = _combined_rows(plan, num_tokens, top_k)
    zeros_shape, zero_args = _zeros_for(_arrival_counters(out_rows, hidden, plan.config.input_grad, combine_k), grid)
    weighted_act, grad_gate, grad_up, grad_weight_parts, zeroed_arrivals = plan.launch(
        kernels.gate_up_backward_kernel,
        x_in, *(weights_in[name][0] for name in WEIGHT_NAMES),
        *_biases(params, x.dtype),
        grad_out, flat_weights, gate_preact, up_preact, sorted_pairs, block_expert, expert_row_end,
        *_gate_up_quantization_inputs(weights_in, x_scales),
        *weights_in["w_down"][1:], *weights_in["shared_w_down"][1:],
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
        USE_TMA=_scheme(params) is None and _use_tma(plan, intermediate, x.dtype),
        **_quantization_args(params, act_fp8=act_fp8),
        **zero_args,
        **plan.activation_args(),
        **_row_block_args(
            plan, tiles, num_pairs=num_pairs, top_k=top_k, blocks=blocks, num_routed=num_routed
        ),
    )
    grad_x = _combine(
        plan, plan.config.input_grad, first_term=(grad_gate, weights_in["w_gate"], weights_in["shared_w_gate"]),
        second_term=(grad_up, weights_in["w_up"], weights_in["shared_w_up"]), bias=None,
        routing_weights=flat_weights, dispatched=(sorted_pairs, block_expert, expert_row_end),
        zeroed_arrivals=zeroed_arrivals, num_tokens=out_rows, top_k=combine_k, num_routed=num_routed,
        k_dim=intermediate, n_dim=hidden, transposed_b=True, scale=False,
        out_dtype=_partial_dtype(x.dtype) if plan.partial_sum else x.dtype, params=params,
    )
    if plan.partial_sum:
        grad_x = _sum_present_pairs(grad_x, ids).astype(x.dtype)
    if _scheme(params) is None:
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
    else:
        # Quantized weights are frozen (jax_moe.api refuses to differentiate them): no weight
        # gradients, only the biases', which are float.
        grad_w_down = grad_shared_w_down = grad_w_gate = grad_shared_w_gate = grad_w_up = grad_shared_w_up = None
        grad_gate_bias, grad_up_bias, grad_down_bias = _bias_grads(
            params, grad_gate=grad_gate, grad_up=grad_up, grad_out=grad_out, flat_weights=flat_weights, ids=ids,
            sorted_pairs=sorted_pairs, block_expert=block_expert,
        ) if params.has_bias else (None, None, None)
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


def _gate_up_quantization_inputs(weights_in: dict, x_scales) -> tuple[jax.Array, ...]:
    """The inputs of the gate/up kernels after their float ones: fp8 x's scales (absent unless
    w8a8), then the gate and up weights' scales and zero points, routed and shared."""
    return (
        _absent(jnp.float32) if x_scales is None else x_scales,
        *(part for name in ("w_gate", "w_up", "shared_w_gate", "shared_w_up") for part in weights_in[name][1:]),
    )


def _bias_grads(params: ExpertWeights, *, grad_gate, grad_up, grad_out, flat_weights, ids, sorted_pairs,
                block_expert):
    """The routed experts' bias gradients in XLA, for layers whose weights get none (quantized):
    the gate and up biases' are the column sums of each expert's real rows of ``grad_gate`` and
    ``grad_up``, the down bias's the routing-weighted sum of its tokens' ``grad_out``."""
    num_routed, num_pairs = params.num_routed, flat_weights.shape[0]
    real = sorted_pairs < num_pairs
    row_expert = jnp.repeat(block_expert, sorted_pairs.shape[0] // block_expert.shape[0])
    # Rows of other experts (shared ones, padding, unused blocks) land in the dropped segment E.
    segments = jnp.where(real & (row_expert >= 0) & (row_expert < num_routed), row_expert, num_routed)

    def column_sums(rows):
        rows = jnp.where(real[:, None], rows.astype(jnp.float32), 0.0)
        return jax.ops.segment_sum(rows, segments, num_segments=num_routed + 1)[:num_routed]

    pair_ids = ids.reshape(-1)
    pair_segments = jnp.where((pair_ids >= 0) & (pair_ids < num_routed), pair_ids, num_routed)
    top_k = ids.shape[1]
    weighted_out = flat_weights[:, None] * jnp.repeat(grad_out.astype(jnp.float32), top_k, axis=0)
    grad_down_bias = jax.ops.segment_sum(weighted_out, pair_segments, num_segments=num_routed + 1)[:num_routed]
    return tuple(
        g.astype(b.dtype) for g, b in zip(
            (column_sums(grad_gate), column_sums(grad_up), grad_down_bias),
            (params.gate_bias, params.up_bias, params.down_bias),
        )
    )


def _weight_grad(plan: Plan, tiles: WeightGradTiles, a, b, b2, *, routing_weights, sorted_pairs, expert_row_end,
                 params: ExpertWeights, top_k: int, m_dim: int, n_dim: int, a_by_token: bool, b_by_token: bool,
                 weighted_bias_grad: bool):
    """One launch of ``expert_weight_grad_kernel``: the routed [E, m_dim, n_dim] and shared
    [S, m_dim, n_dim] gradients for ``b`` and (``DUAL``) ``b2``, and with biases the [E, n_dim]
    bias gradients of both; outputs that don't apply are absent."""
    dual = b2 is not None
    num_routed, num_shared = params.num_routed, params.num_shared

    def maybe(condition, shape, dtype=a.dtype):
        return jax.ShapeDtypeStruct(shape, dtype) if condition else _absent_output(dtype)

    routed = jax.ShapeDtypeStruct((num_routed, m_dim, n_dim), a.dtype)
    shared = maybe(num_shared > 0, (num_shared, m_dim, n_dim))
    bias_dtype = params.gate_bias.dtype if params.has_bias else a.dtype
    return plan.launch(
        kernels.expert_weight_grad_kernel,
        a, b, b2 if dual else _absent(b.dtype), routing_weights, sorted_pairs, expert_row_end,
        out_shapes=(
            routed,
            shared,
            maybe(dual, routed.shape),
            maybe(dual and num_shared > 0, (num_shared, m_dim, n_dim)),
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

    Differentiable (once) with respect to x, weights and every expert parameter. ``params`` has
    no ``shared_gate``: the shared experts' weights are in ``weights`` already.
    """
    if params.shared_gate is not None:
        raise ValueError("experts: the shared gate belongs in the routing weights (see _with_shared_experts)")
    return _differentiable_experts(plan)(x, weights.astype(jnp.float32), expert_ids, params, dispatched)


# --------------------------------------------------------------------------------------------
# The plan of a call, and the entry points of jax_moe.api's kernel backends
# --------------------------------------------------------------------------------------------

# Dispatch numbers the (token, expert) pairs and their padded rows in int32.
MAX_DISPATCH_ROWS = 2**31 - 1


def launcher(backend: str) -> Launch:
    """The launch function of a kernel backend, ``"triton"`` or ``"interpret"``."""
    if backend == "triton":
        from jax_moe import backend_triton

        return backend_triton.launch
    if backend == "interpret":
        from jax_moe import backend_interpret  # imports triton's interpreter only when asked for

        return backend_interpret.launch
    raise ValueError(f'backend: expected "triton" or "interpret"; got {backend!r}')


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


def _tile_config(backend: str, num_pairs: int, params: ExpertWeights, top_k: int, dtype) -> TileConfig:
    """Tuned tiles for this GPU and layer shape where configs/ has them, else the fallbacks.
    ``num_pairs`` counts the shared experts' rows too; ``top_k`` only the routed choices;
    ``dtype``: the activations' (quantized weights are dequantized to it)."""
    num_experts, hidden, intermediate = params.w_gate.shape
    dtype = jnp.dtype(dtype)
    shape = tile_configs.shape_key(num_experts, hidden, intermediate, top_k, dtype.name, params.num_shared)
    if backend == "triton":
        tables = tile_configs.device_tables(jax.devices()[0])
        return tile_configs.select(num_pairs, dtype.itemsize, table=tables, shape=shape)
    # The interpreter has no shared memory to fit: its tiles need no narrowing for fp32.
    return tile_configs.select(num_pairs, table="interpret", shape=shape)


def make_plan(backend: str, params: ExpertWeights, *, num_tokens: int, top_k: int, dtype,
              save_activations: bool, activation: Activation, partial_sum: bool = False,
              num_pairs: int | None = None, batch_invariant: bool = False) -> Plan:
    """The plan of one call of ``num_tokens`` tokens with ``top_k`` routed choices each (the
    shared experts come on top), or of ``num_pairs`` pairs of a layer of that ``top_k``;
    ``partial_sum``: see ``Plan``. Raises ValueError where dispatch's int32 rows would overflow.

    ``batch_invariant``: the tiles of the largest token counts for every call, so that a token's
    reductions (over K tiles, and the combine) run in the same order whatever batch it is in;
    otherwise the tiles follow the number of pairs."""
    if num_pairs is None:
        num_pairs = num_tokens * (top_k + params.num_shared)
    config = _tile_config(backend, MAX_DISPATCH_ROWS if batch_invariant else num_pairs, params, top_k, dtype)
    scheme = _scheme(params)
    if scheme is not None and scheme.activations == "fp8" and scheme.granularity == "block":
        # An fp8 GEMM step applies one scale per operand: it must not straddle a scale block.
        widest = max(config.gate_up.block_k, config.down.block_k)
        if widest > scheme.block_size:
            config = config.narrowed_k(widest // scheme.block_size)
    rows = max_row_blocks(params.num_routed + params.num_shared, num_pairs, config.block_m) * config.block_m
    if rows > MAX_DISPATCH_ROWS:
        raise ValueError(
            f"hidden_states: {num_tokens} tokens make {num_pairs} "
            f"(token, expert) pairs, {rows} dispatch rows with padding; dispatch indexes rows in int32 "
            f"(at most {MAX_DISPATCH_ROWS}): split the batch"
        )
    return Plan(
        config=config, dot_precision=_dot_precision(jnp.dtype(dtype)), launch=launcher(backend),
        save_activations=bool(save_activations), activation=activation,
        tma=config.tma and tma_available(backend), partial_sum=partial_sum,
    )


@functools.cache
def tma_available(backend: str) -> bool:
    """Whether a backend can read weight tiles through TMA descriptors: a Hopper (compute
    capability 9.0) or newer GPU where the stack gives them (``stacks.installed().tma``: jax-triton
    >= 0.4, triton >= 3.7, jaxlib >= 0.11.1), and Triton's interpreter, which emulates them.
    Elsewhere a config's ``tma`` is switched off."""
    if backend == "triton":
        capability = getattr(jax.devices()[0], "compute_capability", "0")
        return stacks.installed().tma and float(capability) >= 9.0
    return backend == "interpret"


def _with_shared_experts(plan: Plan, x, weights, ids, params: ExpertWeights, dispatched, *, shared_in_routing: bool):
    """``experts`` for routed choices, appending the shared experts' slots unless the routing
    kernel did (``shared_in_routing``); a shared gate's weights are computed here, in XLA."""
    if params.num_shared and not shared_in_routing:
        shared = shared_expert_weights(x, params.num_shared, params.shared_gate)
        weights, ids = with_shared_experts(weights, ids, params.num_routed, shared)
    return experts(x, weights, ids, params._replace(shared_gate=None), plan=plan, dispatched=dispatched)


def fused_moe(x, logits, selection_bias, params: ExpertWeights, routing: Routing, activation: Activation, *,
              backend: str, save_activations: bool, batch_invariant: bool = False):
    """The layer on a kernel backend: [T, H] ``x`` and [T, E] ``logits`` -> ([T, H] output,
    [T, top_k] routing weights, [T, top_k] expert ids).

    Routing and dispatch are one launch at decode sizes (``routes_and_dispatches``), where the
    routing kernel appends the shared experts itself; it does so for any size when they are
    ungated. A gated shared expert (Qwen2-MoE) takes its weight from the activations, in XLA.
    With a capacity, the pairs past it are dropped in XLA between routing and dispatch.
    ``batch_invariant`` (``make_plan``) routes in its own launch at every size.
    """
    num_tokens = x.shape[0]
    num_shared = params.num_shared
    plan = make_plan(
        backend, params, num_tokens=num_tokens, top_k=routing.top_k, dtype=x.dtype,
        save_activations=save_activations, activation=activation,
        partial_sum=routing.capacity_factor is not None, batch_invariant=batch_invariant,
    )
    route = functools.partial(top_k_routing, routing=routing, launch=plan.launch, batch_invariant=batch_invariant)
    if routing.capacity_factor is not None:
        # Dropped pairs (id -1) get no rows: each pair's row is summed in XLA (Plan.partial_sum).
        weights, ids = route(logits, selection_bias, num_shared=0)
        weights, ids = drop_over_capacity(weights, ids, routing, params.num_routed)
        out = _with_shared_experts(plan, x, weights, ids, params, None, shared_in_routing=False)
        return out, weights, ids
    shared_in_routing = num_shared if params.shared_gate is None else 0
    dispatched = None
    one_launch = not batch_invariant and routes_and_dispatches(num_tokens * (routing.top_k + num_shared))
    if shared_in_routing == num_shared and one_launch:
        weights, ids, dispatched = route_and_dispatch(
            logits, selection_bias, routing=routing, launch=plan.launch, num_shared=num_shared,
            block_m=plan.config.block_m,
        )
    else:
        weights, ids = route(logits, selection_bias, num_shared=shared_in_routing)
    out = _with_shared_experts(
        plan, x, weights, ids, params, dispatched, shared_in_routing=bool(shared_in_routing)
    )
    return out, weights[:, : routing.top_k], ids[:, : routing.top_k]


def moe_experts(x, weights, ids, params: ExpertWeights, activation: Activation, *, backend: str,
                save_activations: bool, shared_in_ids: bool = False, partial_sum: bool = False,
                layer_top_k: int | None = None, batch_invariant: bool = False):
    """The experts on a kernel backend for routing made by the caller: [T, H] ``x``, [T, k]
    float32 ``weights`` and int32 ``ids`` in [0, E) -> [T, H].

    ``shared_in_ids``: ``weights`` and ``ids`` end with the shared experts' slots already;
    ``partial_sum``: one device's share of a sharded layer (``Plan``), where ids < 0 are absent
    pairs; ``layer_top_k``: the layer's routed choices per token where each of the T rows is one
    pair (exchanged between devices), for the tile tables; ``batch_invariant``: see ``make_plan``."""
    top_k = ids.shape[1] - (params.num_shared if shared_in_ids else 0)
    plan = make_plan(
        backend, params, num_tokens=x.shape[0], top_k=layer_top_k or top_k, dtype=x.dtype,
        save_activations=save_activations, activation=activation, partial_sum=partial_sum,
        num_pairs=None if layer_top_k is None else ids.size, batch_invariant=batch_invariant,
    )
    return _with_shared_experts(plan, x, weights, ids, params, None, shared_in_routing=shared_in_ids)
