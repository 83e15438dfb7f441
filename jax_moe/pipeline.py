"""The fused layer as kernel launches: route, dispatch, gate/up, down + combine, and the backward.

Forward and backward are written once against a ``launch`` function (``backend_triton.launch`` on the GPU,
``backend_interpret.launch`` on the CPU), so both backends run the same kernels with the same
grids. Every size here is static at trace time; grids cover the worst case any routing can need
and the kernels let surplus programs exit, so nothing waits on the host.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import triton

from jax_moe import kernels, reference
from jax_moe.tile_configs import TileConfig

Launch = Callable[..., tuple[jax.Array, ...]]

# Pairs placed per dispatch program; its rank computation holds a [CHUNK, CHUNK] comparison.
DISPATCH_CHUNK = 128
# Smallest padded expert count: keeps the routing and dispatch tiles out of degenerate layouts.
MIN_EXPERTS_PAD = 16
# Elements of the [BLOCK_T, EXPERTS_PAD] logits tile of one routing program.
ROUTE_TILE_ELEMENTS = 4096


def experts_pad(num_experts: int) -> int:
    return max(MIN_EXPERTS_PAD, triton.next_power_of_2(num_experts))


def max_row_blocks(num_experts: int, num_pairs: int, block_m: int) -> int:
    """Most row blocks any routing can fill: each non-empty expert wastes at most one partial block."""
    return min(num_experts, num_pairs) + triton.cdiv(num_pairs, block_m)


@functools.cache
def _differentiable_route(top_k: int, renormalize: bool, launch: Launch):
    @jax.custom_vjp
    def route_op(logits):
        num_tokens, num_experts = logits.shape
        padded = experts_pad(num_experts)
        block_t = max(1, min(64, ROUTE_TILE_ELEMENTS // padded))
        return launch(
            kernels.route_kernel,
            logits,
            out_shapes=(
                jax.ShapeDtypeStruct((num_tokens, top_k), jnp.float32),
                jax.ShapeDtypeStruct((num_tokens, top_k), jnp.int32),
            ),
            grid=(triton.cdiv(num_tokens, block_t),),
            num_warps=4,
            NUM_TOKENS=num_tokens,
            NUM_EXPERTS=num_experts,
            EXPERTS_PAD=padded,
            TOP_K=top_k,
            TOP_K_PAD=triton.next_power_of_2(top_k),
            RENORMALIZE=renormalize,
            BLOCK_T=block_t,
        )

    def forward(logits):
        (logits,) = _first_order_only(logits)
        weights, ids = route_op(logits)
        return (weights, ids), (logits, ids)

    def backward(residuals, cotangents):
        logits, ids = residuals
        grad_weights, _ = cotangents  # ids are integers: no gradient
        logits, grad_weights = _first_order_only(logits, grad_weights)
        _, pullback = jax.vjp(lambda l: reference.route_weights(l, ids, renormalize=renormalize), logits)
        return pullback(grad_weights)

    route_op.defvjp(forward, backward)
    return route_op


def route(logits: jax.Array, *, top_k: int, renormalize: bool, launch: Launch):
    """[T, E] logits -> ([T, top_k] float32 weights, [T, top_k] int32 expert ids).

    Differentiable with respect to the logits through the weights.
    """
    return _differentiable_route(top_k, renormalize, launch)(logits)


def dispatch(expert_ids: jax.Array, *, num_experts: int, block_m: int, launch: Launch):
    """[T, top_k] expert ids -> sorted_pairs [MAX_BLOCKS * block_m], block_expert [MAX_BLOCKS],
    expert_row_end [EXPERTS_PAD]. See ``kernels.dispatch_kernel`` for their layout."""
    num_pairs = expert_ids.size
    blocks = max_row_blocks(num_experts, num_pairs, block_m)
    num_programs = triton.cdiv(num_pairs, DISPATCH_CHUNK)
    return launch(
        kernels.dispatch_kernel,
        expert_ids.reshape(num_pairs),
        out_shapes=(
            jax.ShapeDtypeStruct((blocks * block_m,), jnp.int32),
            jax.ShapeDtypeStruct((blocks,), jnp.int32),
            jax.ShapeDtypeStruct((experts_pad(num_experts),), jnp.int32),
        ),
        grid=(num_programs,),
        num_warps=4,
        NUM_PAIRS=num_pairs,
        EXPERTS_PAD=experts_pad(num_experts),
        BLOCK_M=block_m,
        MAX_BLOCKS=blocks,
        CHUNK=DISPATCH_CHUNK,
        NUM_PROGRAMS=num_programs,
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one layer call: tiles, dot precision, launcher, residual policy.

    ``save_activations=False`` (default) keeps only the dispatch metadata as residuals (about
    ``4 * (rows + row blocks + E)`` bytes, rows ~ ``T*k + E*block_m``) and recomputes the gate
    and up projections in the backward pass: one more pair of GEMMs. ``True`` stores both
    pre-activations instead: ``2 * rows * F`` elements of the activation dtype (Mixtral at
    T = 8192, bf16: 0.94 GB per layer).
    """

    config: TileConfig
    dot_precision: str
    launch: Launch
    save_activations: bool = False


def _row_block_args(plan: Plan, tiles, *, num_pairs: int, top_k: int, blocks: int) -> dict:
    """Launch options and constexprs shared by the kernels that work per row block."""
    return dict(
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        NUM_PAIRS=num_pairs,
        TOP_K=top_k,
        MAX_BLOCKS=blocks,
        BLOCK_M=plan.config.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        GROUP_M=plan.config.group_m,
        DOT_PRECISION=plan.dot_precision,
    )


def _combine(plan: Plan, a, b, a2, b2, routing_weights, sorted_pairs, block_expert, *,
             num_tokens: int, top_k: int, k_dim: int, n_dim: int, transposed_b: bool,
             second_term: bool, scale: bool, out_dtype):
    """One launch of ``expert_gemm_combine_kernel``: [T, n_dim] in ``out_dtype``."""
    tiles = plan.config.down
    blocks = block_expert.shape[0]
    col_tiles = triton.cdiv(n_dim, tiles.block_n)
    combines = top_k > 1  # with one expert per token the kernel writes the output directly
    out, _, _ = plan.launch(
        kernels.expert_gemm_combine_kernel,
        a, b, a2, b2, routing_weights, sorted_pairs, block_expert,
        out_shapes=(
            jax.ShapeDtypeStruct((num_tokens, n_dim), out_dtype),
            jax.ShapeDtypeStruct((num_tokens * top_k, n_dim) if combines else (1, 1), jnp.float32),
            jax.ShapeDtypeStruct((num_tokens * col_tiles,) if combines else (1,), jnp.int32),
        ),
        grid=(blocks * col_tiles,),
        zeroed_outputs=(2,) if combines else (),
        K=k_dim,
        N=n_dim,
        STRIDE_BK=1 if transposed_b else n_dim,
        STRIDE_BN=k_dim if transposed_b else 1,
        SECOND_TERM=second_term,
        SCALE_BY_ROUTING_WEIGHT=scale,
        **_row_block_args(plan, tiles, num_pairs=num_tokens * top_k, top_k=top_k, blocks=blocks),
    )
    return out


def _experts_forward(plan: Plan, x, weights, ids, w_gate, w_up, w_down):
    num_tokens, hidden = x.shape
    num_experts, _, intermediate = w_gate.shape
    top_k = ids.shape[1]
    block_m = plan.config.block_m
    blocks = max_row_blocks(num_experts, num_tokens * top_k, block_m)
    sorted_pairs, block_expert, expert_row_end = dispatch(
        ids, num_experts=num_experts, block_m=block_m, launch=plan.launch
    )
    rows_shape = (blocks * block_m, intermediate) if plan.save_activations else (1, 1)
    tiles = plan.config.gate_up
    act, gate_preact, up_preact = plan.launch(
        kernels.gate_up_kernel,
        x, w_gate, w_up, sorted_pairs, block_expert,
        out_shapes=(
            jax.ShapeDtypeStruct((blocks * block_m, intermediate), x.dtype),
            jax.ShapeDtypeStruct(rows_shape, x.dtype),
            jax.ShapeDtypeStruct(rows_shape, x.dtype),
        ),
        grid=(blocks * triton.cdiv(intermediate, tiles.block_n),),
        HIDDEN=hidden,
        INTERMEDIATE=intermediate,
        SAVE_PREACTIVATIONS=plan.save_activations,
        **_row_block_args(plan, tiles, num_pairs=num_tokens * top_k, top_k=top_k, blocks=blocks),
    )
    flat_weights = weights.reshape(-1)
    out = _combine(
        plan, act, w_down, act, w_down, flat_weights, sorted_pairs, block_expert,
        num_tokens=num_tokens, top_k=top_k, k_dim=intermediate, n_dim=hidden,
        transposed_b=False, second_term=False, scale=True, out_dtype=x.dtype,
    )
    saved = (gate_preact, up_preact) if plan.save_activations else None
    return out, (x, flat_weights, w_gate, w_up, w_down, sorted_pairs, block_expert, expert_row_end, saved)


def _experts_backward(plan: Plan, top_k: int, residuals, grad_out):
    x, flat_weights, w_gate, w_up, w_down, sorted_pairs, block_expert, expert_row_end, saved = residuals
    x, flat_weights, w_gate, w_up, w_down, saved, grad_out = _first_order_only(
        x, flat_weights, w_gate, w_up, w_down, saved, grad_out.astype(x.dtype)
    )
    num_tokens, hidden = x.shape
    num_experts, _, intermediate = w_gate.shape
    num_pairs = num_tokens * top_k
    rows = sorted_pairs.shape[0]
    blocks = block_expert.shape[0]
    tiles = plan.config.gate_up
    f_tiles = triton.cdiv(intermediate, tiles.block_n)
    gate_preact, up_preact = saved if saved is not None else (x, x)  # unread when recomputing
    act, grad_gate, grad_up, grad_weight_parts = plan.launch(
        kernels.gate_up_backward_kernel,
        x, w_gate, w_up, w_down, grad_out, flat_weights, gate_preact, up_preact, sorted_pairs, block_expert,
        out_shapes=(
            jax.ShapeDtypeStruct((rows, intermediate), x.dtype),
            jax.ShapeDtypeStruct((rows, intermediate), x.dtype),
            jax.ShapeDtypeStruct((rows, intermediate), x.dtype),
            jax.ShapeDtypeStruct((num_pairs, f_tiles), jnp.float32),
        ),
        grid=(blocks * f_tiles,),
        HIDDEN=hidden,
        INTERMEDIATE=intermediate,
        RECOMPUTE=saved is None,
        **_row_block_args(plan, tiles, num_pairs=num_pairs, top_k=top_k, blocks=blocks),
    )
    grad_x = _combine(
        plan, grad_gate, w_gate, grad_up, w_up, flat_weights, sorted_pairs, block_expert,
        num_tokens=num_tokens, top_k=top_k, k_dim=intermediate, n_dim=hidden,
        transposed_b=True, second_term=True, scale=False, out_dtype=x.dtype,
    )
    grad_w_down = _weight_grad(
        plan, act, grad_out, None, flat_weights, sorted_pairs, expert_row_end,
        num_experts=num_experts, top_k=top_k, m_dim=intermediate, n_dim=hidden,
        a_by_token=False, b_by_token=True, scale_b=True,
    )[0]
    grad_w_gate, grad_w_up = _weight_grad(
        plan, x, grad_gate, grad_up, flat_weights, sorted_pairs, expert_row_end,
        num_experts=num_experts, top_k=top_k, m_dim=hidden, n_dim=intermediate,
        a_by_token=True, b_by_token=False, scale_b=False,
    )
    grad_weights = jnp.sum(grad_weight_parts, axis=1).reshape(num_tokens, top_k)
    return grad_x, grad_weights, None, grad_w_gate, grad_w_up, grad_w_down


def _weight_grad(plan: Plan, a, b, b2, routing_weights, sorted_pairs, expert_row_end, *,
                 num_experts: int, top_k: int, m_dim: int, n_dim: int,
                 a_by_token: bool, b_by_token: bool, scale_b: bool):
    """One launch of ``expert_weight_grad_kernel``: one or two [E, m_dim, n_dim] gradients."""
    tiles = plan.config.weight_grad
    dual = b2 is not None
    out = jax.ShapeDtypeStruct((num_experts, m_dim, n_dim), a.dtype)
    outs = plan.launch(
        kernels.expert_weight_grad_kernel,
        a, b, b2 if dual else b, routing_weights, sorted_pairs, expert_row_end,
        out_shapes=(out, out if dual else jax.ShapeDtypeStruct((1,), a.dtype)),
        grid=(num_experts * triton.cdiv(m_dim, tiles.block_m) * triton.cdiv(n_dim, tiles.block_n),),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        NUM_PAIRS=routing_weights.shape[0],
        TOP_K=top_k,
        M=m_dim,
        N=n_dim,
        A_BY_TOKEN=a_by_token,
        B_BY_TOKEN=b_by_token,
        SCALE_B=scale_b,
        DUAL=dual,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        DOT_PRECISION=plan.dot_precision,
    )
    return outs if dual else outs[:1]


@functools.cache
def _differentiable_experts(plan: Plan, top_k: int):
    # Without differentiation nothing reads the residuals: never store pre-activations then.
    inference_plan = dataclasses.replace(plan, save_activations=False)

    @jax.custom_vjp
    def experts_op(x, weights, ids, w_gate, w_up, w_down):
        return _experts_forward(inference_plan, x, weights, ids, w_gate, w_up, w_down)[0]

    def forward(x, weights, ids, w_gate, w_up, w_down):
        x, weights, w_gate, w_up, w_down = _first_order_only(x, weights, w_gate, w_up, w_down)
        return _experts_forward(plan, x, weights, ids, w_gate, w_up, w_down)

    experts_op.defvjp(forward, functools.partial(_experts_backward, plan, top_k))
    return experts_op


def experts(x, weights, expert_ids, w_gate, w_up, w_down, *, plan: Plan) -> jax.Array:
    """Expert FFNs and combine for [T, H] tokens routed to ``expert_ids`` with ``weights``.

    Differentiable (once) with respect to x, weights and the three expert weights.
    """
    return _differentiable_experts(plan, expert_ids.shape[1])(
        x, weights.astype(jnp.float32), expert_ids, w_gate, w_up, w_down
    )
