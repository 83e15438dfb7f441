"""Pure-JAX reference: the readable specification of what every backend computes.

Dense over all experts (each token passes through every expert and the combine matrix zeroes what
it did not choose), so it is simple rather than fast. It takes the typed options only
(``Routing``, ``ExpertWeights``, ``Activation``) and checks nothing: ``jax_moe.api`` validates
before dispatching to any backend, this one included.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from jax_moe.layer_math import drop_over_capacity, route_weights, scores, shared_expert_weights, with_shared_experts
from jax_moe.options import SILU, Activation, ExpertWeights, Routing
from jax_moe.quantization import QuantizedArray, activation_block, activations_through_fp8, dequantize


def route(router_logits: jax.Array, routing: Routing, selection_bias: jax.Array | None = None):
    """Top-k routing: ([..., top_k] float32 weights, [..., top_k] int32 expert ids).

    Experts are ranked on their scores, plus the selection bias if any (without bias or groups, on
    the logits: the same order, independent of how ``exp`` rounds). With groups, each group scores
    the sum of its two best ranking values and only the ``top_groups`` best groups stay eligible.
    Ties go to the lower index, NaN ranks above everything (``jax.lax.top_k``'s order). Weights as
    in ``layer_math.route_weights``; with a capacity, the pairs past it dropped
    (``layer_math.drop_over_capacity``).
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
    return drop_over_capacity(route_weights(logits, ids, routing), ids, routing, logits.shape[-1])


def swiglu(gate: jax.Array, up: jax.Array, activation: Activation = SILU) -> jax.Array:
    """The gated activation of ``jax_moe.Activation``."""
    if activation.name == "clamped_swiglu":
        gate = jnp.minimum(gate, activation.limit)
        up = jnp.clip(up, -activation.limit, activation.limit) + 1.0
        return gate * jax.nn.sigmoid(activation.alpha * gate) * up
    return jax.nn.silu(gate) * up


def moe_experts(hidden_states, weights, ids, experts: ExpertWeights, activation: Activation = SILU) -> jax.Array:
    """Weighted sum over each token's chosen experts of ``down(act(x @ gate + b_g, x @ up + b_u)) + b_d``.

    A pair with id -1 (dropped) contributes nothing. Shared experts (no biases) are experts every token chooses, numbered after the routed ones,
    with the weights of ``layer_math.shared_expert_weights``; their outputs join the same sum.
    Products accumulate in float32; the activation is rounded to the activation dtype before the
    down projection, as the kernels store it. Returns [..., H] in the dtype of hidden_states.

    Quantized weights (``jax_moe.QuantizedArray``) are dequantized to the activation dtype first,
    as the kernels dequantize their tiles; with fp8 activations (w8a8) to float32, and both GEMMs'
    left operands, x and the gated activation, go through ``activations_through_fp8`` (per token,
    per block of channels with block scaling).
    """
    scheme = experts.w_gate.scheme if isinstance(experts.w_gate, QuantizedArray) else None
    if scheme is not None:
        # fp8 x fp8 dots are exact in fp32: w8a8 weights are not rounded to the activation dtype.
        dtype = jnp.float32 if scheme.activations == "fp8" else hidden_states.dtype
        experts = experts._replace(**{
            name: dequantize(w, dtype) for name, w in experts._asdict().items() if isinstance(w, QuantizedArray)
        })
    through_fp8 = (
        functools.partial(activations_through_fp8, block=activation_block(scheme))
        if scheme is not None and scheme.activations == "fp8" else lambda a: a
    )
    if experts.num_shared:
        shared = shared_expert_weights(hidden_states, experts.num_shared, experts.shared_gate)
        weights, ids = with_shared_experts(weights, ids, experts.num_routed, shared)
        experts = shared_as_routed(experts)
    w_gate, w_up, w_down = experts.w_gate, experts.w_up, experts.w_down
    gate_bias, up_bias, down_bias = experts.gate_bias, experts.up_bias, experts.down_bias
    hidden = hidden_states.shape[-1]
    num_tokens = math.prod(hidden_states.shape[:-1])
    num_experts = w_gate.shape[0]
    x = hidden_states.reshape(num_tokens, hidden)
    top_k = ids.shape[-1]
    ids = ids.reshape(num_tokens, top_k)
    # [T, E]: each token's weight for each expert (a sum of one-hots: XLA splits it by token on a
    # mesh, where a scatter would be gathered).
    combine = jnp.einsum(
        "tk,tke->te", weights.reshape(num_tokens, top_k).astype(jnp.float32),
        jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), precision=jax.lax.Precision.HIGHEST,
    )
    einsum = functools.partial(
        jnp.einsum, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    x_in = through_fp8(x)
    gate = einsum("th,ehf->etf", x_in, w_gate)
    up = einsum("th,ehf->etf", x_in, w_up)
    if gate_bias is not None:
        gate = gate + gate_bias.astype(jnp.float32)[:, None, :]
        up = up + up_bias.astype(jnp.float32)[:, None, :]
    act = through_fp8(swiglu(gate, up, activation).astype(x.dtype))
    expert_out = einsum("etf,efh->eth", act, w_down)
    if down_bias is not None:
        expert_out = expert_out + down_bias.astype(jnp.float32)[:, None, :]
    out = einsum("eth,te->th", expert_out, combine)
    return out.astype(hidden_states.dtype).reshape(hidden_states.shape)


def shared_as_routed(experts: ExpertWeights) -> ExpertWeights:
    """The shared experts appended to the routed ones, as experts ``E .. E + S - 1`` of the same
    arrays (their biases zero: shared experts have none); the shared gate is dropped."""
    num_shared = experts.num_shared
    return ExpertWeights(
        *(jnp.concatenate([routed, shared], axis=0) for routed, shared in (
            (experts.w_gate, experts.shared_w_gate), (experts.w_up, experts.shared_w_up),
            (experts.w_down, experts.shared_w_down),
        )),
        *(None if b is None else jnp.pad(b, ((0, num_shared), (0, 0)))
          for b in (experts.gate_bias, experts.up_bias, experts.down_bias)),
    )


def fused_moe(hidden_states, router_logits, experts: ExpertWeights, routing: Routing, *,
              selection_bias=None, activation: Activation = SILU) -> jax.Array:
    """The whole MoE layer: ``route``, then ``moe_experts``."""
    weights, ids = route(router_logits, routing, selection_bias)
    return moe_experts(hidden_states, weights, ids, experts, activation)
