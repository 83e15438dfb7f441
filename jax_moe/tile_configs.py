"""Tile configurations, kept as data in ``jax_moe/configs/*.json`` and chosen at trace time."""

from __future__ import annotations

import contextlib
import contextvars
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
    of the expert's tokens per step, programs ordered in groups of group_m row tiles.

    Each step loads its rows' token ids before gathering through them, and Triton's pipeliner
    gives that chain two of the num_stages: 5 keeps three tiles of rows in flight (what 3 gives a
    forward GEMM), 3 and 4 only two."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        if self.group_m < 1:
            raise ValueError(f"WeightGradTiles.group_m must be >= 1 (row tiles per group); got {self.group_m}")


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tiles of one layer call. ``block_m`` is shared by dispatch and the row-block GEMMs (gate/up,
    down, and their backward): it is the row padding of every expert's segment. ``group_m`` orders
    their programs: ``group_m`` row blocks at a time, or with 0 each expert's blocks together
    (``kernels._row_block_tile``).

    ``gate_up``: the forward gate/up projections (two accumulators). ``down``: the down projection.
    ``input_grad``: the backward's input gradient, the same kernel and GEMM shape as ``down`` but
    with two terms and transposed weights (more registers: the forward's tiles can spill there).
    ``gate_up_backward``: the backward's recomputed gate/up and ``grad_out @ w_down^T`` (three
    accumulators, so it wants narrower tiles than ``gate_up``). ``down_weight_grad`` (one product)
    and ``gate_up_weight_grad`` (two products sharing the left operand) reduce over each expert's
    rows. ``tma``: the GEMMs over row-major weights (gate/up, down, the backward's recompute) read
    their weight tiles through TMA descriptors where the stack gives them (``pipeline.make_plan``).
    """

    block_m: int
    group_m: int
    gate_up: GemmTiles
    down: GemmTiles
    input_grad: GemmTiles
    gate_up_backward: GemmTiles
    down_weight_grad: WeightGradTiles
    gate_up_weight_grad: WeightGradTiles
    tma: bool = False

    def __post_init__(self):
        if self.group_m < 0:
            raise ValueError(
                f"TileConfig.group_m must be >= 0 (row blocks per group, 0: by expert); got {self.group_m}"
            )

    @classmethod
    def from_dict(cls, d: dict) -> TileConfig:
        gemm_fields = ("gate_up", "down", "input_grad", "gate_up_backward")
        return cls(
            block_m=d["block_m"],
            group_m=d["group_m"],
            **{name: GemmTiles(**d[name]) for name in gemm_fields},
            **{name: WeightGradTiles(**d[name]) for name in ("down_weight_grad", "gate_up_weight_grad")},
            tma=bool(d.get("tma", False)),
        )

    def narrowed_k(self, factor: int) -> TileConfig:
        """The same tiles with K tiles ``factor`` times narrower (for wider operands)."""
        return dataclasses.replace(
            self,
            **{
                f.name: dataclasses.replace(tiles, block_k=max(16, tiles.block_k // factor))
                for f in dataclasses.fields(self)
                if dataclasses.is_dataclass(tiles := getattr(self, f.name))
            },
        )


CONFIG_DIR = resources.files("jax_moe").joinpath("configs")


_FORCED = contextvars.ContextVar("jax_moe_forced_tile_config", default=None)


def shape_key(num_experts: int, hidden: int, intermediate: int, top_k: int, dtype, num_shared: int = 0) -> str:
    """How a tuned table names a layer shape: ``E=8,H=4096,F=14336,k=2,bfloat16``, or with
    ``num_shared`` shared experts ``E=256,H=7168,F=2048,k=8,S=1,bfloat16`` (their rows, T per
    shared expert, change which tiles win)."""
    shared = f"S={num_shared}," if num_shared else ""
    return f"E={num_experts},H={hidden},F={intermediate},k={top_k},{shared}{dtype}"


@contextlib.contextmanager
def use(config: TileConfig):
    """Layers traced inside this context take ``config`` (narrowed for wider operands as
    ``select`` narrows), whatever the tables say: how the tuner and A/B scripts try tiles."""
    if not isinstance(config, TileConfig):
        raise TypeError(f"config must be a TileConfig (e.g. TileConfig.from_dict); got {type(config).__name__}")
    token = _FORCED.set(config)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _parse_buckets(buckets: list[dict]) -> tuple[tuple[int, int | None, TileConfig], ...]:
    return tuple((b.get("min_pairs", 0), b["max_pairs"], TileConfig.from_dict(b)) for b in buckets)


@functools.cache
def _table(name: str) -> dict | None:
    path = CONFIG_DIR.joinpath(f"{name}.json")
    return json.loads(path.read_text()) if path.is_file() else None


def _candidate_buckets(tables: tuple[str, ...], shape: str | None):
    """Bucket lists to try in order: for each table, the shape's tuned entry, then the table's
    own list; the default last."""
    for name in tables:
        data = _table(name)
        if data is None:
            continue
        if shape is not None and shape in data.get("shapes", {}):
            yield _parse_buckets(data["shapes"][shape])
        if "buckets" in data:
            yield _parse_buckets(data["buckets"])
    yield _parse_buckets(_table("default")["buckets"])


def table_chain(table: str) -> tuple[str, ...]:
    """``table`` and the tables its ``"fallback"`` entries name, in order (a cycle ends the chain).
    ``table`` itself need not exist (a GPU nobody tuned); a fallback that names no table is an
    error, not a silent stop at the defaults."""
    if not isinstance(table, str):
        raise TypeError(f"table: expected a table name (str), got {type(table).__name__}")
    chain = [table]
    data = _table(table)
    while data is not None and (fallback := data.get("fallback")) is not None and fallback not in chain:
        data = _table(fallback)
        if data is None:
            raise ValueError(f"configs/{chain[-1]}.json: its fallback {fallback!r} names no table in configs/")
        chain.append(fallback)
    return tuple(chain)


def device_tables(device) -> tuple[str, ...]:
    """The tables a GPU (a ``jax.Device``) reads, most specific first: its own, named by its
    ``device_kind`` (``gpu_table_name``), and the one of its architecture, ``cuda-sm<major><minor>``
    (``cuda-sm90`` for compute capability ``9.0``), each with its fallbacks (``table_chain``).

    A Hopper card nobody tuned (an H100 PCIe, an H200) thus takes the tiles tuned on another
    Hopper card, which shares its SMs, instead of the untuned defaults (``benchmarks/tile_tables.py``
    measures the difference), and its own table needs to hold only what it tuned."""
    if not isinstance(getattr(device, "device_kind", None), str):
        raise TypeError(f"device: expected a jax.Device (with a device_kind), got {type(device).__name__}")
    names = [gpu_table_name(device.device_kind)]
    if compute_capability := getattr(device, "compute_capability", None):
        names.append("cuda-sm" + compute_capability.replace(".", ""))
    chain = []
    for name in names:
        chain += [t for t in table_chain(name) if t not in chain]
    return tuple(chain)


def select(
    num_pairs: int, operand_bytes: int = 2, table: str | tuple[str, ...] = "default", shape: str | None = None
) -> TileConfig:
    """The config for ``num_pairs`` (tokens * top_k) from ``configs/<table>.json``.

    A table (one per GPU, named by ``gpu_table_name``) may hold tuned buckets per layer ``shape``
    (see ``shape_key``) and a table-wide list. ``table`` may also be several tables to read in
    turn (``device_tables``); a single name reads its ``table_chain``. Anything they lack falls
    back to ``default.json``.
    The first bucket with ``min_pairs <= num_pairs <= max_pairs`` wins (``min_pairs`` defaults to
    0, a null ``max_pairs`` admits all): a tuned entry claims only the token counts it measured.

    Configs are written for 2-byte operands; wider operands get proportionally narrower K tiles,
    which keeps every pipeline stage's shared memory (and so the fit on the chip) unchanged.
    Inside ``use(config)`` that config is returned instead.
    """
    if (forced := _FORCED.get()) is not None:
        return forced.narrowed_k(max(1, operand_bytes // 2))
    tables = table_chain(table) if isinstance(table, str) else tuple(table)
    if not tables or not all(isinstance(name, str) for name in tables):
        raise TypeError(f"table: expected a table name or a non-empty tuple of them, got {table!r}")
    for buckets in _candidate_buckets(tables, shape):
        for min_pairs, max_pairs, config in buckets:
            if min_pairs <= num_pairs and (max_pairs is None or num_pairs <= max_pairs):
                return config.narrowed_k(max(1, operand_bytes // 2))
    raise ValueError(f"configs/default.json has no bucket for {num_pairs} pairs (it needs a null max_pairs)")


def gpu_table_name(device_kind: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-")
