"""Which tile table serves this GPU best: the layer timed with the tiles each table selects.

    python benchmarks/tile_tables.py --tables default device --models mixtral-8x7b qwen3-30b-a3b \\
        --tokens 1 64 512 4096

A table is a name under ``jax_moe/configs`` (``default``, ``nvidia-h100-80gb-hbm3``, ...), read
with its fallbacks (``tile_configs.table_chain``), or ``device``: the tables this GPU reads
(``tile_configs.device_tables``). For each model and T it times ``fused_moe`` as the tuner does
(``jax_moe.tune``: the family's routing, biases, activation and shared experts; three input sets),
with each table's tiles, all compiled first, and prints one line per case with the times in
microseconds and each table's time over the first's. Prints only; what it has shown is in
benchmarks/README.md ("Tile tables and tuning").
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from jax_moe import arg_specs, tile_configs, timing, tune


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", nargs="+", default=["default", "device"])
    parser.add_argument("--models", nargs="+", default=[m.name for m in arg_specs.MODELS[:4]],
                        choices=[m.name for m in arg_specs.MODELS])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 512, 4096])
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    device_tables = tile_configs.device_tables(device)
    tables = {name: device_tables if name == "device" else name for name in args.tables}
    print(f"{device.device_kind}: device tables {device_tables}", flush=True)
    programs, input_sets = {}, {}
    for shape in (m for m in arg_specs.MODELS if m.name in args.models):
        for num_tokens in args.tokens:
            case = (shape.name, num_tokens)
            input_sets[case] = tune._input_sets(shape, num_tokens, jnp.bfloat16)
            for name, table in tables.items():
                config = tile_configs.select(num_tokens * shape.slots, 2, table, shape.tile_key(jnp.bfloat16))
                programs[(*case, name)] = (tune._with_tiles(tune._layer, shape, config), input_sets[case][0])
    compiled = timing.compile_all(programs, tune.COMPILE_THREADS)
    for case, sets in input_sets.items():
        times = {}
        for name in tables:
            executable = compiled[(*case, name)]
            failed = isinstance(executable, Exception)
            times[name] = float("nan") if failed else timing.median_call_us(executable, sets, calls=10, repeats=5, warmup=2)
        first = times[args.tables[0]]
        columns = "  ".join(f"{name} {us:9.1f} us ({us / first:.3f})" for name, us in times.items())
        print(f"{case[0]:14s} {f'T={case[1]}':7s} {columns}", flush=True)


if __name__ == "__main__":
    main()
