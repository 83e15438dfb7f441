"""The MoE layers a JAX user could pick instead of jax_moe, all with jax_moe's routing semantics.

Every route maps (x [T, H], router_logits [T, E], w_gate, w_up [E, H, F], w_down [E, F, H]) to
[T, H] and is differentiable, so the forward and the training benchmarks share them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import jax_moe


def fused(top_k: int):
    return lambda x, logits, wg, wu, wd: jax_moe.fused_moe(x, logits, wg, wu, wd, top_k=top_k, backend="triton")


def dense_einsum(top_k: int):
    """Every token through every expert, unchosen ones zeroed by the combine weights."""
    return lambda x, logits, wg, wu, wd: jax_moe.reference.fused_moe(x, logits, wg, wu, wd, top_k=top_k)


def sorted_ragged(top_k: int, ragged_dot):
    """Sort the (token, slot) pairs by expert, three ragged GEMMs, weight, scatter-add back."""

    def moe(x, logits, w_gate, w_up, w_down):
        num_tokens = x.shape[0]
        num_experts = w_gate.shape[0]
        weights, ids = jax_moe.reference.route(logits, top_k=top_k)
        order = jnp.argsort(ids.reshape(-1), stable=True)
        tokens = order // top_k
        group_sizes = jnp.bincount(ids.reshape(-1), length=num_experts).astype(jnp.int32)
        rows = x[tokens]
        dot = functools.partial(ragged_dot, group_sizes=group_sizes, preferred_element_type=jnp.float32)
        act = (jax.nn.silu(dot(rows, w_gate)) * dot(rows, w_up)).astype(x.dtype)
        out = dot(act, w_down) * weights.reshape(-1)[order][:, None]
        return jnp.zeros((num_tokens, x.shape[1]), jnp.float32).at[tokens].add(out).astype(x.dtype)

    return moe


def available(top_k: int) -> dict:
    """Route name -> layer function, for every route this machine can run."""
    routes = {
        "jax_moe": fused(top_k),
        "dense_einsum": dense_einsum(top_k),
        "ragged_dot": sorted_ragged(top_k, jax.lax.ragged_dot),
    }
    try:
        import tokamax
    except Exception as e:  # not installed, or its dependencies are not
        print(f"tokamax routes left out: {type(e).__name__}: {e}")
        return routes
    for implementation in ("mosaic", "triton"):
        ragged = functools.partial(tokamax.ragged_dot, implementation=implementation)
        routes[f"tokamax_{implementation}"] = sorted_ragged(top_k, ragged)
    return routes
