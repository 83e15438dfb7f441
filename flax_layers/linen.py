"""``FusedMoE`` for Flax linen: the twin of ``flax_layers.FusedMoE`` (NNX), with the same parameter
names, shapes and results, so a checkpoint moves between the two."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype, Initializer

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
    ``intermediates`` collection (``apply(..., mutable=["intermediates"])``).

    Example::

      >>> import jax, jax.numpy as jnp
      >>> from flax_layers.linen import FusedMoE
      >>> layer = FusedMoE(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2, backend="reference")
      >>> params = layer.init(jax.random.key(0), jnp.ones((3, 16)))
      >>> layer.apply(params, jnp.ones((3, 16))).shape
      (3, 16)
    """

    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    renormalize: bool = True
    dtype: tp.Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Initializer = moe_math.expert_kernel_init()
    router_init: Initializer = nn.initializers.lecun_normal()
    use_router_bias: bool = False
    router_bias_init: Initializer = nn.initializers.zeros_init()
    backend: str = "auto"
    load_balancing_loss_weight: float = 0.0
    router_z_loss_weight: float = 0.0
    expert_axis: str | None = "expert"
    embed_axis: str | None = "embed"
    mlp_axis: str | None = "mlp"

    def __post_init__(self):
        moe_math.check_config(
            self.hidden_size, self.intermediate_size, self.num_experts, self.top_k, self.backend,
            dict(load_balancing_loss_weight=self.load_balancing_loss_weight, router_z_loss_weight=self.router_z_loss_weight),
        )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden_size] -> [..., hidden_size]."""
        router_kernel, router_bias = _RouterParams(
            self.num_experts, self.use_router_bias, self.param_dtype, self.router_init,
            self.router_bias_init, self.embed_axis, name="gate",
        )(self.hidden_size)
        up_init = nn.with_logical_partitioning(self.kernel_init, (self.expert_axis, self.embed_axis, self.mlp_axis))
        up_shape = (self.num_experts, self.hidden_size, self.intermediate_size)
        wi_0 = self.param("wi_0", up_init, up_shape, self.param_dtype)
        wi_1 = self.param("wi_1", up_init, up_shape, self.param_dtype)
        wo = self.param(
            "wo",
            nn.with_logical_partitioning(self.kernel_init, (self.expert_axis, self.mlp_axis, self.embed_axis)),
            (self.num_experts, self.intermediate_size, self.hidden_size),
            self.param_dtype,
        )
        y, aux = moe_math.moe_forward(
            x, router_kernel, router_bias, wi_0, wi_1, wo,
            top_k=self.top_k, renormalize=self.renormalize, dtype=self.dtype, backend=self.backend,
            load_balancing_loss_weight=self.load_balancing_loss_weight,
            router_z_loss_weight=self.router_z_loss_weight,
        )
        for name, value in aux.items():
            self.sow("intermediates", name, value)
        return y
