"""The fused forward pass as kernel launches: route, dispatch, gate/up, down + combine.

Written once against a ``launch`` function (``backend_triton.launch`` on the GPU,
``backend_interpret.launch`` on the CPU), so both backends run the same kernels with the same
grids. Every size here is static at trace time; grids cover the worst case any routing can need
and the kernels let surplus programs exit, so nothing waits on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import triton

from jax_moe import kernels
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


def route(logits: jax.Array, *, top_k: int, renormalize: bool, launch: Launch):
    """[T, E] logits -> ([T, top_k] float32 weights, [T, top_k] int32 expert ids)."""
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


def dispatch(expert_ids: jax.Array, *, num_experts: int, block_m: int, launch: Launch):
    """[T, top_k] expert ids -> (sorted_pairs [MAX_BLOCKS * block_m], block_expert [MAX_BLOCKS]).

    See ``kernels.dispatch_kernel`` for the layout of both.
    """
    num_pairs = expert_ids.size
    blocks = max_row_blocks(num_experts, num_pairs, block_m)
    num_programs = triton.cdiv(num_pairs, DISPATCH_CHUNK)
    return launch(
        kernels.dispatch_kernel,
        expert_ids.reshape(num_pairs),
        out_shapes=(
            jax.ShapeDtypeStruct((blocks * block_m,), jnp.int32),
            jax.ShapeDtypeStruct((blocks,), jnp.int32),
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


def experts(
    x: jax.Array,
    weights: jax.Array,
    expert_ids: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    config: TileConfig,
    dot_precision: str,
    launch: Launch,
) -> jax.Array:
    """Expert FFNs and combine for [T, H] tokens already routed to ``expert_ids`` with ``weights``."""
    num_tokens, hidden = x.shape
    num_experts, _, intermediate = w_gate.shape
    top_k = expert_ids.shape[1]
    num_pairs = num_tokens * top_k
    block_m = config.block_m
    blocks = max_row_blocks(num_experts, num_pairs, block_m)
    sorted_pairs, block_expert = dispatch(
        expert_ids, num_experts=num_experts, block_m=block_m, launch=launch
    )
    shared = dict(
        NUM_PAIRS=num_pairs,
        TOP_K=top_k,
        HIDDEN=hidden,
        INTERMEDIATE=intermediate,
        MAX_BLOCKS=blocks,
        BLOCK_M=block_m,
        GROUP_M=config.group_m,
        DOT_PRECISION=dot_precision,
    )

    tiles = config.gate_up
    (act,) = launch(
        kernels.gate_up_kernel,
        x,
        w_gate,
        w_up,
        sorted_pairs,
        block_expert,
        out_shapes=(jax.ShapeDtypeStruct((blocks * block_m, intermediate), x.dtype),),
        grid=(blocks * triton.cdiv(intermediate, tiles.block_n),),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        **shared,
    )

    tiles = config.down
    col_tiles = triton.cdiv(hidden, tiles.block_n)
    combines = top_k > 1  # with one expert per token the kernel writes the output directly
    out, _, _ = launch(
        kernels.down_combine_kernel,
        act,
        w_down,
        weights.astype(jnp.float32).reshape(num_pairs),
        sorted_pairs,
        block_expert,
        out_shapes=(
            jax.ShapeDtypeStruct((num_tokens, hidden), x.dtype),
            jax.ShapeDtypeStruct((num_pairs, hidden) if combines else (1, 1), jnp.float32),
            jax.ShapeDtypeStruct((num_tokens * col_tiles,) if combines else (1,), jnp.int32),
        ),
        grid=(blocks * col_tiles,),
        zeroed_outputs=(2,) if combines else (),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        **shared,
    )
    return out
