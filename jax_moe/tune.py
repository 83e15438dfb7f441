"""Sweep tile configs for layer shapes on the current GPU and write ``configs/<gpu>.json``.

    python -m jax_moe.tune --models mixtral-8x7b qwen3-30b-a3b --tokens 1 16 64 512 4096

For each model and token count T it times the layer as its users run it (``fused_moe`` with the
family's routing, biases, activation and shared experts; random router logits) over a small
candidate grid: every row-block size that suits T with every gate/up candidate (down tiles as
the table has them), then every down candidate with each row-block size's best, then the
winner's other program order (``group_m`` 0 or 8). Each grid is compiled first, several programs
at a time, then timed one program after another. A winner other than the table's tiles then has
to beat them again, timed longer, in each of two interleaved rounds, or the table's tiles stay.
The winners become buckets of that shape's entry (``MoeShape.tile_key``: shared experts are part
of the shape), split at the geometric midpoints between the tuned token counts, claiming nothing
below half the smallest or above twice the largest; neighbouring buckets with the same tiles
merge. The file keeps entries it already had for other shapes, and this shape's buckets that
hold none of the tuned counts, so decode and prefill sizes can be tuned apart. It is written
after every tuned T: a run stopped part way leaves the old tiles where it did not get to.

    python -m jax_moe.tune --models mixtral-8x7b --tokens 1 8 32 128

``jax_moe`` picks the file up by the GPU's name at trace time, and reads the table of the GPU's
architecture after it (``tile_configs.device_tables``: a Hopper card falls back to the H100's
tuned tiles), so a new card's file need hold only the shapes and token counts tuned on it; the
"table's tiles" each line reports are what that lookup gave before. A bucket's tiles are measured
at its own T only: tune the token counts you serve (small row blocks chosen for few tokens per
expert lose where an expert's rows span several blocks, each of which streams its weights).

``--backward`` also sweeps the backward's tiles (``gate_up_backward``, ``input_grad``,
``down_weight_grad``, ``gate_up_weight_grad``, one after the other), timing forward + backward;
with ``--keep-forward`` it only does that, updating the existing buckets that hold each T:

    python -m jax_moe.tune --models mixtral-8x7b --tokens 8192 --backward --keep-forward
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import statistics

import jax
import jax.numpy as jnp
import triton

import jax_moe
from jax_moe import arg_specs, backend_triton, timing, tile_configs
from jax_moe.tile_configs import GemmTiles, TileConfig, WeightGradTiles

COMPILE_THREADS = min(16, os.cpu_count() or 1)
# Program orders of the row-block kernels. The sweep runs each expert's blocks together (0,
# kernels._row_block_tile): where an expert's rows span several blocks (large T, or skewed routing
# at small T) the programs that read the same weight tile run at once and share it in L2, and
# decode streams one weight matrix after another. The winner is also timed with 8 row blocks at a
# time, whoever's they are.
GROUP_M_CANDIDATES = (0, 8)
# Interleaved rounds of the sweep's winner against the table's tiles (``_confirmed``).
CONFIRM_ROUNDS = 2

# Decode streams weights: the narrow 4-warp tiles make more, smaller programs (an even last wave)
# and the deep K tiles keep more bytes in flight per program; 8 warps at 4 stages do the latter
# for mid-size T. The larger prefill tiles run one program per SM, so an epilogue runs with no
# loads in flight on its SM; the 8-warp 64 x 64 x 3 tile fits two for gate/up and three for the
# down projection at 128-row blocks (kernel_resources.py, sm_90).
GEMM_CANDIDATES = (
    GemmTiles(block_n=64, block_k=128, num_warps=4, num_stages=4),
    GemmTiles(block_n=32, block_k=128, num_warps=4, num_stages=4),
    GemmTiles(block_n=64, block_k=256, num_warps=4, num_stages=3),
    GemmTiles(block_n=128, block_k=64, num_warps=4, num_stages=4),
    GemmTiles(block_n=128, block_k=64, num_warps=8, num_stages=3),
    GemmTiles(block_n=128, block_k=64, num_warps=8, num_stages=4),
    GemmTiles(block_n=64, block_k=64, num_warps=4, num_stages=5),
    GemmTiles(block_n=128, block_k=128, num_warps=8, num_stages=3),
    GemmTiles(block_n=32, block_k=256, num_warps=4, num_stages=3),
    GemmTiles(block_n=64, block_k=64, num_warps=8, num_stages=3),
)
# The kernels with one accumulator (down projection, input gradient; N = H is wide) also try the
# 128 x 256 tile of Hopper GEMMs, too big for gate/up's two accumulators.
DOWN_CANDIDATES = GEMM_CANDIDATES + (GemmTiles(block_n=256, block_k=64, num_warps=8, num_stages=3),)
BLOCK_M_CANDIDATES = (16, 32, 64, 128)
# Three fp32 accumulators: narrower tiles than the forward's keep them out of local memory.
GATE_UP_BACKWARD_CANDIDATES = (
    GemmTiles(block_n=64, block_k=64, num_warps=8, num_stages=4),
    GemmTiles(block_n=64, block_k=128, num_warps=8, num_stages=3),
    GemmTiles(block_n=128, block_k=64, num_warps=8, num_stages=3),
    GemmTiles(block_n=64, block_k=64, num_warps=4, num_stages=4),
    GemmTiles(block_n=32, block_k=128, num_warps=4, num_stages=4),
)
# num_stages 5 and 7: the token-id load takes two stages (see WeightGradTiles). 128 x 256 fits
# the single down-projection gradient only; the gate/up one exceeds shared memory and is skipped.
WEIGHT_GRAD_CANDIDATES = (
    WeightGradTiles(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3),
    WeightGradTiles(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=5),
    WeightGradTiles(block_m=128, block_n=128, block_k=64, group_m=16, num_warps=8, num_stages=5),
    WeightGradTiles(block_m=128, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=7),
    WeightGradTiles(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=5),
    WeightGradTiles(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=5),
    WeightGradTiles(block_m=128, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=5),
)
BACKWARD_SWEEP = (
    ("gate_up_backward", GATE_UP_BACKWARD_CANDIDATES),
    ("input_grad", DOWN_CANDIDATES),
    ("down_weight_grad", WEIGHT_GRAD_CANDIDATES),
    ("gate_up_weight_grad", WEIGHT_GRAD_CANDIDATES),
)
BACKWARD_FIELDS = tuple(field for field, _ in BACKWARD_SWEEP)


def _block_m_candidates(num_pairs: int, num_experts: int):
    rows_per_expert = num_pairs / min(num_experts, num_pairs)
    limit = max(16, 2 * triton.next_power_of_2(math.ceil(rows_per_expert)))
    return [m for m in BLOCK_M_CANDIDATES if m <= limit]


def _layer(shape: arg_specs.MoeShape, save_activations: bool = False):
    """The model's layer as its users run it: ``fused_moe`` with the family's routing, biases,
    activation and shared experts (``extras``), on the triton backend."""
    options = {**shape.static_options(), "save_activations": save_activations}

    def layer(x, logits, w_gate, w_up, w_down, extras):
        return jax_moe.fused_moe(x, logits, w_gate, w_up, w_down, **extras, **options, backend="triton")

    return layer


def _train_step(shape: arg_specs.MoeShape, save_activations: bool = False):
    """Forward and backward: <layer(x), cotangent> and its gradients (``timing.train_step``)."""
    layer = _layer(shape, save_activations)

    def loss(x, logits, w_gate, w_up, w_down, cotangent, extras):
        return jnp.sum(layer(x, logits, w_gate, w_up, w_down, extras).astype(jnp.float32) * cotangent)

    return timing.train_step(loss)


def _with_tiles(build, shape, config: TileConfig, save_activations: bool = False):
    """``build(shape)``'s function, traced with ``config``'s tiles. A new function per config:
    a jitted function shared between configs would keep the tiles of its first trace."""
    fn = build(shape, save_activations)

    def with_tiles(*args):
        with tile_configs.use(config):
            return fn(*args)

    return with_tiles


def time_configs(
    shape, configs, input_sets, build=_layer, save_activations: bool = False, threads: int = COMPILE_THREADS,
    calls: int = 10, repeats: int = 3,
) -> list[float]:
    """Microseconds per call of ``build(shape)`` with each config (inf where it fails to compile
    or run); all are compiled first, several at a time (a config listed more than once, once),
    then timed one after another, in the order given (``timing.median_call_us`` with ``calls``
    and ``repeats``)."""
    programs = {c: (_with_tiles(build, shape, c, save_activations), input_sets[0]) for c in dict.fromkeys(configs)}
    compiled = timing.compile_all(programs, threads)
    times = []
    for config in configs:
        try:
            if isinstance(compiled[config], Exception):
                raise compiled[config]
            times.append(timing.median_call_us(compiled[config], input_sets, calls=calls, repeats=repeats, warmup=1))
        except Exception as e:  # a config the compiler or the chip refuses (shared memory, registers)
            print(f"    skipped {config}: {type(e).__name__}: {str(e)[:100]}")
            times.append(math.inf)
    return times


def _input_sets(shape, num_tokens: int, dtype, with_cotangent: bool = False, routing: str = "uniform"):
    """Three argument sets of ``build(shape)`` at T = ``num_tokens`` (``arg_specs.input_sets``)."""
    weights_key, key = jax.random.split(jax.random.key(num_tokens))
    weights = arg_specs.random_inputs(shape, 1, dtype, weights_key)
    return arg_specs.input_sets(shape, weights, num_tokens, key, routing=routing, with_cotangent=with_cotangent)


def _best(configs, times):
    i = min(range(len(configs)), key=times.__getitem__)
    return configs[i], times[i]


def tune_backward(shape, num_tokens: int, dtype, config: TileConfig) -> TileConfig:
    """The backward's tiles that make the forward + backward step fastest, the forward's fixed."""
    input_sets = _input_sets(shape, num_tokens, dtype, with_cotangent=True)
    (start_us,) = time_configs(shape, [config], input_sets, _train_step)
    best, best_us = config, start_us
    for field, candidates in BACKWARD_SWEEP:
        configs = [dataclasses.replace(best, **{field: tiles}) for tiles in candidates]
        times = time_configs(shape, configs, input_sets, _train_step)
        for tiles, us in zip(candidates, times):
            print(f"    {field} {tiles}: {us:.1f} us")
        if min(times) < best_us:
            best, best_us = _best(configs, times)
    chosen = {field: getattr(best, field) for field in BACKWARD_FIELDS}
    print(f"  {shape.name} T={num_tokens} forward+backward: {best_us:.1f} us (was {start_us:.1f} us): {chosen}")
    return best


def tune_one(shape, num_tokens: int, dtype) -> tuple[TileConfig, float]:
    """The forward's tiles: every row-block size that suits T with every gate/up candidate (the
    down tiles as selected now), then, for each row-block size's best, every down candidate (the
    best down tiles differ between row-block sizes)."""
    input_sets = _input_sets(shape, num_tokens, dtype)
    pairs = num_tokens * shape.slots
    base = tile_configs.select(
        pairs, jnp.dtype(dtype).itemsize, tile_configs.device_tables(jax.devices()[0]), shape.tile_key(dtype)
    )
    block_ms = _block_m_candidates(pairs, shape.num_experts + shape.num_shared)
    configs = [base] + [
        dataclasses.replace(base, block_m=block_m, group_m=GROUP_M_CANDIDATES[0], gate_up=tiles)
        for block_m in block_ms
        for tiles in GEMM_CANDIDATES
    ]
    times = time_configs(shape, configs, input_sets)
    base_us = times[0]
    best_per_block_m = [
        _best(*zip(*[(c, t) for c, t in zip(configs, times) if c.block_m == block_m])) for block_m in block_ms
    ]
    configs = [dataclasses.replace(c, down=tiles) for c, _ in best_per_block_m for tiles in DOWN_CANDIDATES]
    times = time_configs(shape, configs, input_sets)
    finalists = [(base, base_us), *best_per_block_m, *zip(configs, times)]
    best, best_us = _best(*zip(*finalists))
    orders = [dataclasses.replace(best, group_m=g) for g in GROUP_M_CANDIDATES if g != best.group_m]
    finalists = [(best, best_us), *zip(orders, time_configs(shape, orders, input_sets))]
    best, best_us = _best(*zip(*finalists))
    if best != base:
        best, best_us, base_us = _confirmed(shape, base, best, input_sets)
    print(f"  {shape.name} T={num_tokens}: {best_us:.1f} us (table's tiles {base_us:.1f} us): {best}")
    return best, best_us


def _confirmed(shape, base: TileConfig, best: TileConfig, input_sets) -> tuple[TileConfig, float, float]:
    """The sweep's winner if it beats the table's tiles in each of CONFIRM_ROUNDS interleaved,
    longer timings, else the table's tiles; with both times (the medians over the rounds).

    The sweep times each of ~50 configs briefly and keeps the fastest, so a config that only
    drew a quick sample can win a sweep by a percent and lose to the table's tiles side by side."""
    times = time_configs(shape, [base, best] * CONFIRM_ROUNDS, input_sets, calls=20, repeats=7)
    base_times, best_times = times[0::2], times[1::2]
    base_us, best_us = statistics.median(base_times), statistics.median(best_times)
    if all(b < a for a, b in zip(base_times, best_times)):
        return best, best_us, base_us
    print(f"    the sweep's winner did not confirm ({best_us:.1f} us against {base_us:.1f}): {best}")
    return base, base_us, base_us


def _bucket(min_pairs: int, max_pairs: int | None, config: TileConfig) -> dict:
    return {"min_pairs": min_pairs, "max_pairs": max_pairs, **dataclasses.asdict(config)}


def _pair_range(bucket: dict) -> tuple[int, float]:
    return bucket.get("min_pairs") or 0, math.inf if bucket["max_pairs"] is None else bucket["max_pairs"]


def _with_range(bucket: dict, lo: int, hi: float) -> dict:
    return {**bucket, "min_pairs": lo, "max_pairs": None if hi == math.inf else hi}


def _merge_buckets(old: list[dict], tuned: list[tuple[int, dict]]) -> list[dict]:
    """``old`` buckets that hold none of the tuned pair counts; each ``(pairs, bucket)`` of
    ``tuned`` cut back to the part of its range around ``pairs`` that no kept bucket claims; and
    the parts of the other old buckets that no tuned bucket claims then (a run stopped before
    its larger token counts leaves their old tiles in place); neighbours with the same tiles
    merged."""
    holds_tuned = [any(lo <= p <= hi for p, _ in tuned) for lo, hi in map(_pair_range, old)]
    kept = [b for b, held in zip(old, holds_tuned) if not held]
    merged = list(kept)
    claimed = []
    for pairs, bucket in tuned:
        lo, hi = _pair_range(bucket)
        for kept_lo, kept_hi in map(_pair_range, kept):
            if kept_hi < pairs:
                lo = max(lo, kept_hi + 1)
            elif kept_lo > pairs:
                hi = min(hi, kept_lo - 1)
        merged.append(_with_range(bucket, lo, hi))
        claimed.append((lo, hi))
    for bucket in (b for b, held in zip(old, holds_tuned) if held):
        lo, hi = _pair_range(bucket)
        for claimed_lo, claimed_hi in sorted(claimed):
            if claimed_lo > lo and lo <= hi:
                merged.append(_with_range(bucket, lo, min(hi, claimed_lo - 1)))
            lo = max(lo, claimed_hi + 1)
        if lo <= hi and lo < math.inf:
            merged.append(_with_range(bucket, lo, hi))
    return _coalesced(sorted(merged, key=lambda b: b.get("min_pairs") or 0))


def _coalesced(buckets: list[dict]) -> list[dict]:
    """Sorted ``buckets`` with each run of neighbours that have the same tiles and touching
    ranges made one bucket (a tuned count whose winner is the tiles it had would otherwise split
    their bucket in two, and each such run would split it again)."""
    def tiles(bucket):
        return {k: v for k, v in bucket.items() if k not in ("min_pairs", "max_pairs")}

    out = []
    for bucket in buckets:
        lo, hi = _pair_range(bucket)
        if out and tiles(out[-1]) == tiles(bucket) and _pair_range(out[-1])[1] + 1 == lo:
            out[-1] = _with_range(out[-1], _pair_range(out[-1])[0], hi)
        else:
            out.append(bucket)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, choices=[m.name for m in arg_specs.MODELS])
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 16, 64, 512, 4096])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--output", type=pathlib.Path, help="default: jax_moe/configs/<gpu>.json")
    parser.add_argument("--backward", action="store_true", help="also tune the backward's tiles (training)")
    parser.add_argument(
        "--keep-forward", action="store_true",
        help="with --backward: keep the table's forward tiles and only update the backward's "
        "tiles of the buckets holding each T",
    )
    args = parser.parse_args(argv)
    reason = backend_triton.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"tuning needs the triton backend: {reason}")
    gpu = jax.devices()[0].device_kind
    output = args.output or pathlib.Path(__file__).parent / "configs" / f"{tile_configs.gpu_table_name(gpu)}.json"
    table = json.loads(output.read_text()) if output.is_file() else {}
    table["about"] = f"Tile configs tuned on {gpu} by `python -m jax_moe.tune`; see tile_configs.select."
    shapes = table.setdefault("shapes", {})
    tokens = sorted(args.tokens)
    for shape in arg_specs.MODELS:
        if shape.name not in args.models:
            continue
        key = shape.tile_key(args.dtype)
        if args.keep_forward:
            if key not in shapes:
                raise SystemExit(f"--keep-forward: {output} has no entry for {key}; tune its forward first")
            for num_tokens in tokens:
                pairs = num_tokens * shape.slots
                bucket = next(b for b in shapes[key] if (b["min_pairs"] or 0) <= pairs <= (b["max_pairs"] or math.inf))
                tuned = tune_backward(shape, num_tokens, jnp.dtype(args.dtype), TileConfig.from_dict(bucket))
                bucket.update({field: dataclasses.asdict(getattr(tuned, field)) for field in BACKWARD_FIELDS})
            output.write_text(json.dumps(table, indent=1) + "\n")
            print(f"wrote the backward tiles of {key} to {output}")
            continue
        old_buckets = shapes.get(key, [])
        tuned = []
        # Each tuned T claims the pairs up to the geometric midpoint with the next; the first
        # claims down to half its own and the last up to twice its own, so the counts around the
        # run keep the tiles they had: this file's, or its fallback tables' (decode-sized row
        # blocks must not claim prefill token counts).
        lower = tokens[0] * shape.slots // 2
        for i, num_tokens in enumerate(tokens):
            config, _ = tune_one(shape, num_tokens, jnp.dtype(args.dtype))
            if args.backward:
                config = tune_backward(shape, num_tokens, jnp.dtype(args.dtype), config)
            last = i + 1 == len(tokens)
            upper = (2 * num_tokens if last else int(math.sqrt(num_tokens * tokens[i + 1]))) * shape.slots
            tuned.append((num_tokens * shape.slots, _bucket(lower, upper, config)))
            lower = upper + 1
            # Written after every T: a run stopped part way keeps what it measured.
            shapes[key] = _merge_buckets(old_buckets, tuned)
            output.write_text(json.dumps(table, indent=1) + "\n")
            print(f"wrote {key} T={num_tokens} to {output}")


if __name__ == "__main__":
    main()
