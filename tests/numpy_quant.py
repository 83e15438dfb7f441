"""Float64 numpy re-derivation of quantized weights, independent of ``jax_moe.quantization``.

Layouts as documented there: logical [E, K, N] (x @ w), 4-bit values two per byte along K with
the even row of K in the low nibble, one scale per (block_k, block_n) block. The e2m1 table and
the e8m0 bias follow the OCP MX spec as gpt-oss's published modelling code decodes it (Hugging
Face transformers ``convert_moe_packed_tensors``: ``lut[blocks & 0x0F]`` then ``lut[blocks >> 4]``
interleaved, ``ldexp(values, scales - 127)``); fp8 block scales multiply, as DeepSeek-V3's
``weight_dequant`` (``y = x * s``, ``s = weight_scale_inv[i // 128, j // 128]``).
"""

import ml_dtypes
import numpy as np

from jax_moe import Quantization

# The schemes the tests run, and their bounds on ||out - ref|| / ||ref|| against float64 on the
# dequantized weights (bf16 activations; w8a8: with the activations through fp8 as the spec says).
SCHEMES = {
    "fp8-tensor": Quantization("fp8", "tensor"),
    "fp8-channel": Quantization("fp8", "channel"),
    "fp8-block": Quantization("fp8", "block"),
    "fp8-block-w8a8": Quantization("fp8", "block", activations="fp8"),
    "fp8-channel-w8a8": Quantization("fp8", "channel", activations="fp8"),
    "int8-channel": Quantization("int8", "channel"),
    "int8-group32-zp": Quantization("int8", "group", group_size=32, zero_point=True),
    "int4-group32": Quantization("int4", "group", group_size=32),
    "int4-group64-zp": Quantization("int4", "group", group_size=64, zero_point=True),
    "int4-channel": Quantization("int4", "channel"),
    "mxfp4": Quantization("mxfp4"),
}
BOUNDS = {"fp8": 2e-2, "int8": 2e-2, "int4": 2e-2, "mxfp4": 3e-2}
W8A8_BOUND = 3.5e-2


def bound(scheme: Quantization) -> float:
    return W8A8_BOUND if scheme.activations == "fp8" else BOUNDS[scheme.format]


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def nibbles(packed) -> np.ndarray:
    """[E, K // 2, N] bytes -> [E, K, N] codes: row k from byte k // 2, low nibble for even k."""
    packed = np.asarray(packed, np.int64)
    e, half, n = packed.shape
    out = np.empty((e, 2 * half, n), np.int64)
    for k in range(2 * half):
        out[:, k, :] = (packed[:, k // 2, :] >> (4 * (k % 2))) & 0xF
    return out


def per_element(scales, shape, block_k: int, block_n: int) -> np.ndarray:
    """Scale of each element (e, k, n): ``scales[e, k // block_k, n // block_n]``."""
    scales = np.asarray(scales, np.float64)
    e, k_dim, n_dim = shape
    if scales.ndim == 1:
        return np.broadcast_to(scales[:, None, None], shape)
    ks = np.arange(k_dim) // block_k
    ns = np.arange(n_dim) // block_n
    return scales[:, ks[:, None], ns[None, :]]


def e8m0(scales) -> np.ndarray:
    return np.ldexp(1.0, np.asarray(scales, np.int64) - 127)


def dequantize(q) -> np.ndarray:
    """The float64 [E, K, N] weight of a ``jax_moe.QuantizedArray``."""
    scheme, shape = q.scheme, q.shape
    fmt = scheme.format
    if fmt == "fp8":
        values = np.asarray(q.values).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    elif fmt == "int8":
        values = np.asarray(q.values).astype(np.float64)
    elif fmt == "int4":
        codes = nibbles(q.values)
        values = (codes if scheme.zero_point else np.where(codes >= 8, codes - 16, codes)).astype(np.float64)
    else:
        values = np.asarray(E2M1, np.float64)[nibbles(q.values)]
    k_dim, n_dim = shape[1:]
    block_k, block_n = {
        "tensor": (k_dim, n_dim), "channel": (k_dim, 1), "block": (scheme.block_size,) * 2,
        "group": (scheme.group_size, 1),
    }[scheme.granularity]
    scales = e8m0(q.scales) if fmt == "mxfp4" else np.asarray(q.scales, np.float64)
    if scheme.zero_point:
        values = values - per_element(q.zeros, shape, block_k, block_n)
    return values * per_element(scales, shape, block_k, block_n)


def through_fp8(a, block) -> np.ndarray:
    """Rows of [..., K] through e4m3 with a scale per row (per ``block`` channels when given) that
    maps the largest magnitude to 448, back in float64 (DeepSeek-V3's ``act_quant``)."""
    a = np.asarray(a, np.float64)
    k_dim = a.shape[-1]
    block = block or k_dim
    out = np.empty_like(a)
    for start in range(0, k_dim, block):
        chunk = a[..., start : start + block]
        amax = np.abs(chunk).max(axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / 448.0, 1.0)
        out[..., start : start + block] = (chunk / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * scale
    return out


def w8a8_fused_moe(x, logits, w_gate, w_up, w_down, top_k: int, block) -> np.ndarray:
    """The softmax top-k layer with both GEMMs' activations through fp8 (``through_fp8``); the gated
    activation is rounded to x's dtype first, as the kernels store it."""
    from numpy_moe import as_f64, softmax_top_k

    weights, ids = softmax_top_k(logits, top_k, True)
    xq = through_fp8(as_f64(x), block)
    out = np.zeros_like(xq)
    for expert in np.unique(ids):
        tokens, slots = np.nonzero(ids == expert)
        gate, up = xq[tokens] @ w_gate[expert], xq[tokens] @ w_up[expert]
        act = np.asarray(gate / (1.0 + np.exp(-gate)) * up).astype(np.asarray(x).dtype)
        act = through_fp8(as_f64(act), block)
        np.add.at(out, tokens, weights[tokens, slots][:, None] * (act @ w_down[expert]))
    return out


def deepseek_fp8(weight, block: int = 128):
    """An [out, in] float weight as DeepSeek-V3 stores it: e4m3 ``weight`` and float32
    ``weight_scale_inv`` [cdiv(out, block), cdiv(in, block)], each block's largest magnitude at 448."""
    weight = np.asarray(weight, np.float64)
    rows, cols = weight.shape
    scales = np.ones((-(-rows // block), -(-cols // block)), np.float32)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            amax = np.abs(weight[i * block : (i + 1) * block, j * block : (j + 1) * block]).max()
            scales[i, j] = amax / 448.0 if amax > 0 else 1.0
    values = (weight / weight_dequant_scales(scales, weight.shape, block)).astype(ml_dtypes.float8_e4m3fn)
    return values, scales


def weight_dequant_scales(scale_inv, shape, block: int = 128) -> np.ndarray:
    rows, cols = shape
    return np.asarray(scale_inv, np.float64)[np.arange(rows)[:, None] // block, np.arange(cols)[None, :] // block]


def weight_dequant(weight, scale_inv, block: int = 128) -> np.ndarray:
    """DeepSeek-V3's ``weight_dequant``: ``y[i, j] = x[i, j] * s[i // block, j // block]``."""
    return np.asarray(weight).astype(np.float64) * weight_dequant_scales(scale_inv, weight.shape, block)


def gpt_oss_mxfp4(weight):
    """An [E, out, in] float weight as gpt-oss stores it: ``blocks`` [E, out, in/32, 16] uint8 (two
    e2m1 codes a byte, the first of each pair in the low nibble) and ``scales`` [E, out, in/32]
    uint8 e8m0 (bias 127), with the smallest power-of-two scale that clips nothing."""
    weight = np.asarray(weight, np.float64)
    e, out, k = weight.shape
    groups = weight.reshape(e, out, k // 32, 32)
    amax = np.abs(groups).max(axis=-1)
    exponent = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(np.int64)
    scaled = groups / np.ldexp(1.0, exponent)[..., None]
    magnitudes = np.abs(np.asarray(E2M1[:8]))
    codes = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(axis=-1) | (np.signbit(scaled) << 3)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, (exponent + 127).astype(np.uint8)


def convert_moe_packed_tensors(blocks, scales) -> np.ndarray:
    """Hugging Face transformers' gpt-oss dequantization: ``lut[blocks & 0x0F]`` and
    ``lut[blocks >> 4]`` interleaved (low nibble first), times ``2 ** (scales - 127)``:
    [..., G, 16] bytes and [..., G] scales -> [..., G * 32]."""
    blocks, scales = np.asarray(blocks), np.asarray(scales).astype(np.int64) - 127
    lut = np.asarray(E2M1, np.float64)
    values = np.empty((*blocks.shape[:-1], 32))
    values[..., 0::2] = lut[blocks & 0x0F]
    values[..., 1::2] = lut[blocks >> 4]
    return np.ldexp(values, scales[..., None]).reshape(*blocks.shape[:-2], -1)
