"""Flax layers built on jax_moe: ``FusedMoE`` (NNX), its linen twin ``flax_layers.linen.FusedMoE``,
and ``flax_layers.checkpoints``, which loads Hugging Face MoE blocks into them."""

from flax_layers import checkpoints, linen
from flax_layers.nnx_moe import FusedMoE, QuantizedWeight, RoutingStats

__all__ = ["FusedMoE", "QuantizedWeight", "RoutingStats", "checkpoints", "linen"]
