"""CPU backend: runs the very same ``@triton.jit`` kernels through Triton's interpreter.

Each launch becomes a ``jax.pure_callback`` that hands numpy buffers to
``triton.runtime.interpreter.InterpretedFunction``, so the backend works under ``jax.jit`` and needs
neither a GPU nor torch. It exists so that CI exercises the kernel code itself.

Two deliberate differences from the GPU:

* Outputs start out poisoned (NaN, or the most negative integer), so an element a kernel forgets
  to write shows up in the result instead of hiding behind whatever memory held before. An output
  that starts from an input (``in_place_zeros``) starts as a copy of it, checked to be all zeros.
* bfloat16 buffers are handed to the interpreter as float32 and outputs are rounded back to bfloat16
  afterwards: the interpreter's bf16 ``tl.dot`` is wrong in triton 3.6. bf16 kernels proper are
  tested on the GPU.

Supported triton versions: ``jax_moe.stacks.INTERPRETER_TRITON``; importing this module (which
happens when the backend is first used) raises ``stacks.UnsupportedTritonError`` outside them.

Inside a ``jax.shard_map`` body (every mesh axis manual: ``jax_moe.sharding``) each device launches
its own kernels, through ``jax.experimental.buffer_callback``: it hands the callback XLA's buffers.
``jax.pure_callback`` first copies its inputs onto CPU device 0 and waits for them, which can
deadlock when all devices sit in callbacks of one program with collectives (seen with 8 CPU
devices). Elsewhere ``jax.pure_callback`` runs a launch once, on whole arrays.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import stacks

# This module is imported when the interpret backend is first used. It patches private parts of
# Triton's interpreter (_patch_lang, _patch_lang_tensor, InterpretedFunction) that change between
# releases: outside the tested range, a clear error here rather than an AttributeError or wrong
# results later.
stacks.check_interpreter_triton()

from triton.runtime import interpreter  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

try:
    from jax.experimental.buffer_callback import buffer_callback
except ImportError:  # older JAX: pure_callback everywhere
    buffer_callback = None

# The interpreter keeps the current program id in module state: one launch at a time.
_INTERPRETER_LOCK = threading.Lock()


class _HostTensor:
    """The part of the torch.Tensor interface that Triton's interpreter reads, over a numpy array.

    The interpreter copies each argument's storage to the host and back around a launch; the data
    already lives on the host, so those copies are the identity here.
    """

    def __init__(self, array: np.ndarray):
        self._array = array
        self.dtype = str(array.dtype)  # "float32", "bfloat16", "int32", ... as Triton spells them

    def data_ptr(self) -> int:
        return self._array.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def new_empty(self, *args, **kwargs):
        return self

    def set_(self, *args):
        return self

    def copy_(self, other):
        return self

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self._array.shape

    def stride(self):
        return tuple(s // self._array.itemsize for s in self._array.strides)


@functools.cache
def _interpreted_fn(python_function) -> interpreter.InterpretedFunction:
    return interpreter.InterpretedFunction(python_function)


def _interpreted(kernel: JITFunction) -> interpreter.InterpretedFunction:
    # Keyed on the Python function: hashing a JITFunction analyses its source, which fails while
    # triton.language is patched for the interpreter.
    return _interpreted_fn(kernel.fn)


def _call_interpreted(jit_function: JITFunction, *args, **kwargs):
    """Stands in for ``JITFunction.__call__`` while a kernel is interpreted.

    With ``TRITON_INTERPRET=1`` set before Triton is imported, every ``@triton.jit`` function,
    ``tl.max`` and ``tl.sum`` included, is built for the interpreter. Here the same process also
    compiles for the GPU, so the kernels stay compiled functions and the functions they call are
    interpreted on demand, with the language patched for the callee and restored afterwards.
    """
    scope = interpreter._patch_lang(jit_function.fn)
    try:
        return _interpreted(jit_function).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor_for_numpy2(tensor, scope):
    """The interpreter turns a scalar tensor into a Python int with ``int(data)``, but its scalars
    are 1-element arrays, which numpy >= 2.4 no longer converts that way; without this, loops with
    run-time bounds (``range(start, end)``) fail in the interpreter."""
    _patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))


@contextlib.contextmanager
def _interpreting():
    with _INTERPRETER_LOCK:
        compiled_call = JITFunction.__call__
        JITFunction.__call__ = _call_interpreted
        interpreter._patch_lang_tensor = _patch_lang_tensor_for_numpy2
        try:
            yield
        finally:
            JITFunction.__call__ = compiled_call
            interpreter._patch_lang_tensor = _patch_lang_tensor


def _interpreter_dtype(dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype == jnp.bfloat16 else np.dtype(dtype)


def _poisoned(shape, dtype) -> np.ndarray:
    dtype = _interpreter_dtype(dtype)
    fill = np.nan if np.issubdtype(dtype, np.floating) else np.iinfo(dtype).min
    return np.full(shape, fill, dtype=dtype)


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
    """Runs ``kernel[grid](*inputs, *outputs, **constexprs)`` in the interpreter; returns the outputs.

    Same signature as ``backend_triton.launch``; ``num_warps`` and ``num_stages`` mean nothing to
    the interpreter and are ignored.
    """
    del num_warps, num_stages
    out_shapes = tuple(out_shapes)

    def run(*arrays):
        host_inputs = [np.ascontiguousarray(a, dtype=_interpreter_dtype(a.dtype)) for a in arrays]
        outputs = [_poisoned(s.shape, s.dtype) for s in out_shapes]
        for i, j in in_place_zeros.items():
            if np.any(host_inputs[i]):
                raise ValueError(f"{kernel.__name__}: input {i}, passed as in_place_zeros, is not all zeros")
            outputs[j] = host_inputs[i].copy()
        # NaN and inf are plain values on a GPU (masked-off lanes make them routinely): no warnings.
        with _interpreting(), np.errstate(all="ignore"):
            _interpreted(kernel)[grid](*map(_HostTensor, host_inputs + outputs), **constexprs)
        return tuple(o.astype(s.dtype) for o, s in zip(outputs, out_shapes))

    if buffer_callback is None or not jax.sharding.get_abstract_mesh().manual_axes:
        return jax.pure_callback(run, out_shapes, *inputs)

    def fill(context, buffers, *arrays):
        del context
        for buffer, result in zip(buffers, run(*map(np.asarray, arrays))):
            np.asarray(buffer)[...] = result

    return tuple(buffer_callback(fill, out_shapes)(*inputs))
