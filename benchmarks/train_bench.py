"""Training step of the MoE layer (forward + backward): jax_moe beside the differentiable JAX routes.

    python benchmarks/train_bench.py [--quick]

Times ``value_and_grad`` of ``sum(layer(x, logits, w_gate, w_up, w_down) * cotangent)`` with respect
to all five inputs, bf16, at T = 2048, 8192, 16384 (or ``--tokens``) for the Mixtral-8x7B,
DeepSeek-V3 and Qwen3-30B-A3B routed-expert shapes; jax_moe both with its default residuals
(gate/up recomputed in the backward) and with ``save_activations=True``. FLOPs of a step: 3x the
forward's 2 * T * k * 3 * H * F (the backward's GEMMs are twice the forward's). Reported: TFLOP/s,
the fraction of the bf16 GEMM rate measured in the same run, and the fraction of a floor that also
counts memory,

    floor = max(FLOPs / GEMM rate, 3 * bytes of all expert weights / read bandwidth)

(the weights read by the forward and again by the backward, their gradients written: with few
rows per expert, DeepSeek-V3's step at T = 2048 is bound by that traffic, not by its GEMMs).

Writes benchmarks/results/<gpu>-train.json and .md; ``--quick`` writes <gpu>-train-quick.*
instead, and ``--tag NAME`` appends ``-NAME``.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

from jax_moe import arg_specs, timing
from jax_moe.options import Routing

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
import common  # noqa: E402
import routes  # noqa: E402

# The routed experts of each model with plain softmax routing: the shapes the training target names.
MODELS = tuple(
    arg_specs.MoeShape(m.name, m.num_experts, Routing(m.top_k), m.hidden, m.intermediate)
    for m in (arg_specs.MIXTRAL_8X7B, arg_specs.DEEPSEEK_V3, arg_specs.QWEN3_30B_A3B)
)
TOKENS = (2048, 8192, 16384)
QUICK_TOKENS = (8192,)
MAX_DENSE_SECONDS = 0.15
PARITY_TOKENS = 256
COLUMNS = [
    "model", "T", "route", "time_us", "TFLOPs", "gemm_fraction", "floor_us", "floor_fraction", "grad_rel_err",
    "speedup_vs_best_other",
]


def step_flops(shape, num_tokens: int) -> int:
    return 3 * 2 * num_tokens * shape.top_k * 3 * shape.hidden * shape.intermediate


def floor_us(shape, num_tokens: int, read_bw: float, gemm_rate: float) -> float:
    """The step's lower bound: its GEMMs at the GEMM rate, or every expert's three bf16 matrices
    read by the forward, read by the backward and their gradients written, at the read bandwidth
    (every expert gets tokens at these T). Activations and recomputation are left out."""
    weight_bytes = shape.weight_bytes(jnp.bfloat16)
    return max(step_flops(shape, num_tokens) / gemm_rate, 3 * weight_bytes / read_bw) * 1e6


def _train_step(layer):
    def loss(x, logits, wg, wu, wd, cotangent):
        return jnp.sum(layer(x, logits, wg, wu, wd, {}).astype(jnp.float32) * cotangent)

    return timing.train_step(loss)


def run_model(shape, token_counts, read_bw, gemm_rate) -> list[dict]:
    weights = arg_specs.random_inputs(shape, 1, jnp.bfloat16, jax.random.key(0))
    w = (weights.w_gate, weights.w_up, weights.w_down)
    layers = routes.available(shape)
    # The other residual policy: the forward's gate/up pre-activations kept instead of recomputed.
    layers["jax_moe_saved_activations"] = routes.fused(shape, save_activations=True)
    steps = {name: _train_step(fn) for name, fn in layers.items()}
    rows = []
    for num_tokens in token_counts:
        keys = jax.random.split(jax.random.key(num_tokens), 3 * common.INPUT_SETS)
        sets = [
            (
                jax.random.normal(keys[3 * i], (num_tokens, shape.hidden), jnp.bfloat16),
                jax.random.normal(keys[3 * i + 1], (num_tokens, shape.num_experts)),
                *w,
                jax.random.normal(keys[3 * i + 2], (num_tokens, shape.hidden)),
            )
            for i in range(common.INPUT_SETS)
        ]
        flops = step_flops(shape, num_tokens)
        floor = floor_us(shape, num_tokens, read_bw, gemm_rate)
        dense_seconds = flops * shape.num_experts / shape.top_k / gemm_rate
        # Parity of the gradients on a slice of the tokens, against autodiff of the reference.
        small = [a[:PARITY_TOKENS] if i in (0, 1, 5) else a for i, a in enumerate(sets[0])]
        _, *ref_grads = steps["dense_einsum"](*small)
        case = []
        for name, step in steps.items():
            row = {"model": shape.name, "T": num_tokens, "route": name, "floor_us": floor}
            if name in ("dense_einsum", "ragged_dot") and dense_seconds > MAX_DENSE_SECONDS:
                row["skipped"] = f"costs every expert: ~{dense_seconds * 1e3:.0f} ms of GEMM at the measured rate"
            else:
                try:
                    _, *grads = step(*small)
                    row["grad_rel_err"] = max(common.rel_error(g, r) for g, r in zip(grads, ref_grads))
                    row["time_us"] = common.time_route(step, sets)
                    row["TFLOPs"] = flops / row["time_us"] / 1e6
                    row["gemm_fraction"] = flops / (row["time_us"] * 1e-6) / gemm_rate
                    row["floor_fraction"] = floor / row["time_us"]
                except Exception as e:
                    row["skipped"] = f"{type(e).__name__}: {str(e)[:160]}"
            case.append(row)
        common.add_speedup(case)
        common.print_table(case, COLUMNS)
        rows += case
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 8192 only")
    parser.add_argument("--models", nargs="+", default=[m.name for m in MODELS])
    parser.add_argument("--tokens", nargs="+", type=int, help="token counts (default: the full list)")
    parser.add_argument("--tag", default="", help="appended to the results' file name (<gpu>-train[-quick]-TAG)")
    args = parser.parse_args(argv)
    read_bw, gemm_rate = common.measure_read_bandwidth(), common.measure_gemm_rate()
    head = common.header(read_bw, gemm_rate)
    print(head)
    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    name = common.results_name("train", quick=args.quick, tag=args.tag)
    rows = []
    for shape in MODELS:
        if shape.name in args.models:
            rows += run_model(shape, tokens, read_bw, gemm_rate)
            # Written after each model, so that a run cut short keeps what it measured.
            path = common.write(name, head, rows, COLUMNS + ["skipped"])
            print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
