"""The host's cost per Triton launch, and what it does to jax_moe at decode sizes.

    python benchmarks/launch_cost.py                              # jax_moe's default: no line info
    python benchmarks/launch_cost.py --parts layers               # the decode layers only
    TRITON_DISABLE_LINE_INFO=0 python benchmarks/launch_cost.py   # Triton's default: line info

Each ``jax_triton.triton_call`` carries the kernel's zlib-compressed proto (PTX and TTIR inside)
as its operand. Through jax-triton 0.3.x's legacy custom call the host's cost grows with that
operand on every launch, and XLA never puts the launch in a CUDA graph; jax-triton 0.4.x's XLA FFI
custom call sits in XLA's command buffers (CUDA graphs), which XLA forms from its thunk sequence,
after the HLO passes: compiled HLO does not show them. Run it under different ``XLA_FLAGS``
(``--xla_gpu_enable_command_buffer=`` turns command buffers off, ``--xla_gpu_graph_min_graph_size``
sets the fewest commands a graph takes) to see what capture changes. Prints, one JSON line each:

- ``chain``: one jitted program of LAUNCHES chained launches of a tiny kernel (one 128-element
  program) with ``pad`` unrolled multiply-adds per element, so that the PTX grows (the GPU's work
  grows with it, by much less than the host's at small pads); ``xla`` the same number of chained
  XLA elementwise ops.
- ``operand_bytes``: the compressed operand of each launch of one jax_moe layer.
- ``layer``: jax_moe per layer with ``moe_bench.IN_GRAPH_LAYERS`` layers in one jitted program,
  and per call alone, on the forward benchmark's inputs.

Timing as the benchmarks time (``jax_moe.timing.median_call_us``). Prints only; what it has
shown is in benchmarks/README.md ("Host launch cost").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import zlib

import jax
import jax.numpy as jnp
import triton
import triton.language as tl

from jax_moe import arg_specs, backend_triton, timing

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import moe_bench  # noqa: E402
import routes  # noqa: E402

LAUNCHES = 48
PADS = (0, 500, 2000, 6000)
DECODE_CASES = (("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 8), ("mixtral-8x7b", 1))


@triton.jit
def _padded_copy_kernel(x_ptr, out_ptr, PAD: tl.constexpr):
    """Grid (1,): ``out = x`` after PAD multiply-adds per element, each with its own constants."""
    offsets = tl.arange(0, 128)
    value = tl.load(x_ptr + offsets)
    for i in tl.static_range(PAD):
        value = value * (1.0 + i * 1.37e-7) + i * 0.37
    tl.store(out_ptr + offsets, value)


def _triton_chain(pad: int):
    def chain(x):
        for _ in range(LAUNCHES):
            (x,) = backend_triton.launch(
                _padded_copy_kernel, x, out_shapes=(jax.ShapeDtypeStruct(x.shape, x.dtype),), grid=(1,), PAD=pad
            )
        return x

    return chain


def _xla_chain(x):
    for _ in range(LAUNCHES):
        x = jax.lax.optimization_barrier(x * 1.0001 + 0.5)
    return x


def _operand_bytes(fn, *args) -> list[int]:
    """Each launch's operand size, compressed again as jax-triton compresses it."""
    return [len(zlib.compress(proto)) for proto in backend_triton.kernel_protos(jax.jit(fn).lower(*args))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("chains", "layers"), default=("chains", "layers"),
                        help="the chained tiny launches, the decode layers, or both (the default)")
    parts = parser.parse_args().parts
    print(json.dumps({
        "TRITON_DISABLE_LINE_INFO": os.environ.get("TRITON_DISABLE_LINE_INFO", "unset (jax_moe sets 1)"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }))
    x = jnp.ones((128,), jnp.float32)
    if "chains" in parts:
        for name, fn in [("xla", _xla_chain)] + [(f"pad={pad}", _triton_chain(pad)) for pad in PADS]:
            compiled = jax.jit(fn).lower(x).compile()
            us = timing.median_call_us(compiled, [(x,), (x + 1,)])
            row = {"chain": name, "launches": LAUNCHES, "per_launch_us": round(us / LAUNCHES, 2)}
            print(json.dumps(row), flush=True)
    for model, num_tokens in DECODE_CASES if "layers" in parts else ():
        shape = next(m for m in arg_specs.MODELS if m.name == model)
        weights = moe_bench._model_weights(shape)
        layer = routes.fused(shape)
        sets = moe_bench._case_inputs(shape, weights, num_tokens, "uniform")
        groups = moe_bench._in_graph_inputs(shape, weights, num_tokens, "uniform")
        in_program = jax.jit(moe_bench._stacked_layers(layer)).lower(*groups[0]).compile()
        row = {"model": model, "T": num_tokens, "operand_bytes": _operand_bytes(layer, *sets[0])}
        alone = jax.jit(layer).lower(*sets[0]).compile()
        row["layer_in_program_us"] = round(timing.median_call_us(in_program, groups, calls=10) / moe_bench.IN_GRAPH_LAYERS, 1)
        row["layer_alone_us"] = round(timing.median_call_us(alone, sets), 1)
        print(json.dumps(row), flush=True)
        del weights, sets, groups


if __name__ == "__main__":
    main()
