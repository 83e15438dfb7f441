"""Quantized expert weights: storage layouts against a numpy re-derivation, every scheme on the
reference and interpret backends against float64 numpy on the dequantized weights, gradients,
errors. The interpret backend poisons kernel outputs before the kernels run (NaN), so an element
no program writes fails ``rel_error``."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from flax import nnx

import jax_moe
from flax_layers import FusedMoE, checkpoints
from flax_layers import linen as moe_linen
from jax_moe import Quantization, QuantizedArray

import numpy_families
import numpy_moe
import numpy_quant

# F = 192 spans one and a half fp8 blocks: K of the down projection and N of gate and up cross a
# block edge, and the last block is partial.
T, H, F, E, TOP_K = 12, 128, 192, 4, 2
NUM_TOKENS = 16

SCHEMES = numpy_quant.SCHEMES


def _layer(seed: int = 0, dtype=jnp.bfloat16, hidden: int = H, intermediate: int = F):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (T, hidden), dtype)
    logits = jax.random.normal(keys[1], (T, E))
    weights = (
        jax.random.normal(keys[2], (E, hidden, intermediate)) * hidden**-0.5,
        jax.random.normal(keys[3], (E, hidden, intermediate)) * hidden**-0.5,
        jax.random.normal(keys[4], (E, intermediate, hidden)) * intermediate**-0.5,
    )
    return x, logits, weights


@pytest.mark.parametrize("name", SCHEMES)
def test_dequantize_matches_numpy(name):
    scheme = SCHEMES[name]
    _, _, (w, _, w_down) = _layer()
    for weight in (w, w_down):
        q = jax_moe.quantize(weight, scheme)
        assert q.shape == weight.shape and q.scheme == scheme
        expected = numpy_quant.dequantize(q)
        np.testing.assert_allclose(np.asarray(jax_moe.dequantize(q)), expected, rtol=1e-6, atol=1e-12)
        # Quantization error of the weights themselves: what the formats can hold.
        error = np.linalg.norm(expected - np.asarray(weight)) / np.linalg.norm(np.asarray(weight))
        assert error <= {"fp8": 0.04, "int8": 0.01, "int4": 0.15, "mxfp4": 0.15}[scheme.format], error


def test_nibble_order_and_e2m1_codes():
    # Column 0 of K = 4 rows: 1.0, -6.0, 0.5, 3.0 with scale 1 (amax 6 -> exponent 0).
    w = jnp.array([1.0, -6.0, 0.5, 3.0] * 8, jnp.float32).reshape(1, 32, 1)
    q = jax_moe.quantize(w, Quantization("mxfp4"))
    assert q.values.shape == (1, 16, 1) and q.values.dtype == jnp.uint8
    np.testing.assert_array_equal(q.scales, [[[127]]])
    # e2m1 codes: 1.0 -> 2, -6.0 -> 8 | 7 = 15, 0.5 -> 1, 3.0 -> 5; the even row in the low nibble.
    np.testing.assert_array_equal(np.asarray(q.values)[0, :2, 0], [2 | (15 << 4), 1 | (5 << 4)])
    signed = jax_moe.quantize(jnp.array([7.0, -7.0, -1.0, 3.0], jnp.float32).reshape(1, 4, 1), Quantization("int4"))
    np.testing.assert_array_equal(np.asarray(signed.values)[0, :, 0], [7 | (0x9 << 4), 0xF | (3 << 4)])


def test_e8m0_bias_and_scale_layout():
    codes = np.array([[[127, 128]], [[126, 130]]], np.uint8)  # [E=2, K/32=1, N=2]
    values = np.full((2, 16, 2), 0x22, np.uint8)  # every element e2m1 code 2: 1.0
    q = QuantizedArray(jnp.asarray(values), jnp.asarray(codes), None, Quantization("mxfp4"), (2, 32, 2))
    w = np.asarray(jax_moe.dequantize(q))
    np.testing.assert_array_equal(w[0, :, 0], 1.0)
    np.testing.assert_array_equal(w[0, :, 1], 2.0)
    np.testing.assert_array_equal(w[1, :, 0], 0.5)
    np.testing.assert_array_equal(w[1, :, 1], 8.0)


def test_fp8_block_scales_multiply_per_128_block():
    values = np.ones((1, 200, 130), np.float32).astype(ml_dtypes.float8_e4m3fn)
    scales = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)  # [E, cdiv(200, 128), cdiv(130, 128)]
    q = QuantizedArray(jnp.asarray(values), jnp.asarray(scales), None, Quantization("fp8", "block"), (1, 200, 130))
    w = np.asarray(jax_moe.dequantize(q))[0]
    assert w[127, 127] == 1.0 and w[127, 128] == 2.0 and w[128, 0] == 3.0 and w[199, 129] == 4.0


def _quantized_layer(scheme, seed=0, dtype=jnp.bfloat16):
    x, logits, weights = _layer(seed, dtype)
    quantized = [jax_moe.quantize(w, scheme) for w in weights]
    return x, logits, weights, quantized


def _numpy_reference(x, logits, weights):
    return numpy_moe.fused_moe(x, logits, *weights, top_k=TOP_K)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("name", SCHEMES)
def test_fused_moe_matches_dequantized_numpy(name, backend):
    scheme = SCHEMES[name]
    x, logits, weights, quantized = _quantized_layer(scheme)
    out = jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=TOP_K, backend=backend))(x, logits, *quantized)
    assert out.shape == (T, H) and out.dtype == jnp.bfloat16
    dequantized = [numpy_quant.dequantize(q) for q in quantized]
    float_activations_error = numpy_moe.rel_error(out, _numpy_reference(x, logits, dequantized))
    if scheme.activations == "fp8":
        block = scheme.block_size if scheme.granularity == "block" else None
        spec = numpy_quant.w8a8_fused_moe(x, logits, *dequantized, top_k=TOP_K, block=block)
    else:
        spec = _numpy_reference(x, logits, dequantized)
    error = numpy_moe.rel_error(out, spec)
    unquantized_error = numpy_moe.rel_error(out, _numpy_reference(x, logits, weights))
    print(f"{name} {backend}: {error:.2e} vs the dequantized spec, {float_activations_error:.2e} vs dequantized "
          f"weights with float activations, {unquantized_error:.2e} vs the unquantized weights")
    assert error <= numpy_quant.bound(scheme)


# Gradients on a narrower layer: the backward runs four launches through the interpreter.
GRAD_H, GRAD_F = 128, 64


def _family_experts(scheme, seed=0, dtype=jnp.float32):
    """Experts with every optional part a quantized layer keeps in float: biases (gpt-oss) or
    shared experts (DeepSeek-V3), the latter quantized like the routed ones."""
    x, logits, (w_gate, w_up, w_down) = _layer(seed, dtype, GRAD_H, GRAD_F)
    keys = jax.random.split(jax.random.key(seed + 1), 6)
    quantized = [jax_moe.quantize(w, scheme) for w in (w_gate, w_up, w_down)]
    if scheme.format == "mxfp4":
        biases = dict(
            gate_bias=0.1 * jax.random.normal(keys[0], (E, GRAD_F), dtype),
            up_bias=0.1 * jax.random.normal(keys[1], (E, GRAD_F), dtype),
            down_bias=0.1 * jax.random.normal(keys[2], (E, GRAD_H), dtype),
        )
        return x, logits, jax_moe.ExpertWeights(*quantized, **biases), jax_moe.GPT_OSS_SWIGLU
    shared = [
        jax_moe.quantize(jax.random.normal(k, shape) * shape[1] ** -0.5, scheme)
        for k, shape in zip(keys[3:], ((1, GRAD_H, GRAD_F), (1, GRAD_H, GRAD_F), (1, GRAD_F, GRAD_H)))
    ]
    return x, logits, jax_moe.ExpertWeights(*quantized, *(None,) * 3, *shared), jax_moe.SILU


@pytest.mark.parametrize("name", ["mxfp4", "fp8-block-w8a8", "int4-group64-zp"])
def test_gradients_of_activations_router_and_biases(name):
    scheme = SCHEMES[name]
    x, logits, experts, activation = _family_experts(scheme)
    cotangent = jax.random.normal(jax.random.key(7), (T, GRAD_H))
    float_parts = {k: v for k, v in experts._asdict().items() if v is not None and not isinstance(v, QuantizedArray)}

    # gpt-oss's (mxfp4) backward reads saved pre-activations, the others recompute them.
    save_activations = scheme.format == "mxfp4"

    def loss(x, logits, float_parts, backend):
        layer_experts = experts._replace(**float_parts)
        out = jax_moe.fused_moe(x, logits, experts=layer_experts, top_k=TOP_K, activation=activation, backend=backend,
                                save_activations=save_activations)
        return jnp.sum(out * cotangent)

    grads = {
        backend: jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(x, logits, float_parts, backend)
        for backend in ("reference", "interpret")
    }
    # w8a8: the kernels' routing-weight gradient takes the gated activation before its fp8
    # rounding, the reference's after it: a few percent apart on the router logits.
    tolerance = 6e-2 if scheme.activations == "fp8" else 1e-4
    for ref, got in zip(jax.tree.leaves(grads["reference"]), jax.tree.leaves(grads["interpret"])):
        assert float(jnp.linalg.norm(ref)) > 0
        assert numpy_moe.rel_error(got, np.asarray(ref, np.float64)) <= tolerance


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_gradient_with_respect_to_quantized_weights_raises(backend):
    x, logits, _, quantized = _quantized_layer(SCHEMES["fp8-block"], dtype=jnp.float32)

    def loss(w_gate):
        return jnp.sum(jax_moe.fused_moe(x, logits, w_gate, *quantized[1:], top_k=TOP_K, backend=backend))

    with pytest.raises(ValueError, match="w_gate is a quantized weight, frozen: it has no gradient"):
        jax.grad(loss)(quantized[0])
    # Integer-valued parts are refused by jax.grad itself.
    int_weight = jax_moe.quantize(_layer()[2][0], SCHEMES["int8-channel"])
    with pytest.raises(TypeError, match="grad requires real"):
        jax.grad(lambda q: jnp.sum(jax_moe.dequantize(q)))(int_weight)


DEEPSEEK_FP8 = dict(hidden_size=256, moe_intermediate_size=192, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                    topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, n_shared_experts=1,
                    scoring_func="sigmoid", topk_method="noaux_tc",
                    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]})
GPT_OSS_MXFP4 = dict(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                     swiglu_limit=7.0, quantization_config={"quant_method": "mxfp4"})


def _deepseek_fp8_checkpoint(rng):
    """A random DeepSeek-V3 block stored as its fp8 checkpoints are: e4m3 expert weights with
    ``weight_scale_inv`` beside them (the router stays float); and the same block with the expert
    weights dequantized by DeepSeek-V3's ``weight_dequant``."""
    prefix = checkpoints.block_prefix("deepseek_v3", 3)
    tensors = numpy_families.random_checkpoint("deepseek_v3", DEEPSEEK_FP8, prefix, rng)
    stored, dequantized = dict(tensors), dict(tensors)
    for key, weight in tensors.items():
        if key.endswith("proj.weight"):
            values, scale_inv = numpy_quant.deepseek_fp8(weight)
            stored[key], stored[key + "_scale_inv"] = values, scale_inv
            dequantized[key] = numpy_quant.weight_dequant(values, scale_inv)
    return prefix, stored, dequantized


def _gpt_oss_mxfp4_checkpoint(rng):
    """A random gpt-oss block stored as its MXFP4 checkpoints are (``*_blocks``, ``*_scales`` of
    the [E, out, in] matrices) and dequantized as Hugging Face transformers does."""
    prefix = checkpoints.block_prefix("gpt_oss", 0)
    tensors = numpy_families.random_checkpoint("gpt_oss", GPT_OSS_MXFP4, prefix, rng)
    stored, dequantized = dict(tensors), dict(tensors)
    for name in ("gate_up_proj", "down_proj"):
        key = f"{prefix}experts.{name}"
        blocks, scales = numpy_quant.gpt_oss_mxfp4(np.swapaxes(stored.pop(key), 1, 2))  # stored [E, out, in]
        stored[key + "_blocks"], stored[key + "_scales"] = blocks, scales
        dequantized[key] = np.swapaxes(numpy_quant.convert_moe_packed_tensors(blocks, scales), 1, 2)
    return prefix, stored, dequantized


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_quantized_checkpoints_load_as_stored(rng, family):
    config = DEEPSEEK_FP8 if family == "deepseek_v3" else GPT_OSS_MXFP4
    make = _deepseek_fp8_checkpoint if family == "deepseek_v3" else _gpt_oss_mxfp4_checkpoint
    prefix, stored, dequantized = make(rng)
    kwargs = checkpoints.layer_kwargs(family, config)
    scheme = kwargs["quantization"]
    # The interpreter runs w8a8 in test_fused_moe_matches_dequantized_numpy; here it runs gpt-oss.
    backend = "reference" if family == "deepseek_v3" else "interpret"
    layer = FusedMoE(**kwargs, backend=backend, rngs=nnx.Rngs(0))
    checkpoints.load_block(layer, family, stored, config, prefix)
    # The layer holds the stored bytes, rearranged: its dequantization is the published one's.
    hidden = config["hidden_size"]
    for param, name in (("wi_0", "gate_proj"), ("wi_1", "up_proj"), ("wo", "down_proj")):
        q = getattr(layer, param).get_value()
        assert isinstance(q, QuantizedArray) and q.scheme == scheme
        if family == "deepseek_v3":
            expected = np.stack([dequantized[f"{prefix}experts.{i}.{name}.weight"].T for i in range(q.shape[0])])
        elif param == "wo":
            expected = dequantized[prefix + "experts.down_proj"]
        else:
            expected = dequantized[prefix + "experts.gate_up_proj"][..., 0 if param == "wi_0" else 1 :: 2]
        np.testing.assert_array_equal(numpy_quant.dequantize(q), expected)
    x = rng.standard_normal((NUM_TOKENS, hidden)).astype(np.float32)
    ref, margin = numpy_families.BLOCKS[family](x, dequantized, prefix, config)
    decisive = margin > 1e-5
    out = np.asarray(nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x)))[decisive]
    # gpt-oss is weight-only (exact fp32 dequantization); DeepSeek-V3's w8a8 rounds activations to
    # fp8, which alone costs 4-4.5e-2 against float activations (test_fused_moe_matches_dequantized_numpy).
    error = numpy_moe.rel_error(out, ref[decisive])
    print(f"{family} checkpoint: {error:.2e} against the block on the dequantized checkpoint")
    assert error <= (5e-2 if scheme.activations == "fp8" else 1e-5)
    linen_out = jax.jit(moe_linen.FusedMoE(**kwargs, backend="reference").apply)(
        checkpoints.linen_variables(family, stored, config, prefix), jnp.asarray(x)
    )
    assert numpy_moe.rel_error(np.asarray(linen_out)[decisive], np.asarray(out, np.float64)) <= 1e-4



@pytest.mark.parametrize("dtype", [jnp.float16])
def test_moe_experts_with_quantized_weights(dtype):
    scheme = SCHEMES["int8-group32-zp"]
    x, logits, _, quantized = _quantized_layer(scheme, dtype=dtype)
    weights, ids = jax_moe.route(logits, top_k=TOP_K)
    out = jax.jit(lambda *a: jax_moe.moe_experts(*a, backend="interpret"))(x, weights, ids, *quantized)
    assert out.dtype == dtype
    ref = numpy_moe.experts(x, weights, ids, *[numpy_quant.dequantize(q) for q in quantized])
    assert numpy_moe.rel_error(out, ref) <= (1e-5 if dtype == jnp.float32 else 1e-2)

