"""Forward MoE layer: jax_moe beside the JAX routes a user would otherwise pick, against the floor.

    python benchmarks/moe_bench.py [--quick] [--models ...] [--tag NAME]

Per model (bf16, with its family's routing, biases, activation and shared experts) and token
count T: every route's time, its parity with ``jax_moe.reference`` (checked before timing), the
hardware floor measured in the same run,

    floor(T) = max(bytes of the selected and shared experts / read bandwidth,
                   layer FLOPs (2 * T * (k + S) * 3 * H * F) / bf16 GEMM rate),

averaged over the input sets the timing cycles through (each selects its own experts), and
floor_fraction = floor / time. The quantized routes (``routes.QUANTIZED_ROUTES``, timed when
named in ``--routes``) count their experts' bytes as stored: values, scales and zero points;
their rows add ``speedup_vs_bf16``, jax_moe's time over theirs.

Writes benchmarks/results/<gpu>.json, .md and .png; ``--quick`` writes <gpu>-quick.* instead (a
subset of the grid never replaces the full one), and ``--tag NAME`` appends ``-NAME``.

At decode sizes (T <= IN_GRAPH_MAX_TOKENS) jax_moe is also timed the way a model runs it:
IN_GRAPH_LAYERS layers in one jitted program (each with its own activations and logits, the same
weights), so that the host's fixed cost per jitted call is shared by the layers: ``in_graph_us``
per layer, against the floor of those layers' inputs.

    python benchmarks/moe_bench.py --refloor benchmarks/results/<name>.json

recomputes the floors of recorded results from their header's bandwidth and GEMM rate and the
routing of the same input sets, drawn alone (no GPU needed).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe import arg_specs, timing

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402
import routes  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
SKEWED_TOKENS = (32, 512, 4096)
QUICK_TOKENS = (1, 8, 64, 512, 4096)
QUICK_SKEWED_TOKENS = (512,)
# Rows name the Zipf exponent of arg_specs.zipf_router_logits.
ROUTING_LABELS = {"uniform": "uniform", "zipf": "zipf1.2"}
DEFAULT_MODELS = ["mixtral-8x7b", "deepseek-v3", "qwen3-30b-a3b", "gpt-oss-120b"]
# Routes whose cost grows with every expert (not only the chosen ones) are skipped beyond this.
MAX_DENSE_SECONDS = 0.05
EVERY_EXPERT_ROUTES = ("dense_einsum", "ragged_dot")
PARITY_TOKENS = 64
# jax_moe with the shared experts as a separate dense MLP doubles the triton programs to compile
# for a model that has them: the full grid times that comparison at the quick grid's T only.
SHARED_COMPARISON_TOKENS = QUICK_TOKENS
FLOOR_METHOD = (
    "mean over the input sets of max((bytes of the experts the set selects, shared ones included, as the route "
    "stores them) / read_bw, FLOPs / gemm_rate)"
)
# A model's forward is one jitted program over all its layers: at decode sizes a layer alone in a
# program pays the host's cost per call (which can exceed the GPU's time), layers in one program
# share it.
IN_GRAPH_MAX_TOKENS = 16
IN_GRAPH_LAYERS = 8
IN_GRAPH_METHOD = (
    f"jax_moe at T <= {IN_GRAPH_MAX_TOKENS}: {IN_GRAPH_LAYERS} layers in one jitted program (own activations and "
    "logits, shared weights), timed like the calls; in_graph_us = time per program / layers, floor of "
    "those layers' inputs"
)
COLUMNS = [
    "model", "T", "routing", "route", "time_us", "floor_us", "floor_fraction", "rel_err", "speedup_vs_best_other",
    "in_graph_us", "in_graph_floor_fraction", "speedup_vs_bf16",
]


def floor_us(shape, num_tokens, ids_per_set, read_bw, gemm_rate, route: str = "jax_moe") -> float:
    """The floor of a case whose time is the mean over input sets with these expert ids, for a
    route whose experts take ``routes.expert_bytes`` each."""
    activation_bytes = 2 * num_tokens * shape.hidden * 2
    flops = 2 * num_tokens * shape.slots * 3 * shape.hidden * shape.intermediate
    floors = []
    for ids in ids_per_set:
        experts = len(np.unique(np.asarray(ids))) + shape.num_shared
        weight_bytes = experts * routes.expert_bytes(shape, route)
        floors.append(max((weight_bytes + activation_bytes) / read_bw, flops / gemm_rate) * 1e6)
    return float(np.mean(floors))


def _case_inputs(shape, weights, num_tokens: int, routing: str) -> list[tuple]:
    """The input sets one case's timing cycles through."""
    return arg_specs.input_sets(
        shape, weights, num_tokens, jax.random.key(num_tokens), count=common.INPUT_SETS, routing=routing
    )


def _model_weights(shape):
    return arg_specs.random_inputs(shape, 1, jnp.bfloat16, jax.random.key(0))


def _expert_ids_per_set(shape, weights, sets) -> list:
    return [routes.reference_routing(shape, s[1], weights.extras)[1] for s in sets]


def _skip_reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error)[:160]}"


def _cases(token_counts, skewed_counts) -> list[tuple[int, str]]:
    return [(t, "uniform") for t in token_counts] + [(t, "zipf") for t in skewed_counts]


def _inputs(shape, weights, cases):
    """Each case's input sets, and the first set cut to PARITY_TOKENS tokens for the parity check
    (tokens are independent: the reference stays cheap)."""
    inputs = {case: _case_inputs(shape, weights, *case) for case in cases}
    parity = {case: (sets[0][0][:PARITY_TOKENS], sets[0][1][:PARITY_TOKENS], *sets[0][2:]) for case, sets in inputs.items()}
    return inputs, parity


def _in_graph_inputs(shape, weights, num_tokens: int, routing: str) -> list[tuple]:
    """Two argument tuples ``(xs, logits, w_gate, w_up, w_down, extras)`` for ``_stacked_layers``, each
    with IN_GRAPH_LAYERS activations and logits of its own (timing alternates between them)."""
    sets = arg_specs.input_sets(
        shape, weights, num_tokens, jax.random.key(1000 + num_tokens), count=2 * IN_GRAPH_LAYERS, routing=routing
    )
    groups = (sets[:IN_GRAPH_LAYERS], sets[IN_GRAPH_LAYERS:])
    return [(tuple(s[0] for s in g), tuple(s[1] for s in g), *g[0][2:]) for g in groups]


def _stacked_layers(layer):
    """IN_GRAPH_LAYERS applications of ``layer`` in one program, one per activation."""
    return lambda xs, logits, *weights: tuple(layer(x, lg, *weights) for x, lg in zip(xs, logits))


def _costs_every_expert_s(shape, route, num_tokens, gemm_rate) -> float:
    """GEMM seconds of a route that multiplies its rows by every routed expert (0 for the others).

    The dense einsum does it with each token's row; ``jax.lax.ragged_dot``, which XLA lowers to one
    masked matmul over all groups on this stack, with each of a token's ``top_k`` sorted rows.
    """
    if route not in EVERY_EXPERT_ROUTES:
        return 0.0
    rows = num_tokens * (shape.top_k if route == "ragged_dot" else 1)
    return 2 * rows * shape.num_experts * 3 * shape.hidden * shape.intermediate / gemm_rate


def _selected_routes(available: dict, selected) -> dict:
    """The routes to time: those named in ``selected``, or all available but the quantized ones."""
    if selected is None:
        return {name: fn for name, fn in available.items() if name not in routes.QUANTIZED_ROUTES}
    return {name: fn for name, fn in available.items() if name in selected}


def _route_sets(sets: list[tuple], weights: tuple) -> list[tuple]:
    """``sets`` with ``weights`` (``routes.route_weights``' tuple) in place of their own."""
    return [(s[0], s[1], *weights) for s in sets]


def model_programs(shape, token_counts, skewed_counts, gemm_rate, selected=None) -> dict:
    """``{(model, route, T): (layer, abstract arguments)}``: one program per route and T (the
    routings differ only in the logits' values), plus the parity reference. Built from shapes
    alone: nothing is allocated."""
    available = routes.available(shape, quantized=True)
    layers = _selected_routes(available, selected)
    inputs, parity = jax.eval_shape(lambda: _inputs(shape, _model_weights(shape), _cases(token_counts, skewed_counts)))
    programs = {}
    for case, sets in inputs.items():
        num_tokens = case[0]
        parity_args = parity[case]
        programs[(shape.name, "reference", parity_args[0].shape[0])] = (available["dense_einsum"], parity_args)
        for name, fn in layers.items():
            if _costs_every_expert_s(shape, name, num_tokens, gemm_rate) > MAX_DENSE_SECONDS:
                continue
            if name == "jax_moe+dense_shared" and num_tokens not in SHARED_COMPARISON_TOKENS:
                continue
            args = sets[0]
            if name in routes.QUANTIZED_ROUTES:
                quantized = jax.eval_shape(functools.partial(routes.route_weights, name), *args[2:])
                args = _route_sets([args], quantized)[0]
            programs[(shape.name, name, num_tokens)] = (fn, args)
        if num_tokens <= IN_GRAPH_MAX_TOKENS and "jax_moe" in layers:
            layered = jax.eval_shape(lambda: _in_graph_inputs(shape, _model_weights(shape), *case))
            programs[(shape.name, "jax_moe in graph", num_tokens)] = (_stacked_layers(layers["jax_moe"]), layered[0])
    return programs


def compile_programs(programs: dict, threads: int) -> dict:
    """All models' programs in one pool, so that no model waits for the last compile of the one
    before it. XLA's (every route but jax_moe's) go first: they autotune their GEMMs on the GPU
    and take the longest (tens of seconds each in the pool), so none of them should start last.
    Smallest T first among them, the ones that need the least GPU memory to autotune; concurrent
    autotuning can still run out of it, and ``timing.compile_all`` retries those alone."""
    order = sorted(programs, key=lambda key: (key[1].startswith("jax_moe"), key[2]))  # jax_moe* last
    start = time.perf_counter()
    seconds = {}
    compiled = timing.compile_all({key: programs[key] for key in order}, threads, seconds)
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:4]
    slowest = ", ".join(f"{'/'.join(map(str, key))} {s:.0f} s" for key, s in slowest)
    print(f"compiled {len(programs)} programs in {time.perf_counter() - start:.0f} s "
          f"({threads} threads; slowest: {slowest})", flush=True)
    return compiled


def run_model(shape, token_counts, skewed_counts, read_bw, gemm_rate, compiled, selected=None) -> list[dict]:
    """Checks and times every route of one model whose program ``compiled`` holds."""
    start = time.perf_counter()
    weights = _model_weights(shape)
    layers = _selected_routes(routes.available(shape, quantized=True), selected)
    inputs, parity_inputs = _inputs(shape, weights, _cases(token_counts, skewed_counts))
    # Each quantized route's weights, made once: the timed calls only read them.
    quantized = {
        name: jax.jit(functools.partial(routes.route_weights, name))(
            weights.w_gate, weights.w_up, weights.w_down, weights.extras
        )
        for name in layers if name in routes.QUANTIZED_ROUTES
    }
    rows = []
    for case, sets in inputs.items():
        num_tokens, routing = case
        ids = _expert_ids_per_set(shape, weights, sets)
        parity_args = parity_inputs[case]
        ref_out = compiled[(shape.name, "reference", parity_args[0].shape[0])](*parity_args)
        case_rows = []
        for name in layers:
            floor = floor_us(shape, num_tokens, ids, read_bw, gemm_rate, name)
            row = {
                "model": shape.name, "T": num_tokens, "routing": ROUTING_LABELS[routing], "route": name,
                "floor_us": floor,
            }
            route_sets = _route_sets(sets, quantized[name]) if name in quantized else sets
            executable = compiled.get((shape.name, name, num_tokens))
            if executable is None and name == "jax_moe+dense_shared":
                row["skipped"] = f"timed at T in {SHARED_COMPARISON_TOKENS} only"
            elif executable is None:
                dense_ms = _costs_every_expert_s(shape, name, num_tokens, gemm_rate) * 1e3
                row["skipped"] = f"costs every expert: ~{dense_ms:.0f} ms of GEMM at the measured rate"
            elif isinstance(executable, Exception):
                row["skipped"] = _skip_reason(executable)
            else:
                try:
                    row["rel_err"] = common.rel_error(executable(*route_sets[0])[:PARITY_TOKENS], ref_out)
                    row["time_us"] = common.time_route(executable, route_sets)
                    row["floor_fraction"] = floor / row["time_us"]
                except Exception as e:
                    row["skipped"] = _skip_reason(e)
            case_rows.append(row)
        if num_tokens <= IN_GRAPH_MAX_TOKENS and "jax_moe" in layers:
            ours = next(r for r in case_rows if r["route"] == "jax_moe")
            _time_in_graph(ours, shape, weights, case, compiled, read_bw, gemm_rate)
        common.add_speedup(case_rows)
        _add_speedup_vs_bf16(case_rows)
        common.print_table(case_rows, COLUMNS)
        rows += case_rows
    print(f"{shape.name}: checked and timed {len(inputs)} cases in {time.perf_counter() - start:.0f} s")
    return rows


def _add_speedup_vs_bf16(case_rows: list[dict]) -> None:
    """Each timed quantized route's row of one case gets jax_moe's (bf16) time over its own."""
    bf16 = next((r for r in case_rows if r["route"] == "jax_moe" and "time_us" in r), None)
    for row in case_rows:
        if bf16 and row["route"] in routes.QUANTIZED_ROUTES and "time_us" in row:
            row["speedup_vs_bf16"] = bf16["time_us"] / row["time_us"]


def _time_in_graph(row, shape, weights, case, compiled, read_bw, gemm_rate) -> None:
    """Adds in_graph_us and in_graph_floor_fraction to jax_moe's row of a decode case."""
    executable = compiled.get((shape.name, "jax_moe in graph", case[0]))
    if executable is None or isinstance(executable, Exception) or "time_us" not in row:
        return
    groups = _in_graph_inputs(shape, weights, *case)
    first_layer = (groups[0][0][0], groups[0][1][0], *groups[0][2:])
    layer_ref = compiled[(shape.name, "reference", case[0])](*first_layer)
    row["in_graph_rel_err"] = common.rel_error(executable(*groups[0])[0], layer_ref)
    ids = [routes.reference_routing(shape, logits, weights.extras)[1] for group in groups for logits in group[1]]
    floor = floor_us(shape, case[0], ids, read_bw, gemm_rate)
    row["in_graph_us"] = common.time_route(executable, groups) / IN_GRAPH_LAYERS
    row["in_graph_floor_fraction"] = floor / row["in_graph_us"]


def _drawn_expert_ids(shape, num_tokens: int, routing: str) -> list:
    """The expert ids of one case's input sets, drawn as ``run_model`` draws them. Jitted, the
    weights and activations the draw also makes are dead code: none of them is ever allocated."""
    weights = _model_weights(shape)
    return _expert_ids_per_set(shape, weights, _case_inputs(shape, weights, num_tokens, routing))


def refloor(path: pathlib.Path) -> None:
    """Recomputes the floors (and floor fractions) of a results file from its header's bandwidth
    and GEMM rate; rewrites its .json, .md and .png in place."""
    if not path.is_file():
        raise ValueError(f"--refloor: {path} is not a results file")
    data = json.loads(path.read_text())
    head, rows = data["header"], data["rows"]
    read_bw, gemm_rate = head["read_bw_GBps"] * 1e9, head["gemm_rate_TFLOPs"] * 1e12
    shapes = {m.name: m for m in arg_specs.MODELS}
    routings = {label: routing for routing, label in ROUTING_LABELS.items()}
    unknown = {r["model"] for r in rows} - shapes.keys() | {r["routing"] for r in rows} - routings.keys()
    if unknown:
        raise ValueError(f"--refloor: {path} has rows of models or routings this script does not know: {sorted(unknown)}")
    draw = jax.jit(_drawn_expert_ids, static_argnums=(0, 1, 2))
    ids = {}
    for row in rows:
        case = (row["model"], row["T"], row["routing"])
        shape = shapes[row["model"]]
        if case not in ids:
            ids[case] = draw(shape, row["T"], routings[row["routing"]])
        row["floor_us"] = floor_us(shape, row["T"], ids[case], read_bw, gemm_rate, row["route"])
        if "time_us" in row:
            row["floor_fraction"] = row["floor_us"] / row["time_us"]
    head["floor"] = FLOOR_METHOD
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head["floor_recomputed"] = f"{now}: python benchmarks/moe_bench.py --refloor {path.name}"
    written = common.write(path.stem, head, rows, COLUMNS + ["skipped"], directory=path.parent)
    plot(rows, written.with_suffix(".png"))
    print(f"rewrote {written}, .md, .png")


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
    parser.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, choices=[m.name for m in arg_specs.MODELS],
        help=f"default: {' '.join(DEFAULT_MODELS)}",
    )
    parser.add_argument("--tag", default="", help="appended to the results' file name (<gpu>[-quick]-TAG)")
    parser.add_argument("--tokens", type=int, nargs="+", help="uniform-routing token counts only (give a --tag)")
    parser.add_argument("--routes", nargs="+", help="time these routes only, e.g. jax_moe (give a --tag)")
    parser.add_argument(
        "--compile-threads", type=int, default=min(16, os.cpu_count() or 1), help="programs lowered and compiled at a time"
    )
    parser.add_argument("--refloor", type=pathlib.Path, metavar="RESULTS_JSON", help="see above; runs nothing else")
    args = parser.parse_args(argv)
    if args.refloor:
        refloor(args.refloor)
        return
    read_bw, gemm_rate = common.measure_read_bandwidth(), common.measure_gemm_rate()
    head = {**common.header(read_bw, gemm_rate), "floor": FLOOR_METHOD, "in_graph": IN_GRAPH_METHOD}
    print(head)
    tokens, skewed = (QUICK_TOKENS, QUICK_SKEWED_TOKENS) if args.quick else (TOKENS, SKEWED_TOKENS)
    if args.tokens:
        tokens, skewed = tuple(args.tokens), ()
    shapes = [shape for shape in arg_specs.MODELS if shape.name in args.models]
    programs = {}
    for shape in shapes:
        programs |= model_programs(shape, tokens, skewed, gemm_rate, args.routes)
    compiled = compile_programs(programs, args.compile_threads)
    rows = []
    name = common.results_name(quick=args.quick, tag=args.tag)
    for shape in shapes:
        rows += run_model(shape, tokens, skewed, read_bw, gemm_rate, compiled, args.routes)
        # Written after each model, so that a run cut short keeps what it measured.
        path = common.write(name, head, rows, COLUMNS + ["skipped"])
        plot(rows, path.with_suffix(".png"))
        print(f"wrote {path}, .md, .png")


if __name__ == "__main__":
    main()
