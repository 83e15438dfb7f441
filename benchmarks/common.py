"""What the forward and training benchmarks share: the hardware ceilings measured in the same run,
timing of one case, the run header, and writing results (JSON, markdown, plot)."""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import tile_configs, timing

RESULTS = pathlib.Path(__file__).parent / "results"
INPUT_SETS = 3
# Slower calls are timed one at a time, three times: launch gaps are under 1% of them, and 140
# calls of every slow route would make the full grid's run several minutes longer.
SLOW_CALL_US = 10_000
# Below that, a repeat holds 20 back-to-back calls, or as few as 5 where those make at least 20 ms
# of device work: the host's gaps stay hidden behind a queue that long.
CALLS_PER_REPEAT = 20
MIN_CALLS_PER_REPEAT = 5
REPEAT_US = 20_000


def gpu_slug() -> str:
    return tile_configs.gpu_table_name(jax.devices()[0].device_kind)


def results_name(kind: str = "", quick: bool = False, tag: str = "") -> str:
    """``<gpu>[-kind][-quick][-tag]``: a results file's name without its suffix. A full run writes
    ``<gpu>`` (``<gpu>-train``) and replaces the run before it; a ``--quick`` run, a subset of the
    grid, writes its own ``-quick`` file; ``--tag`` keeps a run apart from both."""
    return "-".join(part for part in (gpu_slug(), kind, "quick" if quick else "", tag) if part)


def measure_read_bandwidth() -> float:
    """Bytes/s of a large reduction (4 GiB of bf16 read once)."""
    data = jax.random.normal(jax.random.key(0), (1 << 31,), jnp.bfloat16)
    reduce = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    us = timing.median_call_us(reduce, [(data,)], calls=10, repeats=5)
    return data.nbytes / (us * 1e-6)


def measure_gemm_rate() -> float:
    """FLOP/s of a large bf16 matmul (8192^3, random data)."""
    keys = jax.random.split(jax.random.key(1), 2)
    a, b = (jax.random.normal(k, (8192, 8192), jnp.bfloat16) for k in keys)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    us = timing.median_call_us(matmul, [(a, b)], calls=10, repeats=5)
    return 2 * 8192**3 / (us * 1e-6)


def time_route(fn, input_sets) -> float:
    """Median microseconds per call; one call first decides how many calls a repeat holds."""
    first = timing.median_call_us(fn, input_sets, calls=1, repeats=1, warmup=1)
    if first > SLOW_CALL_US:
        return timing.median_call_us(fn, input_sets, calls=1, repeats=3, warmup=0)
    calls = min(CALLS_PER_REPEAT, max(MIN_CALLS_PER_REPEAT, math.ceil(REPEAT_US / first)))
    return timing.median_call_us(fn, input_sets, calls=calls)


def rel_error(out, ref) -> float:
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def add_speedup(case_rows: list[dict]) -> None:
    """jax_moe's row of one case gets speedup_vs_best_other: the fastest other route's time / its own."""
    timed = [r for r in case_rows if "time_us" in r]
    ours = next((r for r in timed if r["route"] == "jax_moe"), None)
    others = [r["time_us"] for r in timed if not r["route"].startswith("jax_moe")]
    if ours and others:
        ours["speedup_vs_best_other"] = min(others) / ours["time_us"]


def header(read_bw: float, gemm_rate: float) -> dict:
    import jaxlib
    import triton

    try:
        from jax_moe import backend_triton

        jax_triton_version = backend_triton._jax_triton().__version__
    except ImportError:
        jax_triton_version = None
    return {
        "gpu": jax.devices()[0].device_kind,
        "read_bw_GBps": round(read_bw / 1e9, 1),
        "gemm_rate_TFLOPs": round(gemm_rate / 1e12, 1),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "triton": triton.__version__,
        "jax-triton": jax_triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "timing": timing.describe(calls="N", sets=INPUT_SETS)
        + f"; N = {CALLS_PER_REPEAT}, or as few as {MIN_CALLS_PER_REPEAT} where those make"
        f" {REPEAT_US / 1000:g} ms of work; calls slower than {SLOW_CALL_US / 1000:g} ms: the median"
        " of 3 single synchronized calls",
    }


def write(name: str, head: dict, rows: list[dict], columns: list[str], directory: pathlib.Path = RESULTS) -> pathlib.Path:
    """<directory>/<name>.json and .md (directory: results/); returns the JSON path."""
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"header": head, "rows": rows}, indent=1) + "\n")
    lines = [f"# {name}", ""] + [f"- {k}: {v}" for k, v in head.items()] + [""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(w) for c, w in zip(columns, widths)))
