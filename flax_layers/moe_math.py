"""What the NNX and linen FusedMoE layers share: configuration checks, the forward computation
from raw parameters, and the auxiliary losses. Keeping it here keeps the two twins identical."""

from __future__ import annotations

import dataclasses
import math
import typing as tp

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec

import jax_moe
from jax_moe import layer_math
from jax_moe.sharding import EXPERT_EXCHANGES

LOAD_BALANCING_LOSS = "load_balancing_loss"
ROUTER_Z_LOSS = "router_z_loss"
DROPPED_PAIRS = "dropped_pairs"


def expert_kernel_init():
    """Fan-in scaling per expert: [E, fan_in, fan_out] weights, with E a batch axis."""
    return jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )


@dataclasses.dataclass(frozen=True)
class LayerOptions:
    """The static configuration both FusedMoE twins pass to ``moe_forward`` (see their docstrings).
    The routing and activation are jax_moe's own typed options, embedded as they are."""

    routing: jax_moe.Routing
    activation: jax_moe.Activation = jax_moe.SILU
    dtype: tp.Any = None
    backend: str = "auto"
    load_balancing_loss_weight: float = 0.0
    router_z_loss_weight: float = 0.0
    expert_exchange: str = "all_gather"
    batch_invariant: bool = False
    quantization: jax_moe.Quantization | None = None


def layer_options(routing, activation, dtype, backend, load_balancing_loss_weight, router_z_loss_weight, *,
                  expert_exchange="all_gather", batch_invariant=False, quantization=None) -> LayerOptions:
    """``LayerOptions`` from a twin's constructor arguments, with a clear error for each bad one."""
    if quantization is not None and not isinstance(quantization, jax_moe.Quantization):
        raise TypeError(f"quantization must be a jax_moe.Quantization or None; got {type(quantization).__name__}")
    if not isinstance(routing, jax_moe.Routing):
        raise TypeError(f"routing must be a jax_moe.Routing (e.g. jax_moe.Routing(top_k=2)); got {type(routing).__name__}")
    if backend not in jax_moe.BACKENDS:
        raise ValueError(f"backend must be one of {jax_moe.BACKENDS}; got {backend!r}")
    if not isinstance(batch_invariant, bool):
        raise TypeError(f"batch_invariant must be a bool; got {type(batch_invariant).__name__}")
    if expert_exchange not in EXPERT_EXCHANGES:
        raise ValueError(f"expert_exchange must be one of {EXPERT_EXCHANGES}; got {expert_exchange!r}")
    for name, weight in (("load_balancing_loss_weight", load_balancing_loss_weight),
                         ("router_z_loss_weight", router_z_loss_weight)):
        if weight < 0:
            raise ValueError(f"{name} must be >= 0; got {weight}")
    return LayerOptions(
        routing=routing, activation=jax_moe.Activation.of(activation), dtype=dtype, backend=backend,
        load_balancing_loss_weight=load_balancing_loss_weight, router_z_loss_weight=router_z_loss_weight,
        expert_exchange=expert_exchange,
        batch_invariant=batch_invariant,
        quantization=quantization,
    )


def check_config(hidden_size, intermediate_size, num_experts, num_shared_experts, use_shared_expert_gate,
                 options: LayerOptions) -> None:
    """Raises on a bad layer configuration before any parameter is created."""
    for name, value, least in (
        ("hidden_size", hidden_size, 1),
        ("intermediate_size", intermediate_size, 1),
        ("num_experts", num_experts, 1),
        ("num_shared_experts", num_shared_experts, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}; got {value}")
    options.routing.check_experts(num_experts)
    if options.quantization is not None:
        options.quantization.check_k("wi_0, wi_1 (K = hidden_size)", hidden_size)
        options.quantization.check_k("wo (K = intermediate_size)", intermediate_size)
    if use_shared_expert_gate and not num_shared_experts:
        raise ValueError("use_shared_expert_gate needs num_shared_experts >= 1")


def check_mesh(hidden_size, intermediate_size, num_experts, expert_axis, embed_axis, mlp_axis) -> None:
    """Raises ValueError, naming the size, when the context mesh (``jax.set_mesh``) would split a
    dimension of the expert weights into unequal parts: the mesh axes a logical axis name maps to
    (through Flax's logical axis rules, or as itself) must divide that dimension."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return
    spec = spmd.apply_rules(PartitionSpec(expert_axis, embed_axis, mlp_axis), None)
    dims = (("num_experts", num_experts, expert_axis), ("hidden_size", hidden_size, embed_axis),
            ("intermediate_size", intermediate_size, mlp_axis))
    for (name, size, logical), entry in zip(dims, spec):
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ()) if a in mesh.shape)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            raise ValueError(
                f"{name}={size} must be divisible by {parts}, the size of the mesh axes {axes} that its "
                f"logical axis {logical!r} maps to"
            )


def _whole(array):
    """``array`` resharded whole onto every device where its type says it is split (Explicit
    mesh axes): the router's [H, E] kernel split on H (FSDP-style) would leave the sharding of its
    product with the tokens ambiguous."""
    sharding = getattr(jax.typeof(array), "sharding", None)
    if sharding is None or sharding.mesh.empty or not any(sharding.spec):
        return array
    return jax.sharding.reshard(array, NamedSharding(sharding.mesh, PartitionSpec()))


def load_balancing_loss(router_logits, ids, num_experts: int, scoring: str = "softmax"):
    """Switch Transformer: ``E * sum_e fraction_of_tokens_e * mean_router_prob_e``, where a token
    counts for every expert among its top-k (so a perfectly balanced router scores top_k). With
    sigmoid scoring the probabilities are the scores normalized over the experts (DeepSeek-V3's
    complementary balance loss)."""
    logits = router_logits.reshape(-1, num_experts).astype(jnp.float32)
    if logits.shape[0] == 0:
        return jnp.zeros((), jnp.float32)  # no token: nothing to balance
    probs = layer_math.scores(logits, scoring)
    if scoring == "sigmoid":
        probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    # A sum of one-hots rather than a scatter: it keeps the tokens' sharding on a mesh.
    chosen = jnp.sum(jax.nn.one_hot(ids.reshape(-1, ids.shape[-1]), num_experts, dtype=probs.dtype), axis=1)
    return num_experts * jnp.sum(jnp.mean(chosen, axis=0) * jnp.mean(probs, axis=0))


def router_z_loss(router_logits):
    """ST-MoE: the mean over tokens of ``logsumexp(logits)^2`` (0 without tokens)."""
    if router_logits.size == 0:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1) ** 2)


EXPERT_PARAMS = ("wi_0", "wi_1", "wo", "wi_0_bias", "wi_1_bias", "wo_bias", "shared_wi_0", "shared_wi_1", "shared_wo")
EXPERT_MATRICES = ("wi_0", "wi_1", "wo", "shared_wi_0", "shared_wi_1", "shared_wo")


def quantized_init(init, quantization: jax_moe.Quantization):
    """An initializer of quantized expert weights: ``init``'s float weights, quantized. A fresh
    quantized layer is for shapes and tests; its weights normally come from a checkpoint."""

    def quantized(key, shape, dtype):
        return jax_moe.quantize(init(key, shape, dtype), quantization)

    return quantized
_FUSED_MOE_NAMES = dict(
    wi_0="w_gate", wi_1="w_up", wo="w_down", wi_0_bias="gate_bias", wi_1_bias="up_bias",
    wo_bias="down_bias", shared_wi_0="shared_w_gate", shared_wi_1="shared_w_up", shared_wo="shared_w_down",
)


def moe_forward(x, router_kernel, router_bias, selection_bias, experts: dict, shared_gate, options: LayerOptions):
    """The layer from raw parameters: ([..., H] output, {aux loss name: weighted value},
    {statistic name: value}), the statistics being, with an expert capacity, the number of pairs
    it dropped (``DROPPED_PAIRS``): a count to log, never a loss.

    ``experts`` maps the names of ``EXPERT_PARAMS`` that the layer has to their arrays. The router
    runs in float32 (routing decisions are sensitive to rounding); the experts run in
    ``options.dtype``, or the promoted dtype of ``x`` and the weights when that is None. Biases
    and the shared gate stay in their parameter dtype.
    """
    hidden = router_kernel.shape[0]
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must have a floating-point dtype; got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != hidden:
        raise ValueError(f"x must have shape [..., hidden_size] = [..., {hidden}]; got shape {list(x.shape)}")
    # Quantized weights are dequantized to the activations' dtype inside the kernels.
    quantized = options.quantization is not None
    compute_dtype = options.dtype or (x.dtype if quantized else jnp.result_type(x.dtype, experts["wi_0"].dtype))
    # HIGHEST: on GPUs a float32 dot may otherwise round its inputs to tf32 (~1e-3), enough to
    # flip experts whose scores are that close; the router is a small GEMM beside the experts.
    logits = jnp.dot(
        x.astype(jnp.float32), _whole(router_kernel).astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    if router_bias is not None:
        logits = logits + _whole(router_bias).astype(jnp.float32)
    weights = jax_moe.ExpertWeights(
        **{_FUSED_MOE_NAMES[name]: value.astype(compute_dtype) if name in EXPERT_MATRICES and not quantized else value
           for name, value in experts.items()},
        shared_gate=shared_gate,
    )
    y, _, ids = jax_moe.fused_moe(
        x.astype(compute_dtype), logits, experts=weights, routing=options.routing, selection_bias=selection_bias,
        activation=options.activation, backend=options.backend, expert_exchange=options.expert_exchange,
        batch_invariant=options.batch_invariant,
        return_routing=True,
    )
    aux = {}
    if options.load_balancing_loss_weight:
        aux[LOAD_BALANCING_LOSS] = options.load_balancing_loss_weight * load_balancing_loss(
            logits, ids, weights.num_routed, options.routing.scoring
        )
    if options.router_z_loss_weight:
        aux[ROUTER_Z_LOSS] = options.router_z_loss_weight * router_z_loss(logits)
    stats = {}
    if options.routing.capacity_factor is not None:
        stats[DROPPED_PAIRS] = jnp.sum(ids < 0)
    return y, aux, stats
