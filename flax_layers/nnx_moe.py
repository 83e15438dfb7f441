"""``FusedMoE`` for Flax NNX."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

from flax_layers import moe_math


class FusedMoE(nnx.Module):
    """A Mixture-of-Experts feed-forward layer (router + SwiGLU experts) on jax-moe's fused kernels.

    Parameters carry MaxText's names, so checkpoints map over: ``gate`` (the router, a linear
    layer with ``kernel`` [H, E] and, if ``use_router_bias``, ``bias`` [E]), ``wi_0`` (gate
    projection) and ``wi_1`` (up projection) [E, H, F], ``wo`` (down projection) [E, F, H]. Every
    parameter carries logical sharding names (``expert_axis``, ``embed_axis``, ``mlp_axis``).

    Auxiliary losses, weighted and sown as ``nnx.Intermediate`` when their weight is non-zero:
    ``load_balancing_loss`` (Switch Transformer) and ``router_z_loss`` (ST-MoE). Collect them after
    a call with ``nnx.pop(model, nnx.Intermediate)``.

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from flax_layers import FusedMoE
      >>> layer = FusedMoE(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2,
      ...                  backend="reference", load_balancing_loss_weight=0.01, rngs=nnx.Rngs(0))
      >>> y = layer(jnp.ones((2, 3, 16)))
      >>> y.shape
      (2, 3, 16)
      >>> sorted(nnx.pop(layer, nnx.Intermediate).keys())
      ['load_balancing_loss']

    Args:
      hidden_size: H, the model dimension.
      intermediate_size: F, each expert's hidden dimension.
      num_experts: E.
      top_k: experts per token, in [1, E].
      renormalize: divide the top-k routing weights by their sum (Mixtral, Qwen3).
      dtype: computation dtype of the experts (None: promote input and parameter dtypes). The
        router always computes in float32.
      param_dtype: dtype of the parameters.
      kernel_init: initializer of the [E, fan_in, fan_out] expert weights.
      router_init: initializer of the router kernel.
      use_router_bias: give the router a bias.
      router_bias_init: initializer of that bias.
      backend: jax_moe backend, "auto", "triton", "interpret" or "reference".
      load_balancing_loss_weight: weight of the load-balancing loss (0: not computed).
      router_z_loss_weight: weight of the router z-loss (0: not computed).
      expert_axis, embed_axis, mlp_axis: logical axis names for sharding.
      rngs: random number generators for the initializers.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        renormalize: bool = True,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = moe_math.expert_kernel_init(),
        router_init: Initializer = nnx.initializers.lecun_normal(),
        use_router_bias: bool = False,
        router_bias_init: Initializer = nnx.initializers.zeros_init(),
        backend: str = "auto",
        load_balancing_loss_weight: float = 0.0,
        router_z_loss_weight: float = 0.0,
        expert_axis: str | None = "expert",
        embed_axis: str | None = "embed",
        mlp_axis: str | None = "mlp",
        rngs: nnx.Rngs,
    ):
        moe_math.check_config(
            hidden_size, intermediate_size, num_experts, top_k, backend,
            dict(load_balancing_loss_weight=load_balancing_loss_weight, router_z_loss_weight=router_z_loss_weight),
        )
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.backend = backend
        self.load_balancing_loss_weight = load_balancing_loss_weight
        self.router_z_loss_weight = router_z_loss_weight

        # Flax shards annotated parameters as it creates them, which needs a mesh. Without one the
        # logical names stay metadata only, for nnx.get_partition_spec and a later device_put.
        has_mesh = not jax.sharding.get_abstract_mesh().empty
        with nnx.use_eager_sharding(nnx.using_eager_sharding() and has_mesh):
            self.gate = nnx.Linear(
                hidden_size,
                num_experts,
                use_bias=use_router_bias,
                dtype=jnp.float32,
                param_dtype=param_dtype,
                kernel_init=nnx.with_partitioning(router_init, (embed_axis, None)),
                bias_init=nnx.with_partitioning(router_bias_init, (None,)),
                rngs=rngs,
            )
            up_shape = (num_experts, hidden_size, intermediate_size)
            up_init = nnx.with_partitioning(kernel_init, (expert_axis, embed_axis, mlp_axis))
            self.wi_0 = nnx.Param(up_init(rngs.params(), up_shape, param_dtype))
            self.wi_1 = nnx.Param(up_init(rngs.params(), up_shape, param_dtype))
            down_shape = (num_experts, intermediate_size, hidden_size)
            down_init = nnx.with_partitioning(kernel_init, (expert_axis, mlp_axis, embed_axis))
            self.wo = nnx.Param(down_init(rngs.params(), down_shape, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden_size] -> [..., hidden_size]."""
        y, aux = moe_math.moe_forward(
            x,
            self.gate.kernel[...],
            self.gate.bias[...] if self.gate.bias is not None else None,
            self.wi_0[...],
            self.wi_1[...],
            self.wo[...],
            top_k=self.top_k,
            renormalize=self.renormalize,
            dtype=self.dtype,
            backend=self.backend,
            load_balancing_loss_weight=self.load_balancing_loss_weight,
            router_z_loss_weight=self.router_z_loss_weight,
        )
        for name, value in aux.items():
            self.sow(nnx.Intermediate, name, value)
        return y
