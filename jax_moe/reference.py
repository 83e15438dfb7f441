"""Pure-JAX reference: the readable specification of what every backend computes.

Dense over all experts (each token passes through every expert and the combine matrix zeroes what
it did not choose), so it is simple rather than fast. Arguments are not validated here;
``jax_moe.api`` does that before dispatching to any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def route(router_logits: jax.Array, *, top_k: int, renormalize: bool = True):
    """Softmax routing: ([..., top_k] float32 weights, [..., top_k] int32 expert ids).

    The softmax runs over all E logits in float32. The top-k is taken on the logits, which orders
    experts exactly as the probabilities do (softmax is monotonic) without depending on how ``exp``
    rounds; ties go to the lower expert index. With ``renormalize`` the k weights are divided by
    their sum (Mixtral, Qwen3-MoE); without, they stay raw probabilities (Qwen2-MoE).
    """
    logits = jnp.asarray(router_logits).astype(jnp.float32)
    _, ids = jax.lax.top_k(logits, top_k)
    ids = ids.astype(jnp.int32)
    return route_weights(logits, ids, renormalize=renormalize), ids


def route_weights(router_logits: jax.Array, ids: jax.Array, *, renormalize: bool = True) -> jax.Array:
    """The routing weights of given expert choices: their softmax probabilities over all E logits,
    divided by their sum when ``renormalize``. (The kernels' routing backward differentiates this.)"""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights = jnp.take_along_axis(probs, ids, axis=-1)
    return weights / jnp.sum(weights, axis=-1, keepdims=True) if renormalize else weights


def moe_experts(hidden_states, weights, ids, w_gate, w_up, w_down) -> jax.Array:
    """Weighted sum over each token's chosen experts of ``down(silu(x @ gate) * (x @ up))``.

    Products accumulate in float32; the SwiGLU activation is rounded to the activation dtype before
    the down projection, as the kernels store it. Returns [..., H] in the dtype of hidden_states.
    """
    hidden = hidden_states.shape[-1]
    num_experts = w_gate.shape[0]
    x = hidden_states.reshape(-1, hidden)
    top_k = ids.shape[-1]
    ids = ids.reshape(-1, top_k)
    combine = (
        jnp.zeros((x.shape[0], num_experts), jnp.float32)
        .at[jnp.arange(x.shape[0])[:, None], ids]
        .add(weights.reshape(-1, top_k).astype(jnp.float32))
    )
    einsum = functools.partial(
        jnp.einsum, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    gate = einsum("th,ehf->etf", x, w_gate)
    up = einsum("th,ehf->etf", x, w_up)
    act = (jax.nn.silu(gate) * up).astype(x.dtype)
    out = einsum("eth,te->th", einsum("etf,efh->eth", act, w_down), combine)
    return out.astype(hidden_states.dtype).reshape(hidden_states.shape)


def fused_moe(
    hidden_states, router_logits, w_gate, w_up, w_down, *, top_k: int, renormalize: bool = True
) -> jax.Array:
    """The whole MoE layer: ``route`` then ``moe_experts``."""
    weights, ids = route(router_logits, top_k=top_k, renormalize=renormalize)
    return moe_experts(hidden_states, weights, ids, w_gate, w_up, w_down)
