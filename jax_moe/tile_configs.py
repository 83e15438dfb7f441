"""Tile configurations, kept as data in ``jax_moe/configs/*.json`` and chosen at trace time."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from importlib import resources


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class WeightGradTiles:
    """Tiles of the per-expert weight gradients: [block_m, block_n] of a gradient, block_k rows
    of the expert's tokens per step."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles of one layer call. ``block_m`` is shared by dispatch and the row-block GEMMs (gate/up,
    down, and their backward): it is the row padding of every expert's segment."""

    block_m: int
    group_m: int
    gate_up: GemmTiles
    down: GemmTiles
    weight_grad: WeightGradTiles

    @classmethod
    def from_dict(cls, d: dict) -> TileConfig:
        return cls(
            block_m=d["block_m"],
            group_m=d["group_m"],
            gate_up=GemmTiles(**d["gate_up"]),
            down=GemmTiles(**d["down"]),
            weight_grad=WeightGradTiles(**d["weight_grad"]),
        )


CONFIG_DIR = resources.files("jax_moe").joinpath("configs")


def shape_key(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype) -> str:
    """How a tuned table names a layer shape, e.g. ``E=8,H=4096,F=14336,k=2,bfloat16``."""
    return f"E={num_experts},H={hidden},F={intermediate},k={top_k},{dtype}"


def _parse_buckets(buckets: list[dict]) -> tuple[tuple[int, int | None, TileConfig], ...]:
    return tuple((b.get("min_pairs", 0), b["max_pairs"], TileConfig.from_dict(b)) for b in buckets)


@functools.cache
def _table(name: str) -> dict | None:
    path = CONFIG_DIR.joinpath(f"{name}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def _candidate_buckets(table: str, shape: str | None):
    """Bucket lists to try in order: the shape's tuned entry, the table's own, then the default."""
    data = _table(table)
    if data is not None:
        if shape is not None and shape in data.get("shapes", {}):
            yield _parse_buckets(data["shapes"][shape])
        if "buckets" in data:
            yield _parse_buckets(data["buckets"])
    yield _parse_buckets(_table("default")["buckets"])


def _narrow_k(tiles, factor: int):
    return dataclasses.replace(tiles, block_k=max(16, tiles.block_k // factor))


def select(num_pairs: int, operand_bytes: int = 2, table: str = "default", shape: str | None = None) -> TileConfig:
    """The config for ``num_pairs`` (tokens * top_k) from ``configs/<table>.json``.

    A table (one per GPU, named by ``gpu_table_name``) may hold tuned buckets per layer ``shape``
    (see ``shape_key``) and a table-wide list; anything it lacks falls back to ``default.json``.
    The first bucket with ``min_pairs <= num_pairs <= max_pairs`` wins (``min_pairs`` defaults to
    0, a null ``max_pairs`` admits all): a tuned entry claims only the token counts it measured.

    Configs are written for 2-byte operands; wider operands get proportionally narrower K tiles,
    which keeps every pipeline stage's shared memory (and so the fit on the chip) unchanged.
    """
    for buckets in _candidate_buckets(table, shape):
        for min_pairs, max_pairs, config in buckets:
            if min_pairs <= num_pairs and (max_pairs is None or num_pairs <= max_pairs):
                factor = max(1, operand_bytes // 2)
                return dataclasses.replace(
                    config,
                    gate_up=_narrow_k(config.gate_up, factor),
                    down=_narrow_k(config.down, factor),
                    weight_grad=_narrow_k(config.weight_grad, factor),
                )
    raise ValueError(f"configs/default.json has no bucket for {num_pairs} pairs (it needs a null max_pairs)")


def gpu_table_name(device_kind: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
