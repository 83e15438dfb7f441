"""Forward MoE layer: jax_moe beside the JAX routes a user would otherwise pick, against the floor.

    python benchmarks/moe_bench.py [--quick]

Per model (bf16, with its family's routing, biases, activation and shared experts) and token
count T: every route's time, its parity with ``jax_moe.reference`` (checked before timing), the
hardware floor measured in the same run,

    floor(T) = max(bytes of the selected and shared experts / read bandwidth,
                   layer FLOPs (2 * T * (k + S) * 3 * H * F) / bf16 GEMM rate),

and floor_fraction = floor / time. Writes benchmarks/results/<gpu>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jax_moe
from jax_moe import arg_specs

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import common  # noqa: E402
import routes  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SKEWED_TOKENS = (32, 512, 4096)
QUICK_TOKENS = (1, 8, 64, 512, 4096)
QUICK_SKEWED_TOKENS = (512,)
# Routes whose cost grows with every expert (not only the chosen ones) are skipped beyond this.
MAX_DENSE_SECONDS = 0.05
PARITY_TOKENS = 64
COLUMNS = ["model", "T", "routing", "route", "time_us", "floor_us", "floor_fraction", "rel_err", "speedup_vs_best_other"]


def floor_us(shape, num_tokens, ids, read_bw, gemm_rate) -> float:
    experts = len(np.unique(np.asarray(ids))) + shape.num_shared
    weight_bytes = experts * 3 * shape.hidden * shape.intermediate * 2
    activation_bytes = 2 * num_tokens * shape.hidden * 2
    flops = 2 * num_tokens * (shape.top_k + shape.num_shared) * 3 * shape.hidden * shape.intermediate
    return max((weight_bytes + activation_bytes) / read_bw, flops / gemm_rate) * 1e6


def run_model(shape, token_counts, skewed_counts, read_bw, gemm_rate) -> list[dict]:
    key = jax.random.key(0)
    weights = arg_specs.random_inputs(shape, 1, jnp.bfloat16, key)
    w = (weights.w_gate, weights.w_up, weights.w_down, weights.extras)
    layers = {name: jax.jit(fn) for name, fn in routes.available(shape).items()}
    reference = layers["dense_einsum"]
    rows = []
    cases = [(t, "uniform") for t in token_counts] + [(t, "zipf1.2") for t in skewed_counts]
    for num_tokens, routing in cases:
        keys = jax.random.split(jax.random.key(num_tokens), 2 * common.INPUT_SETS)
        sets = []
        for i in range(common.INPUT_SETS):
            x = jax.random.normal(keys[2 * i], (num_tokens, shape.hidden), jnp.bfloat16)
            if routing == "uniform":
                logits = jax.random.normal(keys[2 * i + 1], (num_tokens, shape.num_experts))
            else:
                logits = arg_specs.zipf_router_logits(keys[2 * i + 1], num_tokens, shape.num_experts)
            sets.append((x, logits, *w))
        _, ids = routes.route(shape, sets[0][1], weights.extras)
        floor = floor_us(shape, num_tokens, ids, read_bw, gemm_rate)
        dense_seconds = 2 * num_tokens * shape.num_experts * 3 * shape.hidden * shape.intermediate / gemm_rate
        # Tokens are independent: parity on the first PARITY_TOKENS keeps the reference cheap.
        x0, logits0 = sets[0][0][:PARITY_TOKENS], sets[0][1][:PARITY_TOKENS]
        ref_out = reference(x0, logits0, *w)
        case_rows = []
        for name, layer in layers.items():
            row = {"model": shape.name, "T": num_tokens, "routing": routing, "route": name, "floor_us": floor}
            if name in ("dense_einsum", "ragged_dot") and dense_seconds > MAX_DENSE_SECONDS:
                row["skipped"] = f"costs every expert: ~{dense_seconds * 1e3:.0f} ms of GEMM at the measured rate"
            else:
                try:
                    row["rel_err"] = common.rel_error(layer(*sets[0])[:PARITY_TOKENS], ref_out)
                    row["time_us"] = common.time_route(layer, sets)
                    row["floor_fraction"] = floor / row["time_us"]
                except Exception as e:  # a third-party route that can't take this shape
                    row["skipped"] = f"{type(e).__name__}: {str(e)[:160]}"
            case_rows.append(row)
        common.add_speedup(case_rows)
        common.print_table(case_rows, COLUMNS)
        rows += case_rows
    return rows


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for route in sorted({r["route"] for r in rows}):
            points = sorted(
                (r["T"], r["floor_fraction"]) for r in rows
                if r["model"] == model and r["route"] == route and r["routing"] == "uniform" and "floor_fraction" in r
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=route)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.set_title(model)
        ax.set_xlabel("tokens T")
        ax.set_ylabel("floor / time")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer token counts (about 3 minutes)")
    parser.add_argument("--models", nargs="+", default=[m.name for m in arg_specs.MODELS])
    parser.add_argument("--tag", default="", help="appended to the results' file name")
    args = parser.parse_args(argv)
    read_bw, gemm_rate = common.measure_read_bandwidth(), common.measure_gemm_rate()
    head = common.header(read_bw, gemm_rate)
    print(head)
    tokens, skewed = (QUICK_TOKENS, QUICK_SKEWED_TOKENS) if args.quick else (TOKENS, SKEWED_TOKENS)
    rows = []
    name = common.results_name(quick=args.quick, tag=args.tag)
    for shape in arg_specs.MODELS:
        if shape.name in args.models:
            rows += run_model(shape, tokens, skewed, read_bw, gemm_rate)
            # Written after each model, so that a run cut short keeps what it measured.
            path = common.write(name, head, rows, COLUMNS + ["skipped"])
            plot(rows, path.with_suffix(".png"))
            print(f"wrote {path}, .md, .png")


if __name__ == "__main__":
    main()
