"""jax-moe: fused Mixture-of-Experts layers for JAX, as Triton kernels on NVIDIA GPUs."""

from jax_moe import reference
from jax_moe.api import BACKENDS, fused_moe, moe_experts, route

__version__ = "0.1.0"
__all__ = ["BACKENDS", "fused_moe", "moe_experts", "reference", "route", "__version__"]
