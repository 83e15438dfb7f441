"""The main job: run the fused MoE layer on an embedded default config, check it, time it.

    python -m jax_moe.demo            # GPU: Mixtral-8x7B layer, triton vs reference, T = 1, 32, 512
                                      # CPU: a small layer through Triton's interpreter

Prints, per token count, the relative error of the fused layer against ``jax_moe.reference`` and
the time of both.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import arg_specs, backend_triton, timing
from jax_moe.options import Routing

SMALL_LAYER = arg_specs.MoeShape("small", num_experts=8, routing=Routing(2), hidden=96, intermediate=160)
GPU_TOKENS = (1, 32, 512)
CPU_TOKENS = (1, 16)
SEED = 0
INPUT_SETS = 3


def _rel_error(out, ref) -> float:
    out = np.asarray(out.astype(jnp.float32), np.float64)
    ref = np.asarray(ref.astype(jnp.float32), np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def run(shape: arg_specs.MoeShape, tokens, dtype, backend: str, timed: bool) -> list[dict]:
    rows = []
    for num_tokens in tokens:
        keys = jax.random.split(jax.random.key(SEED + num_tokens), INPUT_SETS)
        sets = [arg_specs.random_inputs(shape, num_tokens, dtype, k).as_args() for k in keys]
        fused = jax.jit(lambda *a: jax_moe.fused_moe(*a, routing=shape.routing, backend=backend))
        ref = jax.jit(lambda *a: jax_moe.fused_moe(*a, routing=shape.routing, backend="reference"))
        row = {"tokens": num_tokens, "rel_err": _rel_error(fused(*sets[0]), ref(*sets[0]))}
        if timed:
            row[f"{backend}_us"] = timing.median_call_us(fused, sets)
            row["reference_us"] = timing.median_call_us(ref, sets)
            row["speedup"] = row["reference_us"] / row[f"{backend}_us"]
        rows.append(row)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts to run")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)

    reason = backend_triton.unavailable_reason()
    if reason is None:
        shape, backend, tokens = arg_specs.MIXTRAL_8X7B, "triton", args.tokens or GPU_TOKENS
        print(f"GPU: {jax.devices()[0].device_kind}. Fused triton layer vs jax_moe.reference, {args.dtype}.")
    else:
        shape, backend, tokens = SMALL_LAYER, "interpret", args.tokens or CPU_TOKENS
        print(f"No GPU path here ({reason}).")
        print("Running the same Triton kernels through Triton's interpreter on a small layer, "
              "checked against jax_moe.reference (interpreter times mean nothing).")
    print(f"Layer {shape.name}: E={shape.num_experts} top_k={shape.top_k} H={shape.hidden} F={shape.intermediate}")
    if backend == "triton":
        print("Timing:", timing.describe(sets=INPUT_SETS))
    rows = run(shape, tokens, args.dtype, backend, timed=backend == "triton")
    tolerance = 1e-2 if args.dtype != "float32" else 1e-3
    worst = max(r["rel_err"] for r in rows)
    print(f"parity: worst relative error {worst:.3g} (tolerance {tolerance:g}): {'OK' if worst <= tolerance else 'FAILED'}")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
