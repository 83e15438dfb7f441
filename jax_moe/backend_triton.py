"""GPU backend: launches the kernels through ``jax_triton.triton_call``.

jax-triton is imported lazily: 0.3.x raises ImportError on a CPU-only jaxlib, and importing it
changes ``TRITON_CACHE_DIR`` for the whole process (0.3.x sets it to ``""``, 0.4.x deletes it),
which breaks every other Triton user; the variable is put back as it was.

Kernels are compiled without line info (``TRITON_DISABLE_LINE_INFO=1``, set on first use unless
the variable is already set: ``TRITON_DISABLE_LINE_INFO=0`` keeps it, for profiling by source
line). Each launch carries the kernel's compressed proto (PTX and TTIR) as its operand, and
line info makes the PTX ~1.7x larger. jax-triton 0.3.x launches through a legacy custom call
(``triton_kernel_call``) whose cost on the host grows with that operand's size on every launch,
a measurable share of a decode layer (``benchmarks/launch_cost.py`` and the benchmark guide), and
which XLA never puts in a CUDA graph. jax-triton 0.4.x lowers to the XLA FFI custom call
``triton_kernel_call_ffi``, which XLA's command buffers can capture, and hands Triton the global
scratch that device-side TMA descriptors need (``jax_moe.stacks`` says which one is installed).

Both call conventions are supported: 0.3.x takes ``out_shape=``, 0.4.x ``out_type=``. Kernels
list their output pointers after their inputs, which both versions bind the same way. Aliased
buffers differ: 0.3.x passes an aliased output as a pointer of its own, after the inputs like any
output, while jax-triton's main branch passes it once, at its input's place (and deprecates both
aliasing and ``zeroed_outputs`` for ``jax.Ref`` arguments). ``launch``'s ``in_place_zeros`` keeps
one kernel signature for both (see there).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
import zlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import jax

INSTALL_HINT = (
    "install a tested stack with `pip install 'jax-moe[cuda13]'` (jax-triton 0.4.1, triton 3.7.1), or "
    "`pip install 'jax-moe[cuda13-triton36]'` where triton must stay 3.6 (python -m jax_moe.stacks "
    "shows what is installed)"
)


@functools.cache
def _jax_triton():
    saved = os.environ.get("TRITON_CACHE_DIR")
    try:
        import jax_triton
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved
    # jax-triton compiles while XLA lowers, after this returns: the setting stands for the process.
    os.environ.setdefault("TRITON_DISABLE_LINE_INFO", "1")
    return jax_triton


def unavailable_reason() -> str | None:
    """Why the triton backend can't run here, or None when it can."""
    if not any(d.platform == "gpu" for d in jax.devices()):
        return f"no GPU is visible to JAX (jax.devices() = {jax.devices()})"
    if "rocm" in jax.devices()[0].client.platform_version.lower():
        return "the GPU is not an NVIDIA GPU"
    try:
        _jax_triton()
    except ImportError as e:
        return f"jax-triton can't be imported ({e}); {INSTALL_HINT}"
    return None


@functools.cache
def _output_keyword() -> str:
    parameters = inspect.signature(_jax_triton().triton_call).parameters
    return "out_type" if "out_type" in parameters else "out_shape"


def launch(
    kernel,
    *inputs: jax.Array,
    out_shapes: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...],
    in_place_zeros: Mapping[int, int] = MappingProxyType({}),
    num_warps: int | None = None,
    num_stages: int | None = None,
    **constexprs,
) -> tuple[jax.Array, ...]:
    """Runs ``kernel[grid](*inputs, *outputs, **constexprs)`` on the GPU; returns the outputs.

    ``in_place_zeros`` maps inputs that hold only zeros to the outputs that start from them: output
    ``j`` starts as zeros, and the kernel works on it through its output pointer, never reading
    input ``i``. With 0.3.x output ``j`` aliases input ``i``: the kernel updates that buffer in
    place and nothing has to be cleared. The ``out_type`` API may pass an aliased buffer only once,
    which would change the kernel's signature; there output ``j`` is a fresh buffer that
    jax-triton zeroes before the launch.
    """
    jt = _jax_triton()
    if _output_keyword() == "out_shape":
        aliasing = dict(input_output_aliases=dict(in_place_zeros))
    else:
        aliasing = dict(zeroed_outputs=tuple(sorted(in_place_zeros.values())))
    with warnings.catch_warnings():
        # 0.4.x deprecates zeroed_outputs in favour of Refs, which 0.3.x lacks.
        warnings.simplefilter("ignore", DeprecationWarning)
        outputs = jt.triton_call(
            *inputs,
            kernel=kernel,
            grid=grid,
            num_warps=num_warps,
            num_stages=num_stages,
            **aliasing,
            **{_output_keyword(): tuple(out_shapes)},
            **constexprs,
        )
    return tuple(outputs)


def kernel_protos(lowered: jax.stages.Lowered) -> list[bytes]:
    """The operand of each jax-triton launch of a lowered program, decompressed: the kernel's
    serialized proto (PTX and TTIR inside), as XLA receives it. The legacy custom call
    (``triton_kernel_call``) carries it as its ``backend_config`` string, the FFI one
    (``triton_kernel_call_ffi``, jax-triton >= 0.4) as the ``opaque`` entry of its
    ``mhlo.backend_config`` dictionary."""
    if not callable(getattr(lowered, "compiler_ir", None)):
        raise TypeError(f"lowered: expected a jax.stages.Lowered (jax.jit(f).lower(...)), got {type(lowered).__name__}")
    from jaxlib.mlir import ir

    def operations(op):
        yield op
        for region in op.regions:
            for block in region:
                for inner in block:
                    yield from operations(inner.operation)

    protos = []
    for op in operations(lowered.compiler_ir("stablehlo").operation):
        if op.name != "stablehlo.custom_call":
            continue
        target = ir.StringAttr(op.attributes["call_target_name"]).value
        if target == "triton_kernel_call":
            payload = op.attributes["backend_config"]
        elif target == "triton_kernel_call_ffi":
            payload = ir.DictAttr(op.attributes["mhlo.backend_config"])["opaque"]
        else:
            continue
        protos.append(zlib.decompress(ir.StringAttr(payload).value_bytes))
    return protos
