"""Pure-JAX reference: the readable specification of what every backend computes.

Dense over all experts (each token passes through every expert and the combine matrix zeroes what
it did not choose), so it is simple rather than fast. Arguments are not validated here;
``jax_moe.api`` does that before dispatching to any backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_moe.options import SILU, Activation, Routing


def scores(router_logits: jax.Array, scoring: str) -> jax.Array:
    """Per-expert float32 scores: softmax over the experts, or a sigmoid each."""
    logits = router_logits.astype(jnp.float32)
    return jax.nn.softmax(logits, axis=-1) if scoring == "softmax" else jax.nn.sigmoid(logits)


def route(
    router_logits: jax.Array, *, top_k: int, renormalize: bool = True, scoring: str = "softmax",
    selection_bias: jax.Array | None = None, num_groups: int = 1, top_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
):
    """Top-k routing: ([..., top_k] float32 weights, [..., top_k] int32 expert ids).

    See ``jax_moe.options.Routing`` for the arguments.
    """
    routing = Routing(top_k, scoring, renormalize, num_groups, top_groups, routed_scaling_factor)
    return route_with(router_logits, routing, selection_bias)


def route_with(router_logits: jax.Array, routing: Routing, selection_bias: jax.Array | None = None):
    """``route`` for a ``Routing``.

    Experts are ranked on their scores, plus the selection bias if any (without bias or groups, on
    the logits: the same order, independent of how ``exp`` rounds). With groups, each group scores
    the sum of its two best ranking values and only the ``top_groups`` best groups stay eligible. Ties
    go to the lower index. Weights as in ``route_weights``.
    """
    logits = jnp.asarray(router_logits).astype(jnp.float32)
    ranking = logits
    if routing.num_groups > 1:
        ranking = scores(logits, routing.scoring)
    if selection_bias is not None:
        ranking = scores(logits, routing.scoring) + selection_bias.astype(jnp.float32)
    if routing.num_groups > 1:
        num_experts = logits.shape[-1]
        grouped = ranking.reshape(*ranking.shape[:-1], routing.num_groups, num_experts // routing.num_groups)
        best_two, _ = jax.lax.top_k(grouped, min(2, grouped.shape[-1]))
        _, kept_groups = jax.lax.top_k(jnp.sum(best_two, axis=-1), routing.kept_groups)
        kept = jnp.any(jnp.arange(routing.num_groups)[:, None] == kept_groups[..., None, :], axis=-1)
        ranking = jnp.where(kept[..., None], grouped, -jnp.inf).reshape(ranking.shape)
    _, ids = jax.lax.top_k(ranking, routing.top_k)
    ids = ids.astype(jnp.int32)
    return route_weights(logits, ids, routing), ids


def route_weights(router_logits: jax.Array, ids: jax.Array, routing: Routing) -> jax.Array:
    """The routing weights of given expert choices: their scores, divided by their sum when
    ``routing.renormalize``, times ``routing.scaling_factor``. (The kernels' routing backward
    differentiates this.)"""
    weights = jnp.take_along_axis(scores(router_logits, routing.scoring), ids, axis=-1)
    if routing.renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights * routing.scaling_factor


def swiglu(gate: jax.Array, up: jax.Array, activation: Activation = SILU) -> jax.Array:
    """The gated activation of ``jax_moe.options.Activation``."""
    if activation.name == "clamped_swiglu":
        gate = jnp.minimum(gate, activation.limit)
        up = jnp.clip(up, -activation.limit, activation.limit) + 1.0
        return gate * jax.nn.sigmoid(activation.alpha * gate) * up
    return jax.nn.silu(gate) * up


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


def moe_experts(
    hidden_states, weights, ids, w_gate, w_up, w_down, *, gate_bias=None, up_bias=None,
    down_bias=None, activation: Activation = SILU, shared_w_gate=None, shared_w_up=None,
    shared_w_down=None, shared_gate=None,
) -> jax.Array:
    """Weighted sum over each token's chosen experts of ``down(act(x @ gate + b_g, x @ up + b_u)) + b_d``.

    Shared experts (no biases) are simply experts every token chooses, numbered after the routed
    ones, with the weights of ``shared_expert_weights``; their outputs join the same sum.
    Products accumulate in float32; the activation is rounded to the activation dtype before
    the down projection, as the kernels store it. Returns [..., H] in the dtype of hidden_states.
    """
    if shared_w_gate is not None:
        num_routed, num_shared = w_gate.shape[0], shared_w_gate.shape[0]
        shared = shared_expert_weights(hidden_states, num_shared, shared_gate)
        weights, ids = with_shared_experts(weights, ids, num_routed, shared)
        w_gate, w_up, w_down = (
            jnp.concatenate(pair, axis=0)
            for pair in ((w_gate, shared_w_gate), (w_up, shared_w_up), (w_down, shared_w_down))
        )
        gate_bias, up_bias, down_bias = (
            None if b is None else jnp.pad(b, ((0, num_shared), (0, 0)))
            for b in (gate_bias, up_bias, down_bias)
        )
    hidden = hidden_states.shape[-1]
    num_experts = w_gate.shape[0]
    x = hidden_states.reshape(-1, hidden)
    top_k = ids.shape[-1]
    ids = ids.reshape(-1, top_k)
    # [T, E]: each token's weight for each expert (a sum of one-hots: XLA splits it by token on a
    # mesh, where a scatter would be gathered).
    combine = jnp.einsum(
        "tk,tke->te", weights.reshape(-1, top_k).astype(jnp.float32),
        jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), precision=jax.lax.Precision.HIGHEST,
    )
    einsum = functools.partial(
        jnp.einsum, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    gate = einsum("th,ehf->etf", x, w_gate)
    up = einsum("th,ehf->etf", x, w_up)
    if gate_bias is not None:
        gate = gate + gate_bias.astype(jnp.float32)[:, None, :]
        up = up + up_bias.astype(jnp.float32)[:, None, :]
    act = swiglu(gate, up, activation).astype(x.dtype)
    expert_out = einsum("etf,efh->eth", act, w_down)
    if down_bias is not None:
        expert_out = expert_out + down_bias.astype(jnp.float32)[:, None, :]
    out = einsum("eth,te->th", expert_out, combine)
    return out.astype(hidden_states.dtype).reshape(hidden_states.shape)


def fused_moe(
    hidden_states, router_logits, w_gate, w_up, w_down, *, top_k: int, renormalize: bool = True,
    scoring: str = "softmax", selection_bias=None, num_groups: int = 1, top_groups: int | None = None,
    routed_scaling_factor: float = 1.0, **expert_options,
) -> jax.Array:
    """The whole MoE layer: ``route``, then ``moe_experts`` (``expert_options``: its keywords)."""
    weights, ids = route(
        router_logits, top_k=top_k, renormalize=renormalize, scoring=scoring,
        selection_bias=selection_bias, num_groups=num_groups, top_groups=top_groups,
        routed_scaling_factor=routed_scaling_factor,
    )
    return moe_experts(hidden_states, weights, ids, w_gate, w_up, w_down, **expert_options)
