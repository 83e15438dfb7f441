"""Tile configurations, kept as data in ``jax_moe/configs/*.json`` and chosen at trace time."""

from __future__ import annotations

import dataclasses
import functools
import json
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


@functools.cache
def _buckets(table: str) -> tuple[tuple[int | None, TileConfig], ...]:
    text = resources.files("jax_moe").joinpath("configs", f"{table}.json").read_text()
    return tuple(
        (b["max_pairs"], TileConfig.from_dict(b)) for b in json.loads(text)["buckets"]
    )


def _narrow_k(tiles, factor: int):
    return dataclasses.replace(tiles, block_k=max(16, tiles.block_k // factor))


def select(num_pairs: int, operand_bytes: int = 2, table: str = "default") -> TileConfig:
    """The config of the first bucket of ``configs/<table>.json`` that admits ``num_pairs``.

    Configs are written for 2-byte operands; wider operands get proportionally narrower K tiles,
    which keeps every pipeline stage's shared memory (and so the fit on the chip) unchanged.
    """
    for max_pairs, config in _buckets(table):
        if max_pairs is None or num_pairs <= max_pairs:
            factor = max(1, operand_bytes // 2)
            return dataclasses.replace(
                config,
                gate_up=_narrow_k(config.gate_up, factor),
                down=_narrow_k(config.down, factor),
                weight_grad=_narrow_k(config.weight_grad, factor),
            )
    raise ValueError(f"configs/{table}.json has no bucket for {num_pairs} pairs (add a null max_pairs)")
