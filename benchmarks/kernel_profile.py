"""Where one layer call's GPU time goes: per-kernel durations read by Nsight Compute.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \\
        --log-file prof.csv python benchmarks/kernel_profile.py --model mixtral-8x7b --tokens 8192 --train
    python benchmarks/kernel_profile.py --report prof.csv

The first command compiles and runs the call (the model's layer with its family's routing and
shared experts, or with ``--train`` the forward and backward step, as the tuner times them;
``--routing zipf`` for skewed router logits), then runs it once more between ``cudaProfilerStart`` and
``cudaProfilerStop``, so ncu records exactly one call's kernels. ncu runs them one at a time, so
the sum leaves out launch gaps and any overlap. ``--tiles`` overrides fields of the tile config
the layer would pick (JSON, e.g. ``'{"gate_up_backward": {"block_n": 64, ...}}'``);
``--save-activations`` keeps the forward's pre-activations for the backward.

    python benchmarks/kernel_profile.py --model mixtral-8x7b --tokens 8192 --train --time \
        --tiles '{}' --tiles '{"gate_up": {...}}' ...

``--time`` skips the profiler and prints the median time of the call with each ``--tiles``
override instead (back-to-back calls, as the tuner times them): quick A/B tests of tiles.
"""

from __future__ import annotations

import argparse
import collections
import csv
import dataclasses
import json

UNIT_US = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}


def _profiler_range():
    """cudaProfilerStart / Stop of the CUDA runtime (cuda-python's bindings, else CuPy's)."""
    try:
        from cuda.bindings import runtime

        return (lambda: runtime.cudaProfilerStart()), (lambda: runtime.cudaProfilerStop())
    except ImportError:
        from cupy.cuda import profiler

        return profiler.start, profiler.stop


def run(args) -> None:
    import jax
    import jax.numpy as jnp

    from jax_moe import arg_specs, tile_configs, tune

    shape = next(m for m in arg_specs.MODELS if m.name == args.model)
    selected = tile_configs.select(
        args.tokens * shape.slots, 2, tile_configs.device_tables(jax.devices()[0]), shape.tile_key(jnp.bfloat16),
    )
    build = tune._train_step if args.train else tune._layer
    input_sets = tune._input_sets(shape, args.tokens, jnp.bfloat16, with_cotangent=args.train, routing=args.routing)
    overrides = args.tiles or ["{}"]
    configs = [
        tile_configs.TileConfig.from_dict({**dataclasses.asdict(selected), **json.loads(tiles)}) for tiles in overrides
    ]
    if args.time:
        for tiles, us in zip(overrides, tune.time_configs(shape, configs, input_sets, build, args.save_activations)):
            print(f"{us:10.1f} us  {tiles}", flush=True)
        return
    config = configs[0]
    step = jax.jit(tune._with_tiles(build, shape, config, args.save_activations))
    print(config)
    inputs = input_sets[0]
    jax.block_until_ready(step(*inputs))
    start, stop = _profiler_range()
    start()
    jax.block_until_ready(step(*inputs))
    stop()


def report(path: str) -> None:
    """Kernel durations of an ncu CSV log, summed by kernel name in order of first launch."""
    with open(path) as f:
        rows = list(csv.DictReader(line for line in f if line.startswith('"')))
    totals: dict[str, float] = collections.defaultdict(float)
    counts: collections.Counter = collections.Counter()
    for row in rows:
        if row["Metric Name"] == "gpu__time_duration.sum":
            us = float(row["Metric Value"].replace(",", "")) * UNIT_US[row["Metric Unit"]]
            totals[row["Kernel Name"]] += us
            counts[row["Kernel Name"]] += 1
    total = sum(totals.values())
    print(f"{'kernel':60s} {'launches':>8s} {'us':>10s} {'share':>6s}")
    for name, us in totals.items():
        print(f"{name[:60]:60s} {counts[name]:8d} {us:10.1f} {us / total:6.1%}")
    print(f"{'total':60s} {sum(counts.values()):8d} {total:10.1f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mixtral-8x7b")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--routing", default="uniform", choices=["uniform", "zipf"], help="router logits")
    parser.add_argument("--save-activations", action="store_true")
    parser.add_argument(
        "--tiles", action="append",
        help="JSON object of TileConfig fields to override (repeat with --time to compare several)",
    )
    parser.add_argument("--time", action="store_true", help="time the call per --tiles instead of profiling")
    parser.add_argument("--report", metavar="CSV", help="summarize an ncu CSV log instead of running")
    args = parser.parse_args(argv)
    if not args.time and not args.report and len(args.tiles or []) > 1:
        parser.error("several --tiles need --time: a profile records one call")
    report(args.report) if args.report else run(args)


if __name__ == "__main__":
    main()
