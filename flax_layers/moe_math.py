"""What the NNX and linen FusedMoE layers share: configuration checks, the forward computation
from raw parameters, and the auxiliary losses. Keeping it here keeps the two twins identical."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jax_moe

LOAD_BALANCING_LOSS = "load_balancing_loss"
ROUTER_Z_LOSS = "router_z_loss"


def expert_kernel_init():
    """Fan-in scaling per expert: [E, fan_in, fan_out] weights, with E a batch axis."""
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )


def check_config(hidden_size, intermediate_size, num_experts, top_k, backend, aux_weights) -> None:
    for name, value in (
        ("hidden_size", hidden_size),
        ("intermediate_size", intermediate_size),
        ("num_experts", num_experts),
        ("top_k", top_k),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be positive; got {value}")
    if top_k > num_experts:
        raise ValueError(f"top_k must lie in [1, num_experts={num_experts}]; got {top_k}")
    if backend not in jax_moe.BACKENDS:
        raise ValueError(f"backend must be one of {jax_moe.BACKENDS}; got {backend!r}")
    for name, value in aux_weights.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0; got {value}")


def load_balancing_loss(router_logits, ids, num_experts: int):
    """Switch Transformer: ``E * sum_e fraction_of_tokens_e * mean_router_prob_e``, where a token
    counts for every expert among its top-k (so a perfectly balanced router scores top_k)."""
    logits = router_logits.reshape(-1, num_experts).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    chosen = jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], ids.reshape(probs.shape[0], -1)].add(1.0)
    return num_experts * jnp.sum(jnp.mean(chosen, axis=0) * jnp.mean(probs, axis=0))


def router_z_loss(router_logits):
    """ST-MoE: the mean over tokens of ``logsumexp(logits)^2``."""
    return jnp.mean(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2)


def moe_forward(x, router_kernel, router_bias, wi_0, wi_1, wo, *, top_k, renormalize, dtype,
                backend, load_balancing_loss_weight, router_z_loss_weight):
    """The layer from raw parameters: ([..., H] output, {aux loss name: weighted value}).

    The router runs in float32 (routing decisions are sensitive to rounding); the experts run in
    ``dtype``, or the promoted dtype of ``x`` and the weights when ``dtype`` is None.
    """
    compute_dtype = dtype or jnp.result_type(x.dtype, wi_0.dtype)
    logits = jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32))
    if router_bias is not None:
        logits = logits + router_bias.astype(jnp.float32)
    y, _, ids = jax_moe.fused_moe(
        x.astype(compute_dtype),
        logits,
        wi_0.astype(compute_dtype),
        wi_1.astype(compute_dtype),
        wo.astype(compute_dtype),
        top_k=top_k,
        renormalize=renormalize,
        backend=backend,
        return_routing=True,
    )
    aux = {}
    if load_balancing_loss_weight:
        aux[LOAD_BALANCING_LOSS] = load_balancing_loss_weight * load_balancing_loss(logits, ids, wi_0.shape[0])
    if router_z_loss_weight:
        aux[ROUTER_Z_LOSS] = router_z_loss_weight * router_z_loss(logits)
    return y, aux
