"""``FusedMoE`` for Flax NNX."""

from __future__ import annotations

import typing as tp

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype, Initializer

import jax_moe
from flax_layers import moe_math


class SelectionBias(nnx.Variable):
    """A router's expert-selection bias (DeepSeek-V3's ``e_score_correction_bias``). Not a
    ``Param``: it changes which experts win, has no gradient, and is set by a load-balancing rule
    or a checkpoint, not by the optimizer."""


class RoutingStats(nnx.Variable):
    """Counts the layer sows about its routing (``dropped_pairs`` with an expert capacity): to log,
    apart from the ``nnx.Intermediate`` auxiliary losses that a training loop adds to its loss."""


class QuantizedWeight(nnx.Variable):
    """A quantized expert weight (a ``jax_moe.QuantizedArray``). Not a ``Param``: quantized weights
    are frozen, so ``nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))`` and optimizers over
    ``nnx.Param`` leave them alone (differentiating them raises ``ValueError`` in ``jax_moe``)."""


class FusedMoE(nnx.Module):
    """A Mixture-of-Experts feed-forward layer (router + gated experts) on jax-moe's fused kernels.

    Covers Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3 and gpt-oss blocks; ``flax_layers.checkpoints``
    builds the arguments and loads the weights of each from Hugging Face checkpoints.

    Parameters carry MaxText's names, so checkpoints map over: ``gate`` (the router, a linear
    layer with ``kernel`` [H, E] and, if ``use_router_bias``, ``bias`` [E]), ``wi_0`` (gate
    projection) and ``wi_1`` (up projection) [E, H, F], ``wo`` (down projection) [E, F, H]; with
    ``use_expert_bias``, ``wi_0_bias``/``wi_1_bias`` [E, F] and ``wo_bias`` [E, H]; with shared
    experts, ``shared_wi_0``/``shared_wi_1`` [S, H, F], ``shared_wo`` [S, F, H] and, if gated,
    ``shared_gate`` [H]; with ``use_selection_bias``, ``selection_bias`` [E] (a ``SelectionBias``
    variable, not a ``Param``). With ``quantization``, the six expert matrices are
    ``QuantizedWeight`` variables holding ``jax_moe.QuantizedArray``s of those logical shapes
    (frozen; the router, biases and shared gate stay float ``Param``s), on one device. Every parameter carries logical sharding names (``expert_axis``,
    ``embed_axis``, ``mlp_axis``).

    Sharding: built under a mesh of Explicit axes (``jax.set_mesh``), with Flax's logical axis rules
    (``nnx.logical_axis_rules``) mapping those names to mesh axes, the parameters are created
    sharded, and each call runs in the layout their shardings and the tokens' give
    (``jax_moe.sharding``): ``expert_axis`` -> expert parallel, ``mlp_axis`` -> tensor parallel,
    ``embed_axis`` -> weights stored split on H, gathered per call; the tokens' sharding -> data
    parallel. A size its mesh axes don't divide raises ``ValueError`` here, naming it.

    Auxiliary losses, weighted and sown as ``nnx.Intermediate`` when their weight is non-zero:
    ``load_balancing_loss`` (Switch Transformer) and ``router_z_loss`` (ST-MoE). Collect them with
    ``nnx.capture(model, nnx.Intermediate)``, which returns them beside the output. With an expert
    capacity (``Routing.capacity_factor``) the layer also sows ``dropped_pairs``, the number of
    (token, expert) pairs it dropped, as a ``RoutingStats`` variable (not a loss).

    Example::

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jax_moe import Routing
      >>> from flax_layers import FusedMoE
      >>> layer = FusedMoE(16, 32, num_experts=4, routing=Routing(top_k=2), backend="reference",
      ...                  load_balancing_loss_weight=0.01, rngs=nnx.Rngs(0))
      >>> y, aux = nnx.capture(layer, nnx.Intermediate)(jnp.ones((2, 3, 16)))
      >>> y.shape
      (2, 3, 16)
      >>> sorted(aux.keys())
      ['load_balancing_loss']
      >>> deepseek_routing = Routing(top_k=4, scoring="sigmoid", num_groups=4, top_groups=2,
      ...                            routed_scaling_factor=2.5)
      >>> deepseek_like = FusedMoE(16, 8, num_experts=16, routing=deepseek_routing,
      ...                          use_selection_bias=True, num_shared_experts=1,
      ...                          backend="reference", rngs=nnx.Rngs(0))
      >>> deepseek_like(jnp.ones((3, 16))).shape
      (3, 16)

    Args:
      hidden_size: H, the model dimension.
      intermediate_size: F, each expert's hidden dimension.
      num_experts: E, routed experts.
      routing: a ``jax_moe.Routing``: top_k, scoring, renormalization, groups, scaling.
      use_selection_bias: a per-expert bias added to the scores for selection only (DeepSeek-V3).
      activation: "silu", "clamped_swiglu" (gpt-oss) or a ``jax_moe.Activation``.
      use_expert_bias: biases on the expert projections (gpt-oss).
      num_shared_experts: S shared experts of width F that every token uses, computed in the same
        kernel launches (a shared expert of width m * F is m of them).
      use_shared_expert_gate: scale the shared experts by ``sigmoid(x @ shared_gate)`` (Qwen2-MoE).
      dtype: computation dtype of the experts (None: promote input and parameter dtypes). The
        router always computes in float32.
      param_dtype: dtype of the parameters.
      kernel_init: initializer of the [E, fan_in, fan_out] expert weights (and the shared ones).
      bias_init: initializer of the expert biases.
      router_init: initializer of the router kernel.
      use_router_bias: give the router a bias (gpt-oss).
      router_bias_init: initializer of that bias.
      shared_gate_init: initializer of the [H] shared-expert gate.
      backend: jax_moe backend, "auto", "triton", "interpret" or "reference".
      load_balancing_loss_weight: weight of the load-balancing loss (0: not computed).
      router_z_loss_weight: weight of the router z-loss (0: not computed).
      expert_exchange: how expert parallelism moves the pairs, "all_gather" or "all_to_all"
        (``jax_moe.fused_moe``).
      batch_invariant: a token's output bitwise independent of its batch (``jax_moe.fused_moe``).
      expert_axis, embed_axis, mlp_axis: logical axis names for sharding.
      quantization: a ``jax_moe.Quantization``: the expert matrices (routed and shared) are held
        quantized, as ``QuantizedWeight`` variables (initialized as ``kernel_init`` quantized;
        ``flax_layers.checkpoints`` loads fp8 and MXFP4 checkpoints as they are stored). The
        experts then compute in ``dtype`` or the input's dtype.
      rngs: random number generators for the initializers.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        routing: jax_moe.Routing,
        *,
        use_selection_bias: bool = False,
        activation: str | jax_moe.Activation = "silu",
        use_expert_bias: bool = False,
        num_shared_experts: int = 0,
        use_shared_expert_gate: bool = False,
        dtype: tp.Optional[Dtype] = None,
        param_dtype: Dtype = jnp.float32,
        kernel_init: Initializer = moe_math.expert_kernel_init(),
        bias_init: Initializer = nnx.initializers.zeros_init(),
        router_init: Initializer = nnx.initializers.lecun_normal(),
        use_router_bias: bool = False,
        router_bias_init: Initializer = nnx.initializers.zeros_init(),
        shared_gate_init: Initializer = nnx.initializers.normal(0.02),
        backend: str = "auto",
        load_balancing_loss_weight: float = 0.0,
        router_z_loss_weight: float = 0.0,
        expert_exchange: str = "all_gather",
        batch_invariant: bool = False,
        expert_axis: str | None = "expert",
        embed_axis: str | None = "embed",
        mlp_axis: str | None = "mlp",
        quantization: jax_moe.Quantization | None = None,
        rngs: nnx.Rngs,
    ):
        self.options = moe_math.layer_options(
            routing, activation, dtype, backend, load_balancing_loss_weight, router_z_loss_weight,
            expert_exchange=expert_exchange, batch_invariant=batch_invariant, quantization=quantization,
        )
        moe_math.check_config(
            hidden_size, intermediate_size, num_experts, num_shared_experts, use_shared_expert_gate, self.options
        )
        moe_math.check_mesh(hidden_size, intermediate_size, num_experts, expert_axis, embed_axis, mlp_axis)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.param_dtype = param_dtype

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
            self.selection_bias = (
                SelectionBias(jnp.zeros((num_experts,), jnp.float32)) if use_selection_bias else None
            )
            up_axes = (expert_axis, embed_axis, mlp_axis)
            down_axes = (expert_axis, mlp_axis, embed_axis)

            def param(init, shape, axes):
                return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, param_dtype))

            def matrix(shape, axes):
                if quantization is None:
                    return param(kernel_init, shape, axes)
                init = moe_math.quantized_init(kernel_init, quantization)
                return QuantizedWeight(init(rngs.params(), shape, param_dtype))

            up_shape = (num_experts, hidden_size, intermediate_size)
            down_shape = (num_experts, intermediate_size, hidden_size)
            self.wi_0 = matrix(up_shape, up_axes)
            self.wi_1 = matrix(up_shape, up_axes)
            self.wo = matrix(down_shape, down_axes)
            if use_expert_bias:
                self.wi_0_bias = param(bias_init, up_shape[::2], (expert_axis, mlp_axis))
                self.wi_1_bias = param(bias_init, up_shape[::2], (expert_axis, mlp_axis))
                self.wo_bias = param(bias_init, down_shape[::2], (expert_axis, embed_axis))
            if num_shared_experts:
                shared_up = (num_shared_experts, hidden_size, intermediate_size)
                shared_down = (num_shared_experts, intermediate_size, hidden_size)
                self.shared_wi_0 = matrix(shared_up, (None, embed_axis, mlp_axis))
                self.shared_wi_1 = matrix(shared_up, (None, embed_axis, mlp_axis))
                self.shared_wo = matrix(shared_down, (None, mlp_axis, embed_axis))
            self.shared_gate = (
                param(shared_gate_init, (hidden_size,), (embed_axis,)) if use_shared_expert_gate else None
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """[..., hidden_size] -> [..., hidden_size]."""
        experts = {
            name: getattr(self, name).get_value() for name in moe_math.EXPERT_PARAMS if hasattr(self, name)
        }
        y, aux, stats = moe_math.moe_forward(
            x,
            self.gate.kernel[...],
            self.gate.bias[...] if self.gate.bias is not None else None,
            self.selection_bias[...] if self.selection_bias is not None else None,
            experts,
            self.shared_gate[...] if self.shared_gate is not None else None,
            self.options,
        )
        for name, value in aux.items():
            self.sow(nnx.Intermediate, name, value)
        for name, value in stats.items():
            self.sow(RoutingStats, name, value)
        return y
