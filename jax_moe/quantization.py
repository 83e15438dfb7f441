"""Quantized expert weights: a static scheme (``Quantization``) and the arrays it describes
(``QuantizedArray``), with ``quantize`` and ``dequantize`` in pure JAX.

A ``QuantizedArray`` stands wherever ``fused_moe`` and ``moe_experts`` take an expert weight
(``w_gate``, ``w_up``, ``w_down`` and the shared experts'), in the library's ``x @ w`` layout:
logical ``[E, K, N]`` (gate and up: ``K = H``, ``N = F``; down: ``K = F``, ``N = H``). The element
``(e, k, n)`` of the weight is ``(values[e, k, n] - zeros[e, k', n']) * scales[e, k', n']`` with
``k' = k // block_k`` and ``n' = n // block_n``, the scheme's ``scale_block`` (the zero point only
where the scheme has one). Storage, per scheme:

==============  =========================================  ==========================================
format          values                                     scales
==============  =========================================  ==========================================
``fp8``         ``float8_e4m3fn`` ``[E, K, N]``            float32: ``[E]`` (tensor), ``[E, 1, N]``
                                                           (channel), ``[E, cdiv(K, B), cdiv(N, B)]``
                                                           (block, DeepSeek-V3's ``weight_scale_inv``)
``int8``        ``int8`` ``[E, K, N]`` (``uint8`` with     float32 ``[E, 1, N]`` (channel) or
                zero points)                               ``[E, K // G, N]`` (group)
``int4``        two per ``uint8`` along K, low nibble      as int8
                first: ``[E, K // 2, N]``; signed
                (two's complement) without zero points,
                unsigned with them
``mxfp4``       e2m1, two per ``uint8`` along K, low       e8m0 ``uint8`` ``[E, K // 32, N]``:
                nibble first: ``[E, K // 2, N]``           ``2 ** (s - 127)``
==============  =========================================  ==========================================

Zero points (``zero_point=True``, int8 and int4: AWQ/GPTQ) are float32 in the scales' shape, in
units of the stored integers. The kernels dequantize weight tiles in registers; nothing here makes
a dequantized copy of a weight unless ``dequantize`` is called (the reference backend does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

FORMATS = ("fp8", "int8", "int4", "mxfp4")
GRANULARITIES = {"fp8": ("tensor", "channel", "block"), "int8": ("channel", "group"),
                 "int4": ("channel", "group"), "mxfp4": ("group",)}
GROUP_SIZES = (32, 64, 128)
MXFP4_GROUP = 32
ACTIVATIONS = ("weight", "fp8")  # weight-only, or fp8 activations with dynamic scales (w8a8)
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The 16 e2m1 values by code: sign bit 3, then a 2-bit exponent and a 1-bit mantissa (OCP MX).
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                       np.float32)
E8M0_BIAS = 127


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How expert weights are quantized: static, hashable, checked at construction.

    * ``format``: ``"fp8"`` (e4m3), ``"int8"``, ``"int4"`` or ``"mxfp4"``.
    * ``granularity``: one scale per expert matrix (``"tensor"``, fp8), per output column
      (``"channel"``), per ``block_size x block_size`` block (``"block"``, fp8: DeepSeek-V3) or per
      ``group_size`` rows of K in each column (``"group"``: int8/int4 with 32, 64 or 128; mxfp4
      always 32). None picks the format's usual one: channel, or group for mxfp4.
    * ``zero_point``: int8/int4 with zero points (asymmetric, AWQ/GPTQ).
    * ``activations``: ``"weight"`` (weight-only: activations stay bf16/fp16/fp32) or ``"fp8"``
      (fp8 weights only: activations quantized to e4m3 with a dynamic scale per token, per
      ``block_size`` channels with block granularity, as DeepSeek-V3).
    """

    format: str
    granularity: str | None = None
    block_size: int = 128
    group_size: int | None = None
    zero_point: bool = False
    activations: str = "weight"

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"Quantization.format must be one of {FORMATS}; got {self.format!r}")
        allowed = GRANULARITIES[self.format]
        if self.granularity is None:
            object.__setattr__(self, "granularity", allowed[-1] if self.format == "mxfp4" else "channel")
        if self.granularity not in allowed:
            raise ValueError(
                f"Quantization.granularity of format {self.format!r} must be one of {allowed}; got {self.granularity!r}"
            )
        if self.group_size is None:
            object.__setattr__(self, "group_size", MXFP4_GROUP if self.format == "mxfp4" else 128)
        for field in ("block_size", "group_size"):
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise TypeError(f"Quantization.{field} must be an int; got {type(value).__name__} {value!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"Quantization.block_size must be a power of two >= 16; got {self.block_size}")
        if self.format == "mxfp4" and self.group_size != MXFP4_GROUP:
            raise ValueError(f"Quantization.group_size of mxfp4 must be {MXFP4_GROUP}; got {self.group_size}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"Quantization.group_size must be one of {GROUP_SIZES}; got {self.group_size}")
        if not isinstance(self.zero_point, (bool, np.bool_)):
            raise TypeError(f"Quantization.zero_point must be a bool; got {type(self.zero_point).__name__}")
        if self.zero_point and self.format not in ("int8", "int4"):
            raise ValueError(f"Quantization.zero_point applies to int8 and int4; got format {self.format!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"Quantization.activations must be one of {ACTIVATIONS}; got {self.activations!r}")
        if self.activations == "fp8" and self.format != "fp8":
            raise ValueError(f"Quantization.activations='fp8' needs format 'fp8'; got format {self.format!r}")
        if self.activations == "fp8" and self.granularity == "block" and self.block_size < 32:
            # An fp8 GEMM step stays inside one scale block, and fp8 tensor-core dots take K >= 32.
            raise ValueError(f"Quantization.block_size must be >= 32 with fp8 activations; got {self.block_size}")

    @property
    def packed(self) -> bool:
        """Two 4-bit values per byte along K."""
        return self.format in ("int4", "mxfp4")

    def scale_block(self, k_dim: int, n_dim: int) -> tuple[int, int]:
        """(rows of K, columns of N) that share one scale in a [K, N] matrix."""
        if self.granularity == "tensor":
            return max(1, k_dim), max(1, n_dim)
        if self.granularity == "channel":
            return max(1, k_dim), 1
        if self.granularity == "block":
            return self.block_size, self.block_size
        return self.group_size, 1

    def values_shape(self, shape) -> tuple[int, ...]:
        *lead, k_dim, n_dim = shape
        return (*lead, k_dim // 2 if self.packed else k_dim, n_dim)

    def scales_shape(self, shape) -> tuple[int, ...]:
        *lead, k_dim, n_dim = shape
        if self.granularity == "tensor":
            return tuple(lead)
        block_k, block_n = self.scale_block(k_dim, n_dim)
        return (*lead, -(-k_dim // block_k), -(-n_dim // block_n))

    @property
    def values_dtype(self) -> np.dtype:
        if self.format == "fp8":
            return jnp.dtype(jnp.float8_e4m3fn)
        if self.format == "int8" and not self.zero_point:
            return jnp.dtype(jnp.int8)
        return jnp.dtype(jnp.uint8)

    @property
    def scales_dtype(self) -> np.dtype:
        return jnp.dtype(jnp.uint8) if self.format == "mxfp4" else jnp.dtype(jnp.float32)

    def check_k(self, name: str, k_dim: int) -> None:
        """Raises ValueError unless a [K, N] matrix with this K can take the scheme."""
        if self.granularity == "group" and k_dim % self.group_size:
            raise ValueError(
                f"{name}: K={k_dim} must be a multiple of the group size {self.group_size} of {self.describe()}"
            )
        if self.packed and k_dim % 2:
            raise ValueError(f"{name}: K={k_dim} must be even for {self.format} (two values per byte along K)")

    def describe(self) -> str:
        size = {"block": f" {self.block_size}", "group": f" {self.group_size}"}.get(self.granularity, "")
        extras = ", zero points" if self.zero_point else ""
        extras += ", fp8 activations" if self.activations == "fp8" else ""
        return f"{self.format} {self.granularity}{size}{extras}"


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """A quantized ``[E, K, N]`` expert weight: ``values``, ``scales`` and optional ``zeros`` (the
    pytree's children) with the static ``scheme`` and logical ``shape`` (its auxiliary data).
    ``jax_moe.quantize`` makes one from float weights; ``jax_moe.api`` checks one against its
    scheme when a layer takes it."""

    def __init__(self, values, scales, zeros, scheme: Quantization, shape: tuple[int, ...]):
        if not isinstance(scheme, Quantization):
            raise TypeError(f"QuantizedArray.scheme must be a jax_moe.Quantization; got {type(scheme).__name__}")
        self.values, self.scales, self.zeros = values, scales, zeros
        self.scheme = scheme
        self.shape = tuple(int(d) for d in shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def tree_flatten(self):
        return (self.values, self.scales, self.zeros), (self.scheme, self.shape)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.values, obj.scales, obj.zeros = children
        obj.scheme, obj.shape = aux
        return obj

    def __repr__(self) -> str:
        return f"QuantizedArray({self.scheme.describe()}, shape={list(self.shape)})"


def _blockwise(w, block_k: int, block_n: int, reduce):
    """``reduce`` over each [block_k, block_n] block of [..., K, N] (edges padded with zeros)."""
    *lead, k_dim, n_dim = w.shape
    pk, pn = -(-k_dim // block_k) * block_k, -(-n_dim // block_n) * block_n
    padded = jnp.pad(w, [(0, 0)] * len(lead) + [(0, pk - k_dim), (0, pn - n_dim)])
    blocks = padded.reshape(*lead, pk // block_k, block_k, pn // block_n, block_n)
    return reduce(blocks, axis=(-3, -1))


def _expand(scales, block_k: int, block_n: int, k_dim: int, n_dim: int):
    """Per-block values of ``_blockwise`` -> per element of [..., K, N]."""
    return jnp.repeat(jnp.repeat(scales, block_k, axis=-2), block_n, axis=-1)[..., :k_dim, :n_dim]


def _pack(codes):
    """[..., K, N] 4-bit codes -> [..., K // 2, N] bytes, the even rows of K in the low nibbles."""
    codes = codes.astype(jnp.uint8)
    return codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)


def _unpack(packed):
    """``_pack``'s inverse: [..., K // 2, N] bytes -> [..., K, N] codes in [0, 16)."""
    low, high = packed & 0xF, packed >> 4
    return jnp.stack([low, high], axis=-2).reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1])


def e8m0_to_float(scales):
    """e8m0 bytes -> float32 ``2 ** (s - 127)``, built from the exponent bits (exactly as the kernels:
    code 0 gives 0 rather than the subnormal ``2 ** -127``, which flushes to zero on GPUs anyway)."""
    return jax.lax.bitcast_convert_type(scales.astype(jnp.int32) << 23, jnp.float32)


def _e2m1_codes(x):
    """Nearest e2m1 code of each element of ``x`` (in [-6, 6]; ties to the smaller magnitude)."""
    magnitudes = jnp.asarray(E2M1_VALUES[:8])
    index = jnp.argmin(jnp.abs(jnp.abs(x)[..., None] - magnitudes), axis=-1).astype(jnp.uint8)
    return index | (jnp.signbit(x).astype(jnp.uint8) << 3)


def quantize(w, scheme: Quantization) -> QuantizedArray:
    """Quantizes float ``[E, K, N]`` weights (x @ w layout) with ``scheme``; pure JAX.

    Scales make each block's largest magnitude the format's largest (fp8: 448, int8: 127, int4: 7;
    with zero points the block's range spans [0, 255] or [0, 15]); values round to nearest. mxfp4
    takes the smallest power-of-two scale with no clipping (``ceil(log2(amax / 6))``).
    """
    if not isinstance(scheme, Quantization):
        raise TypeError(f"scheme must be a jax_moe.Quantization; got {type(scheme).__name__}")
    w = jnp.asarray(w)
    if w.ndim != 3 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize takes float [E, K, N] weights; got {w.dtype} shape {list(w.shape)}")
    k_dim, n_dim = w.shape[1:]
    scheme.check_k("w", k_dim)
    w = w.astype(jnp.float32)
    block_k, block_n = scheme.scale_block(k_dim, n_dim)
    blocked = lambda reduce, a: _blockwise(a, block_k, block_n, reduce)  # noqa: E731
    expand = lambda s: _expand(s, block_k, block_n, k_dim, n_dim)  # noqa: E731
    zeros = None
    if scheme.format == "mxfp4":
        amax = blocked(jnp.max, jnp.abs(w))
        exponent = jnp.where(amax > 0, jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-38) / 6.0)), 0.0)
        codes_scale = jnp.clip(exponent + E8M0_BIAS, 1, 254).astype(jnp.uint8)
        scale = e8m0_to_float(codes_scale)
        values = _pack(_e2m1_codes(jnp.clip(w / expand(scale), -6.0, 6.0)))
        return QuantizedArray(values, codes_scale, None, scheme, w.shape)
    if scheme.zero_point:
        top = 255.0 if scheme.format == "int8" else 15.0
        low = jnp.minimum(blocked(jnp.min, w), 0.0)
        high = jnp.maximum(blocked(jnp.max, w), 0.0)
        scale = jnp.where(high > low, (high - low) / top, 1.0)
        zeros = jnp.clip(jnp.round(-low / scale), 0.0, top)
        q = jnp.clip(jnp.round(w / expand(scale)) + expand(zeros), 0.0, top)
    else:
        top = {"fp8": FP8_MAX, "int8": 127.0, "int4": 7.0}[scheme.format]
        amax = blocked(jnp.max, jnp.abs(w))
        scale = jnp.where(amax > 0, amax / top, 1.0)
        q = jnp.clip(w / expand(scale), -top, top)
        if scheme.format != "fp8":
            q = jnp.round(q)
    if scheme.granularity == "tensor":
        scale = scale.reshape(-1)
    if scheme.format == "int4":
        values = _pack(q.astype(jnp.int32) & 0xF)
    else:
        values = q.astype(scheme.values_dtype)
    return QuantizedArray(values, scale.astype(jnp.float32), zeros, scheme, w.shape)


def dequantize(q: QuantizedArray, dtype=jnp.float32) -> jax.Array:
    """The float ``[E, K, N]`` weights a ``QuantizedArray`` stands for, in ``dtype`` (computed in
    float32, then rounded once). A dequantized copy: the reference backend's, for tests and export."""
    if not isinstance(q, QuantizedArray):
        raise TypeError(f"dequantize takes a jax_moe.QuantizedArray; got {type(q).__name__}")
    scheme = q.scheme
    k_dim, n_dim = q.shape[-2:]
    if scheme.format == "int4":
        codes = _unpack(q.values).astype(jnp.float32)
        values = codes if scheme.zero_point else codes - 16.0 * (codes >= 8)
    elif scheme.format == "mxfp4":
        values = jnp.asarray(E2M1_VALUES)[_unpack(q.values)]
    else:
        values = q.values.astype(jnp.float32)
    scales = e8m0_to_float(q.scales) if scheme.format == "mxfp4" else q.scales.astype(jnp.float32)
    block_k, block_n = scheme.scale_block(k_dim, n_dim)
    if scheme.granularity == "tensor":
        scales = scales.reshape(*scales.shape, 1, 1)
    if scheme.zero_point:
        values = values - _expand(q.zeros.astype(jnp.float32), block_k, block_n, k_dim, n_dim)
    return (values * _expand(scales, block_k, block_n, k_dim, n_dim)).astype(dtype)


def fake_quantize_activations(x, block: int | None):
    """fp8 w8a8 activations as the kernels see them: each row of [..., K] (each ``block`` channels
    of it, when given) scaled so that its largest magnitude is 448, rounded to e4m3 and scaled
    back, in x's dtype. Returns ``(values, scales)`` with float8 [..., K] values and float32
    [..., cdiv(K, block)] (or [..., 1]) scales.
    """
    k_dim = x.shape[-1]
    block = k_dim if block is None else block
    pad = -(-k_dim // block) * block - k_dim
    xf = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    grouped = xf.reshape(*x.shape[:-1], -1, block)
    amax = jnp.max(jnp.abs(grouped), axis=-1)
    scales = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    values = (grouped / scales[..., None]).astype(jnp.float8_e4m3fn).reshape(*x.shape[:-1], -1)[..., :k_dim]
    return values, scales


def activations_through_fp8(x, block: int | None):
    """``x`` after the round trip of ``fake_quantize_activations``, in float32 (the kernels' fp8
    dots multiply exact fp8 products by the scales in fp32). Its gradient is the identity
    (straight-through): activation quantization is transparent to training."""
    values, scales = fake_quantize_activations(x, block)
    # With excess precision allowed (XLA:GPU's default) XLA drops a float-to-float convert pair,
    # fp8 round trip included; the barrier keeps the rounding.
    values = jax.lax.optimization_barrier(values)
    k_dim = x.shape[-1]
    block = k_dim if block is None else block
    per_element = jnp.repeat(scales, block, axis=-1)[..., :k_dim]
    x = x.astype(jnp.float32)
    return x + jax.lax.stop_gradient(values.astype(jnp.float32) * per_element - x)


def activation_block(scheme: Quantization) -> int | None:
    """Channels per activation scale under fp8 activations: the weight block with block scaling
    (DeepSeek-V3: 128), else the whole row (per token)."""
    return scheme.block_size if scheme.granularity == "block" else None



@functools.cache
def _no_tangents(name: str):
    """Identity on a quantized weight's arrays that raises when they are differentiated."""

    @jax.custom_jvp
    def identity(*arrays):
        return arrays

    def refuse(primals, tangents):
        for tangent in tangents:
            if not isinstance(tangent, SymbolicZero) and tangent.dtype != jax.dtypes.float0:
                raise ValueError(
                    f"{name} is a quantized weight, frozen: it has no gradient. Differentiate with "
                    f"respect to the float parameters only (Flax: wrt=nnx.Param), or wrap the "
                    f"quantized weights in jax.lax.stop_gradient"
                )
        return primals, tangents

    identity.defjvp(refuse, symbolic_zeros=True)
    return identity


def frozen(q: QuantizedArray, name: str) -> QuantizedArray:
    """``q`` itself, except that differentiating a function of it with respect to its arrays
    raises ValueError naming ``name`` (gradients with respect to everything else are unaffected):
    training never updates quantized weights silently."""
    children, aux = q.tree_flatten()
    present = [c for c in children if c is not None]
    guarded = iter(_no_tangents(name)(*present))
    return QuantizedArray.tree_unflatten(aux, [None if c is None else next(guarded) for c in children])
