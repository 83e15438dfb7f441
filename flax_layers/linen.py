"""``FusedMoE`` for Flax linen: the twin of ``flax_layers.FusedMoE`` (NNX), with the same parameter
names, shapes and results, so a checkpoint moves between the two."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer

import jax_moe
from flax_layers import moe_math


class _RouterParams(nn.Module):
    """Holds the router's parameters under the name ``gate``, as ``nn.Dense`` would."""

    num_experts: int
    use_bias: bool
    param_dtype: Dtype
    kernel_init: Initializer
    bias_init: Initializer
    embed_axis: str | None

    @nn.compact
    def __call__(self, hidden_size: int):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, (self.embed_axis, None)),
            (hidden_size, self.num_experts),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias", nn.with_logical_partitioning(self.bias_init, (None,)), (self.num_experts,), self.param_dtype
            )
        return kernel, bias


class FusedMoE(nn.Module):
    """A Mixture-of-Experts feed-forward layer on jax-moe's fused kernels (linen).

    Same arguments and semantics as ``flax_layers.FusedMoE``; auxiliary losses are sown into the
    ``intermediates`` collection (``apply(..., mutable=["intermediates"])``), the count of dropped
    pairs (with an expert capacity) into ``routing_stats``, and the selection
    bias lives in the ``routing`` collection, not in ``params``. Sharded as the NNX layer is, from
    the context mesh and the logical axis rules, with the parameters placed by
    ``nn.logical_to_mesh_sharding``; the sizes are checked against the mesh at each call. With
    ``quantization`` the expert matrices are ``jax_moe.QuantizedArray``s in the ``quantized``
    collection, not in ``params``: frozen, out of reach of optimizers over ``params``.

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from jax_moe import Routing
      >>> from flax_layers.linen import FusedMoE
      >>> layer = FusedMoE(16, 32, num_experts=4, routing=Routing(top_k=2), backend="reference")
      >>> params = layer.init(jax.random.key(0), jnp.ones((3, 16)))
      >>> layer.apply(params, jnp.ones((3, 16))).shape
      (3, 16)
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    routing: jax_moe.Routing
    use_selection_bias: bool = False
    activation: str | jax_moe.Activation = "silu"
    use_expert_bias: bool = False
    num_shared_experts: int = 0
    use_shared_expert_gate: bool = False
    dtype: tp.Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = moe_math.expert_kernel_init()
    bias_init: Initializer = nn.initializers.zeros_init()
    router_init: Initializer = nn.initializers.lecun_normal()
    use_router_bias: bool = False
    router_bias_init: Initializer = nn.initializers.zeros_init()
    shared_gate_init: Initializer = nn.initializers.normal(0.02)
    backend: str = "auto"
    load_balancing_loss_weight: float = 0.0
    router_z_loss_weight: float = 0.0
    expert_exchange: str = "all_gather"
    batch_invariant: bool = False
    expert_axis: str | None = "expert"
    embed_axis: str | None = "embed"
    mlp_axis: str | None = "mlp"
    quantization: jax_moe.Quantization | None = None

    @property
    def options(self) -> moe_math.LayerOptions:
        return moe_math.layer_options(
            self.routing, self.activation, self.dtype, self.backend, self.load_balancing_loss_weight,
            self.router_z_loss_weight, expert_exchange=self.expert_exchange,
            batch_invariant=self.batch_invariant, quantization=self.quantization,
        )

    def __post_init__(self):
        moe_math.check_config(
            self.hidden_size, self.intermediate_size, self.num_experts, self.num_shared_experts,
            self.use_shared_expert_gate, self.options,
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden_size] -> [..., hidden_size]."""
        moe_math.check_mesh(
            self.hidden_size, self.intermediate_size, self.num_experts, self.expert_axis, self.embed_axis,
            self.mlp_axis,
        )
        router_kernel, router_bias = _RouterParams(
            self.num_experts, self.use_router_bias, self.param_dtype, self.router_init,
            self.router_bias_init, self.embed_axis, name="gate",
        )(self.hidden_size)
        selection_bias = None
        if self.use_selection_bias:
            selection_bias = self.variable(
                "routing", "selection_bias", jnp.zeros, (self.num_experts,), jnp.float32
            ).value

        def param(name, init, shape, axes):
            return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype)

        def matrix(name, shape, axes):
            if self.quantization is None:
                return param(name, self.kernel_init, shape, axes)
            init = moe_math.quantized_init(self.kernel_init, self.quantization)
            make = lambda: init(self.make_rng("params"), shape, self.param_dtype)  # noqa: E731
            return self.variable("quantized", name, make).value

        e, h, f = self.num_experts, self.hidden_size, self.intermediate_size
        up_axes = (self.expert_axis, self.embed_axis, self.mlp_axis)
        down_axes = (self.expert_axis, self.mlp_axis, self.embed_axis)
        experts = {
            "wi_0": matrix("wi_0", (e, h, f), up_axes),
            "wi_1": matrix("wi_1", (e, h, f), up_axes),
            "wo": matrix("wo", (e, f, h), down_axes),
        }
        if self.use_expert_bias:
            experts["wi_0_bias"] = param("wi_0_bias", self.bias_init, (e, f), (self.expert_axis, self.mlp_axis))
            experts["wi_1_bias"] = param("wi_1_bias", self.bias_init, (e, f), (self.expert_axis, self.mlp_axis))
            experts["wo_bias"] = param("wo_bias", self.bias_init, (e, h), (self.expert_axis, self.embed_axis))
        s = self.num_shared_experts
        if s:
            shared_up_axes = (None, self.embed_axis, self.mlp_axis)
            experts["shared_wi_0"] = matrix("shared_wi_0", (s, h, f), shared_up_axes)
            experts["shared_wi_1"] = matrix("shared_wi_1", (s, h, f), shared_up_axes)
            experts["shared_wo"] = matrix("shared_wo", (s, f, h), (None, self.mlp_axis, self.embed_axis))
        shared_gate = None
        if self.use_shared_expert_gate:
            shared_gate = param("shared_gate", self.shared_gate_init, (h,), (self.embed_axis,))
        y, aux, stats = moe_math.moe_forward(
            x, router_kernel, router_bias, selection_bias, experts, shared_gate, self.options
        )
        for name, value in aux.items():
            self.sow("intermediates", name, value)
        for name, value in stats.items():
            self.sow("routing_stats", name, value)
        return y
