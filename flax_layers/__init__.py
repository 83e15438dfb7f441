"""Flax layers built on jax_moe: ``FusedMoE`` (NNX) and its linen twin ``flax_layers.linen.FusedMoE``."""

from flax_layers import linen
from flax_layers.nnx_moe import FusedMoE

__all__ = ["FusedMoE", "linen"]
