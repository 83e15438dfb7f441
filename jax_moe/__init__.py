"""jax-moe: fused Mixture-of-Experts layers for JAX, as Triton kernels on NVIDIA GPUs."""

from jax_moe import reference
from jax_moe.api import BACKENDS, fused_moe, moe_experts, route, split_shared_expert
from jax_moe.options import GPT_OSS_SWIGLU, SILU, Activation, ExpertWeights, Routing
from jax_moe.quantization import QuantizedArray, Quantization, dequantize, quantize

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "GPT_OSS_SWIGLU",
    "SILU",
    "Activation",
    "ExpertWeights",
    "QuantizedArray",
    "Quantization",
    "Routing",
    "dequantize",
    "fused_moe",
    "moe_experts",
    "quantize",
    "reference",
    "route",
    "split_shared_expert",
    "__version__",
]
