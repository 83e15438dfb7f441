"""One MoE layer in each multi-device layout on the devices present: weak scaling against one device.

    python benchmarks/parallel_bench.py [--model deepseek-v3] [--tokens 4096] [--layouts data expert ...]
        [--exchanges all_gather all_to_all]

A layout names the mesh axes it uses (``data``, ``expert``, ``tensor``, joined by ``,``). On n
devices an axis of its own takes all n; in a combination ``tensor`` takes 2 devices, ``expert`` 2
beside ``data``, and the first of ``data`` and ``expert`` the rest. Tokens are split over the data and expert axes, experts over the
expert axis, the intermediate dim F over the tensor axis (``jax_moe.sharding`` reads that layout
from the arguments' shardings). Each device holds ``--tokens`` tokens (weak scaling) and its share
of the weights. A layout with an expert axis runs once per ``--exchanges`` entry
(``jax_moe.sharding.EXPERT_EXCHANGES``). Per layout and exchange:

- ``time_us``: the sharded layer under ``jax.jit``;
- ``one_device_us``: the same per-device work on one device: ``--tokens`` tokens with the weights
  one device holds (E / expert experts, F / tensor columns), each token routed to ``top_k`` of them;
- ``efficiency = one_device_us / time_us`` (1.00: the layout costs nothing beyond a device's share);
- ``comm_us``: the layout's collectives alone on the same arrays: with ``all_gather``, the expert
  axis's all-gather of the tokens and their routing and reduce-scatter of the outputs; with
  ``all_to_all``, the two ragged all-to-alls of ``top_k`` rows per token, as a uniform routing
  sends them; and the tensor axis's sum.

bf16, plain top-k softmax routing (the model's shape; its routing family plays no part in the
layout). Writes results/<gpu>-parallel.json and .md; ``--tag NAME`` appends ``-NAME``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jax_moe
from jax_moe import arg_specs, sharding

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import common  # noqa: E402

DEFAULT_LAYOUTS = ("data", "expert", "tensor", "data,expert", "expert,tensor", "data,expert,tensor")
AXES = ("data", "expert", "tensor")
PARITY_TOKENS = 64
COLUMNS = ["layout", "exchange", "mesh", "tokens_per_device", "time_us", "one_device_us", "efficiency", "comm_us", "rel_err"]


def mesh_shape(layout: tuple[str, ...], num_devices: int) -> dict[str, int]:
    """Devices per axis: a lone axis takes them all; in a combination the tensor axis takes 2, the
    expert axis 2 beside a data axis, and the first of data and expert the rest."""
    if len(layout) == 1:
        return {layout[0]: num_devices}
    sizes = {"tensor": 2} if "tensor" in layout else {}
    if "data" in layout and "expert" in layout:
        sizes["expert"] = 2
    rest_axis = "data" if "data" in layout else "expert"
    sizes[rest_axis] = num_devices // math.prod(sizes.values())
    if math.prod(sizes.values()) != num_devices or min(sizes.values()) < 1:
        raise ValueError(f"layout {','.join(layout)} does not fit {num_devices} devices")
    return {axis: sizes[axis] for axis in AXES if axis in sizes}


def _specs(axes: dict[str, int]) -> dict:
    token_axes = tuple(a for a in ("data", "expert") if a in axes) or None
    expert = "expert" if "expert" in axes else None
    tensor = "tensor" if "tensor" in axes else None
    return dict(
        hidden_states=P(token_axes, None), router_logits=P(token_axes, None),
        w_gate=P(expert, None, tensor), w_up=P(expert, None, tensor), w_down=P(expert, tensor, None),
    )


def _layer(top_k: int, backend: str, exchange: str = "all_gather"):
    return jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=top_k, backend=backend, expert_exchange=exchange))


def _collectives(layout: sharding.Layout, mesh, specs: dict, top_k: int):
    """The layout's collectives alone, on arrays of the layer's shapes: gather the tokens and
    their routing over the gathered axes and reduce-scatter them back, or exchange ``top_k`` rows
    per token both ways over the expert axes; sum over the summed axes."""

    def body(x, logits):
        if layout.exchange == "all_to_all" and layout.expert:
            peers = layout.size(layout.expert)
            rows = jnp.repeat(x, top_k, axis=0)
            sizes = jnp.full((peers,), rows.shape[0] // peers, jnp.int32)
            offsets = jnp.arange(peers, dtype=jnp.int32) * sizes[0]  # where each peer's rows lie here
            # Each receiver keeps the senders' rows in rank order: this device's land at its rank's place.
            places = jnp.full((peers,), jax.lax.axis_index(layout.expert) * sizes[0], jnp.int32)
            for _ in range(2):  # there and back
                rows = jax.lax.ragged_all_to_all(
                    rows, jnp.zeros_like(rows), offsets, sizes, places, sizes, axis_name=layout.expert
                )
            x = rows[: x.shape[0]]
        elif layout.gathered:
            x = jax.lax.all_gather(x, layout.gathered, axis=0, tiled=True)
            logits = jax.lax.all_gather(logits, layout.gathered, axis=0, tiled=True)
            x = jax.lax.psum_scatter(x, layout.gathered, scatter_dimension=0, tiled=True)
        if layout.summed:
            x = jax.lax.psum(x, layout.summed)
        return x, logits

    token_spec = specs["hidden_states"]
    # The gathered routing is the same on every device of the gathered axes: returned whole.
    return jax.jit(jax.shard_map(
        body, mesh=mesh, in_specs=(token_spec, token_spec), out_specs=(token_spec, P()), check_vma=False
    ))


def run_layout(shape: arg_specs.MoeShape, layout: tuple[str, ...], tokens: int, backend: str, devices,
               exchange: str = "all_gather") -> dict:
    axes = mesh_shape(layout, len(devices))
    mesh = jax.make_mesh(tuple(axes.values()), tuple(axes), devices=devices)
    token_parts = math.prod(axes.get(a, 1) for a in ("data", "expert"))
    experts, tensor = axes.get("expert", 1), axes.get("tensor", 1)
    row = {"layout": ",".join(layout), "exchange": exchange if "expert" in axes else "",
           "mesh": "x".join(f"{a}={n}" for a, n in axes.items()), "tokens_per_device": tokens}
    if exchange == "all_to_all" and "expert" in axes and not sharding.ragged_all_to_all_available():
        row["skipped"] = f"no ragged all-to-all on {jax.default_backend()}"
        return row
    if shape.num_experts % experts or shape.intermediate % tensor or shape.top_k > shape.num_experts // experts:
        row["skipped"] = f"E={shape.num_experts}, F={shape.intermediate}, top_k={shape.top_k} don't split {axes}"
        return row
    specs = _specs(axes)
    inputs = arg_specs.random_inputs(shape, tokens * token_parts, jnp.bfloat16, jax.random.key(0))
    arrays = dict(zip(specs, inputs.as_args()))
    placed = [jax.device_put(a, NamedSharding(mesh, specs[name])) for name, a in arrays.items()]
    layer = _layer(shape.top_k, backend, exchange)
    out = layer(*placed)
    # Tokens are independent: the dense reference checks a sample of them on one device.
    x, logits, *weights = inputs.as_args()
    reference = _layer(shape.top_k, "reference")(x[:PARITY_TOKENS], logits[:PARITY_TOKENS], *weights)
    row["rel_err"] = common.rel_error(out[:PARITY_TOKENS], reference)
    row["time_us"] = common.time_route(layer, [tuple(placed)])
    # The same per-device work on one device: its tokens, its experts and columns.
    local = dataclasses.replace(
        shape, num_experts=shape.num_experts // experts, intermediate=shape.intermediate // tensor,
        name=f"{shape.name}/device",
    )
    one = arg_specs.random_inputs(local, tokens, jnp.bfloat16, jax.random.key(1)).as_args()
    one = [jax.device_put(a, devices[0]) for a in one]
    row["one_device_us"] = common.time_route(_layer(shape.top_k, backend), [tuple(one)])
    row["efficiency"] = row["one_device_us"] / row["time_us"]
    found = sharding.layout_of(
        placed[0], placed[1:2], jax_moe.ExpertWeights(*placed[2:]), backend=backend, exchange=exchange
    )
    if found is not None and (found.gathered or found.summed):
        row["comm_us"] = common.time_route(_collectives(found, mesh, specs, shape.top_k), [(placed[0], placed[1])])
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v3", choices=[m.name for m in arg_specs.MODELS])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per device")
    parser.add_argument("--layouts", nargs="+", default=DEFAULT_LAYOUTS)
    parser.add_argument("--exchanges", nargs="+", default=sharding.EXPERT_EXCHANGES, choices=sharding.EXPERT_EXCHANGES)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    model = next(m for m in arg_specs.MODELS if m.name == args.model)
    shape = arg_specs.MoeShape(model.name, model.num_experts, jax_moe.Routing(model.top_k), model.hidden, model.intermediate)
    devices = jax.devices()
    head = common.header(common.measure_read_bandwidth(), common.measure_gemm_rate()) | {"devices": len(devices)}
    print(head)
    rows = []
    for layout in args.layouts:
        for exchange in args.exchanges if "expert" in layout.split(",") else args.exchanges[:1]:
            try:
                rows.append(run_layout(shape, tuple(layout.split(",")), args.tokens, args.backend, devices, exchange))
            except Exception as e:  # e.g. out of memory: the other layouts still run
                rows.append({"layout": layout, "exchange": exchange, "tokens_per_device": args.tokens,
                             "skipped": f"{type(e).__name__}: {str(e)[:160]}"})
    common.print_table(rows, COLUMNS + ["skipped"])
    path = common.write(common.results_name("parallel", tag=args.tag), head, rows, COLUMNS + ["skipped"])
    print(f"wrote {path} and .md")


if __name__ == "__main__":
    main()
