"""Quantized expert weights on the triton backend.

On the GPU (tests marked ``gpu``; skipped without one): every scheme against the reference
backend, which is the quantized layer's specification (dequantize to the activation dtype, then
the same math; w8a8 with the activations through fp8), forward and the activation and router
gradients. Outputs are poisoned as in ``test_gpu``: a NaN-filled buffer of the output's size is
freed right before the kernels run. Anywhere: the quantized kernels compile for Hopper and fit its
shared memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import pipeline, tile_configs

import numpy_moe
import numpy_quant

# A Mixtral-like layer, narrowed: H and F multiples of every group and block size.
E, H, F, TOP_K = 8, 2048, 1024, 2


def _layer(num_tokens: int, scheme):
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (num_tokens, H), jnp.bfloat16)
    logits = jax.random.normal(keys[1], (num_tokens, E))
    weights = (
        jax.random.normal(keys[2], (E, H, F)) * H**-0.5,
        jax.random.normal(keys[3], (E, H, F)) * H**-0.5,
        jax.random.normal(keys[4], (E, F, H)) * F**-0.5,
    )
    return x, logits, weights, [jax_moe.quantize(w, scheme) for w in weights]


def _layer_fn(backend: str):
    return jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=TOP_K, backend=backend))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 77, 512])
@pytest.mark.parametrize("name", numpy_quant.SCHEMES)
def test_triton_matches_the_quantized_reference(name, num_tokens):
    scheme = numpy_quant.SCHEMES[name]
    x, logits, weights, quantized = _layer(num_tokens, scheme)
    jnp.full((num_tokens, H), jnp.nan, jnp.bfloat16).block_until_ready()
    out = _layer_fn("triton")(x, logits, *quantized)
    out.block_until_ready()
    assert np.isfinite(np.asarray(out, np.float32)).all()
    ref = np.asarray(_layer_fn("reference")(x, logits, *quantized), np.float64)
    unquantized = np.asarray(_layer_fn("reference")(x, logits, *(w.astype(jnp.bfloat16) for w in weights)), np.float64)
    error = numpy_moe.rel_error(out, ref)
    print(f"{name} T={num_tokens}: {error:.2e} vs the quantized reference, "
          f"{numpy_moe.rel_error(out, unquantized):.2e} vs the bf16 layer on the unquantized weights")
    if scheme.activations == "fp8":
        # Rounding the gated activation to e4m3 (steps of 6-12%) turns a last-bit difference of a
        # bf16 intermediate into a whole step, and XLA:GPU keeps some of the reference's
        # intermediates in fp32: the float64 spec, which rounds where the kernels do, is the measure.
        dequantized = [numpy_quant.dequantize(q) for q in quantized]
        block = scheme.block_size if scheme.granularity == "block" else None
        spec = numpy_quant.w8a8_fused_moe(x, logits, *dequantized, top_k=TOP_K, block=block)
        error = numpy_moe.rel_error(out, spec)
        print(f"{name} T={num_tokens}: {error:.2e} vs the float64 w8a8 spec")
        # The reference rounds activations to fp8 too (a reference that skips it is 4.3e-2 off).
        assert numpy_moe.rel_error(ref, spec) <= 3e-2
    assert error <= 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["mxfp4", "int4-group64-zp", "fp8-block-w8a8"])
def test_triton_gradients_match_the_reference(name):
    scheme = numpy_quant.SCHEMES[name]
    x, logits, _, quantized = _layer(77, scheme)
    cotangent = jax.random.normal(jax.random.key(3), x.shape, jnp.bfloat16)

    def loss(x, logits, backend):
        return jnp.sum(jax_moe.fused_moe(x, logits, *quantized, top_k=TOP_K, backend=backend) * cotangent)

    grads = {b: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(x, logits, b) for b in ("triton", "reference")}
    # w8a8: the kernels' routing-weight gradient takes the gated activation before its fp8 rounding.
    tolerance = 6e-2 if scheme.activations == "fp8" else 2e-2
    for got, ref in zip(grads["triton"], grads["reference"]):
        assert numpy_moe.rel_error(got, np.asarray(ref, np.float64)) <= tolerance


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fp8-channel", "fp8-block-w8a8", "int4-group64-zp", "mxfp4"])
def test_the_layer_keeps_no_copy_of_a_weight_in_device_memory(name):
    """The compiled layer's temporary buffers hold less than one weight matrix's stored values:
    neither a dequantized copy nor a copy of the stored bytes ever sits in device memory."""
    scheme = numpy_quant.SCHEMES[name]
    x, logits, _, quantized = _layer(77, scheme)
    compiled = _layer_fn("triton").lower(x, logits, *quantized).compile()
    temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    assert temp_bytes < min(q.values.nbytes for q in quantized), temp_bytes


# Shared memory one block may use on sm_90 (227 KiB); a kernel asking for more fails at launch.
HOPPER_SHARED_MEMORY = 232448


@pytest.mark.parametrize("num_tokens", [1, 77, 1024])  # one per bucket of the fallback tiles
@pytest.mark.parametrize("name", ["fp8-channel", "fp8-block-w8a8", "int8-group32-zp", "int4-group64-zp", "mxfp4"])
def test_quantized_kernels_fit_hopper(benchmark_module, name, num_tokens):
    """Every GEMM launch of a quantized training step (forward and the activation gradients),
    compiled for sm_90 with Hopper's tiles by Triton's bundled ptxas, asks for no more shared
    memory than a block has: no GPU needed, nothing runs (kernel_resources' recording launcher)."""
    resources = benchmark_module("kernel_resources")
    records = []
    config = tile_configs.select(num_tokens * TOP_K, 2, "cuda-sm90")
    plan = pipeline.Plan(config=config, dot_precision="tf32", launch=resources.recording_launcher(records))
    scheme = numpy_quant.SCHEMES[name]
    x, logits, _, quantized = jax.eval_shape(functools.partial(_layer, num_tokens, scheme))

    def loss(x, logits):
        weights, ids = pipeline.top_k_routing(logits, None, routing=jax_moe.Routing(TOP_K), launch=plan.launch)
        out = pipeline.experts(x, weights, ids, jax_moe.ExpertWeights(*quantized), plan=plan)
        return jnp.sum(out.astype(jnp.float32))

    jax.eval_shape(jax.grad(loss, argnums=(0, 1)), x, logits)
    gemms = [r for r in records if r.constexprs.get("W_FORMAT") == scheme.format]
    assert [r.kernel.__name__ for r in gemms] == [
        "gate_up_kernel", "expert_gemm_combine_kernel", "gate_up_backward_kernel", "expert_gemm_combine_kernel",
    ]
    for record in gemms:
        compiled = resources.compile_record(record, 90)
        assert compiled.asm["cubin"]
        assert compiled.metadata.shared <= HOPPER_SHARED_MEMORY, (record.kernel.__name__, compiled.metadata.shared)
