"""Pure-JAX pieces of the layer that the reference and the kernel pipeline share: expert scores,
the routing weights of given choices (the kernels' routing VJP differentiates them), and the
shared experts' weights and slots, and the pairs an expert's capacity drops."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jax_moe.options import Routing


def scores(router_logits: jax.Array, scoring: str) -> jax.Array:
    """Per-expert float32 scores: softmax over the experts, or a sigmoid each."""
    logits = router_logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)


def route_weights(router_logits: jax.Array, ids: jax.Array, routing: Routing) -> jax.Array:
    """The routing weights of given expert choices: their scores, divided by their sum when
    ``routing.renormalize``, times ``routing.routed_scaling_factor``."""
    weights = jnp.take_along_axis(scores(router_logits, routing.scoring), ids, axis=-1)
    if routing.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * routing.routed_scaling_factor


def shared_expert_weights(hidden_states, num_shared: int, shared_gate=None) -> jax.Array:
    """[..., S] float32 weights of the shared experts: 1 (DeepSeek-V3), or
    ``sigmoid(x @ shared_gate)`` for all of them (Qwen2-MoE's gated shared expert)."""
    lead = hidden_states.shape[:-1]
    if shared_gate is None:
        return jnp.ones((*lead, num_shared), jnp.float32)
    logit = jnp.einsum(
        "...h,h->...", hidden_states, shared_gate.astype(hidden_states.dtype),
        preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.broadcast_to(jax.nn.sigmoid(logit)[..., None], (*lead, num_shared))


def with_shared_experts(weights, ids, num_routed: int, shared_weights):
    """Appends the shared experts to every token's choices as ids ``E .. E + S - 1``."""
    num_shared = shared_weights.shape[-1]
    shared_ids = jnp.broadcast_to(
        jnp.arange(num_routed, num_routed + num_shared, dtype=jnp.int32), shared_weights.shape
    )
    return (
        jnp.concatenate([weights.astype(jnp.float32), shared_weights], axis=-1),
        jnp.concatenate([ids.astype(jnp.int32), shared_ids], axis=-1),
    )


def drop_over_capacity(weights, ids, routing: Routing, num_experts: int):
    """[..., top_k] routing with the pairs past each expert's capacity dropped (id -1, weight 0):
    ``routing.expert_capacity`` of the tokens here, kept in the order slot 0 of every token, then
    slot 1, ...; unchanged without a capacity."""
    num_tokens = math.prod(ids.shape[:-1])
    capacity = routing.expert_capacity(num_tokens, num_experts)
    if capacity is None:
        return weights, ids
    top_k = ids.shape[-1]
    by_slot = ids.reshape(num_tokens, top_k).T.reshape(-1)
    order = jnp.argsort(by_slot, stable=True)
    sorted_ids = by_slot[order]
    # A pair's place in its expert's queue: its sorted position past the expert's first.
    place_sorted = jnp.arange(by_slot.size) - jnp.searchsorted(sorted_ids, sorted_ids, side="left")
    place = jnp.zeros_like(place_sorted).at[order].set(place_sorted)
    kept = (place < capacity).reshape(top_k, num_tokens).T.reshape(ids.shape)
    return jnp.where(kept, weights, 0.0), jnp.where(kept, ids, -1).astype(ids.dtype)
