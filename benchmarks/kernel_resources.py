"""Registers, spills and shared memory of every kernel one layer call launches, compiled for a GPU
architecture on any machine (no GPU needed: Triton's bundled ptxas does the work).

    python benchmarks/kernel_resources.py --model mixtral-8x7b --tokens 8192 [--train] [--arch 90]

The layer (routed experts, plain softmax routing), with the tiles the architecture's table
selects (``configs/cuda-sm<arch>.json`` and its fallbacks: the H100's for sm_90), is traced
(``jax.eval_shape``, nothing runs) with a launcher that records each launch's
kernel, operand dtypes, launch options and constexprs; each record is then compiled with the
pointer alignment jax-triton declares (16 bytes). Spills to local memory cost a GEMM kernel
dearly, and they show up here before any device time is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import triton
from triton.backends.compiler import GPUTarget

from jax_moe import arg_specs, pipeline, tile_configs
from jax_moe.options import Routing

TRITON_TYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "int32": "i32", "int8": "i8", "uint8": "u8"}


@dataclasses.dataclass
class Launch:
    kernel: object
    pointer_dtypes: list[str]
    num_warps: int
    num_stages: int
    constexprs: dict
    grid: tuple


def recording_launcher(records: list[Launch]):
    def launch(kernel, *inputs, out_shapes, grid, in_place_zeros=None, num_warps=None, num_stages=None, **constexprs):
        dtypes = [jnp.dtype(a.dtype).name for a in inputs] + [jnp.dtype(s.dtype).name for s in out_shapes]
        records.append(Launch(kernel, dtypes, num_warps or 4, num_stages or 3, constexprs, grid))
        return tuple(jnp.zeros(s.shape, s.dtype) for s in out_shapes)

    return launch


def compile_record(record: Launch, arch: int):
    fn = record.kernel
    pointers = [name for name in fn.arg_names if name not in record.constexprs]
    signature = {name: "*" + TRITON_TYPES[d] for name, d in zip(pointers, record.pointer_dtypes)}
    signature.update({name: "constexpr" for name in record.constexprs})
    signature = {name: signature[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in pointers}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=record.constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    options = triton.compiler.make_backend(target).parse_options(
        {"num_warps": record.num_warps, "num_stages": record.num_stages}
    )
    return triton.compile(source, target=target, options=options.__dict__)


def resource_usage(compiled) -> dict:
    """REG, STACK, SHARED, LOCAL ... as cuobjdump reports them for the kernel's cubin."""
    cuobjdump = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        report = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"([A-Z]+):(\d+)", report)}


def trace(
    shape: arg_specs.MoeShape, num_tokens: int, train: bool, config: tile_configs.TileConfig | None,
    table: str = "cuda-sm90",
):
    """The launches of one layer call (with ``train``, of its forward and backward), with
    ``config``'s tiles or those ``table`` selects (by default the ones a Hopper card without a
    table of its own reads: the H100's)."""
    records: list[Launch] = []
    config = config or tile_configs.select(
        num_tokens * shape.top_k, 2, table,
        tile_configs.shape_key(shape.num_experts, shape.hidden, shape.intermediate, shape.top_k, "bfloat16"),
    )
    plan = pipeline.Plan(config=config, dot_precision="tf32", launch=recording_launcher(records))

    def layer(x, logits, w_gate, w_up, w_down):
        routing, dispatched = Routing(shape.top_k), None
        if pipeline.routes_and_dispatches(num_tokens * shape.top_k):  # as fused_moe launches it
            weights, ids, dispatched = pipeline.route_and_dispatch(
                logits, None, routing=routing, launch=plan.launch, num_shared=0, block_m=config.block_m
            )
        else:
            weights, ids = pipeline.top_k_routing(logits, None, routing=routing, launch=plan.launch)
        out = pipeline.experts(
            x, weights, ids, pipeline.ExpertWeights(w_gate, w_up, w_down), plan=plan, dispatched=dispatched
        )
        return jnp.sum(out.astype(jnp.float32))

    h, f, e = shape.hidden, shape.intermediate, shape.num_experts
    args = [
        jax.ShapeDtypeStruct((num_tokens, h), jnp.bfloat16),
        jax.ShapeDtypeStruct((num_tokens, e), jnp.float32),
        jax.ShapeDtypeStruct((e, h, f), jnp.bfloat16),
        jax.ShapeDtypeStruct((e, h, f), jnp.bfloat16),
        jax.ShapeDtypeStruct((e, f, h), jnp.bfloat16),
    ]
    jax.eval_shape(jax.value_and_grad(layer, argnums=(0, 1, 2, 3, 4)) if train else layer, *args)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixtral-8x7b", choices=[m.name for m in arg_specs.MODELS])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--train", action="store_true", help="the backward's kernels too")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    shape = next(m for m in arg_specs.MODELS if m.name == args.model)
    for record in trace(shape, args.tokens, args.train, None, table=f"cuda-sm{args.arch}"):
        compiled = compile_record(record, args.arch)
        usage = resource_usage(compiled)
        tiles = {k: v for k, v in record.constexprs.items() if k.startswith("BLOCK") or k in ("GROUP_M",)}
        print(
            f"{record.kernel.__name__:28s} warps={record.num_warps} stages={record.num_stages} "
            f"regs={usage.get('REG', 0):3d} stack={usage.get('STACK', 0):4d}B local={usage.get('LOCAL', 0):4d}B "
            f"smem={compiled.metadata.shared // 1024:3d}KiB "
            f"grid={record.grid[0]} {tiles}"
        )


if __name__ == "__main__":
    main()
