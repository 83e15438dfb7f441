"""The jax-triton adapter, against stand-ins for the 0.3.x and 0.4.x APIs (no GPU needed)."""

import os
import sys
import textwrap
import warnings
import zlib

import jax
import numpy as np
import pytest

from jax_moe import backend_triton

FAKE_0_3 = """
import os
os.environ["TRITON_CACHE_DIR"] = ""      # what 0.3.x does on import
calls = []
def triton_call(*args, kernel, out_shape, grid, name="", num_warps=None, num_stages=None,
                zeroed_outputs=(), input_output_aliases=None, **metaparams):
    calls.append(dict(args=args, out_shape=out_shape, grid=grid, zeroed_outputs=zeroed_outputs,
                      input_output_aliases=input_output_aliases, num_warps=num_warps, metaparams=metaparams))
    return ["out"] * len(out_shape)
"""

FAKE_0_4 = """
import os, warnings
os.environ.pop("TRITON_CACHE_DIR", None)  # what 0.4.x does on import
calls = []
def triton_call(*args, kernel, out_type=None, grid, name="", num_warps=None, num_stages=None,
                zeroed_outputs=(), **kwargs):
    if zeroed_outputs:
        warnings.warn("zeroed_outputs is deprecated", DeprecationWarning)
    calls.append(dict(args=args, out_type=out_type, grid=grid, zeroed_outputs=zeroed_outputs,
                      num_warps=num_warps, metaparams=kwargs))
    return ["out"] * len(out_type)
"""


@pytest.fixture(params=[("0.3", FAKE_0_3, "out_shape"), ("0.4", FAKE_0_4, "out_type")], ids=lambda p: p[0])
def fake_jax_triton(request, tmp_path, monkeypatch):
    _, source, keyword = request.param
    (tmp_path / "jax_triton.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "jax_triton", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", "/my/cache")
    monkeypatch.delenv("TRITON_DISABLE_LINE_INFO", raising=False)
    backend_triton._jax_triton.cache_clear()
    backend_triton._output_keyword.cache_clear()
    yield keyword
    backend_triton._jax_triton.cache_clear()
    backend_triton._output_keyword.cache_clear()
    sys.modules.pop("jax_triton", None)


def test_launch_speaks_both_apis_and_keeps_the_cache_dir(fake_jax_triton):
    shapes = (jax.ShapeDtypeStruct((3, 4), "float32"), jax.ShapeDtypeStruct((5,), "int32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the 0.4 deprecation must not leak out
        outs = backend_triton.launch("kernel", "x", "w", out_shapes=shapes, grid=(7,), num_warps=8, BLOCK=16)
    assert outs == ("out", "out")
    assert os.environ["TRITON_CACHE_DIR"] == "/my/cache"
    (call,) = sys.modules["jax_triton"].calls
    assert call[fake_jax_triton] == shapes
    assert call["args"] == ("x", "w") and call["grid"] == (7,) and call["zeroed_outputs"] == ()
    assert call["num_warps"] == 8 and call["metaparams"] == {"BLOCK": 16}


def test_in_place_zeros_alias_on_0_3_and_are_zeroed_outputs_later(fake_jax_triton):
    """0.3.x passes an aliased output as its own pointer (the kernel's signature as written); later
    versions would not, so there the output is a fresh buffer that jax-triton clears."""
    shapes = (jax.ShapeDtypeStruct((3, 4), "float32"), jax.ShapeDtypeStruct((5,), "int32"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend_triton.launch("kernel", "x", "zeros", out_shapes=shapes, grid=(7,), in_place_zeros={1: 1})
    (call,) = sys.modules["jax_triton"].calls
    assert call["args"] == ("x", "zeros")
    if fake_jax_triton == "out_shape":
        assert call["input_output_aliases"] == {1: 1} and call["zeroed_outputs"] == ()
    else:
        assert call["zeroed_outputs"] == (1,) and "input_output_aliases" not in call["metaparams"]


def test_cache_dir_stays_unset_when_it_was(fake_jax_triton, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR")
    backend_triton._jax_triton()
    assert "TRITON_CACHE_DIR" not in os.environ


@pytest.mark.parametrize("users_setting,expected", [(None, "1"), ("0", "0"), ("1", "1")])
def test_kernels_compile_without_line_info_unless_the_user_says(fake_jax_triton, monkeypatch, users_setting, expected):
    if users_setting is not None:
        monkeypatch.setenv("TRITON_DISABLE_LINE_INFO", users_setting)
    backend_triton._jax_triton()
    assert os.environ["TRITON_DISABLE_LINE_INFO"] == expected


def _launch(target: str, payload: bytes):
    """A custom call as jax-triton lowers a launch: the legacy one (0.3.x) with the compressed
    proto as its backend_config, the FFI one (0.4.x) with it as the ``opaque`` attribute."""
    if target == "triton_kernel_call":
        return lambda x: jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(x.shape, x.dtype), custom_call_api_version=2, legacy_backend_config=payload
        )(x)
    return lambda x: jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype))(x, opaque=payload)


@pytest.mark.parametrize("target", ["triton_kernel_call", "triton_kernel_call_ffi"])
def test_kernel_protos_reads_every_triton_call_back(target):
    rng = np.random.default_rng(0)
    # Quotes, backslashes and non-printable bytes, which the program's text would escape.
    protos = [rng.bytes(3000) + b'\\"ptx"\n', b"", rng.bytes(10)]

    def program(x):
        for proto in protos:
            x = _launch(target, zlib.compress(proto))(x)
        return _launch("other_target", b"x")(x)

    lowered = jax.jit(program).lower(np.ones(4, np.float32))
    assert backend_triton.kernel_protos(lowered) == protos


def test_kernel_protos_wants_a_lowered_program():
    with pytest.raises(TypeError, match="lowered: expected a jax.stages.Lowered"):
        backend_triton.kernel_protos(jax.jit(lambda x: x))
