"""Tile configs as data: lookup order, buckets, dtype adjustment."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import pytest

import jax_moe
from jax_moe import arg_specs, pipeline, tile_configs
from jax_moe.options import Routing

SHAPE = "E=8,H=64,F=96,k=2,bfloat16"


def _bucket(max_pairs, block_m):
    gemm = {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    grad = {"block_m": 64, "block_n": 64, "block_k": 32, "group_m": 8, "num_warps": 4, "num_stages": 3}
    return {
        "max_pairs": max_pairs, "block_m": block_m, "group_m": 1, "gate_up": gemm, "down": gemm,
        "input_grad": gemm, "gate_up_backward": gemm, "down_weight_grad": grad, "gate_up_weight_grad": grad,
    }


@pytest.fixture
def tables(monkeypatch):
    real = tile_configs._table
    fake = {
        "my-gpu": {"shapes": {SHAPE: [_bucket(8, 16), _bucket(None, 128)]}, "buckets": [_bucket(None, 32)]},
        "gpu-without-buckets": {"shapes": {SHAPE: [_bucket(4, 16)]}},
    }
    monkeypatch.setattr(tile_configs, "_table", lambda name: fake[name] if name in fake else real(name))


def test_tuned_shape_first_then_table_then_default(tables):
    assert tile_configs.select(8, table="my-gpu", shape=SHAPE).block_m == 16
    assert tile_configs.select(9, table="my-gpu", shape=SHAPE).block_m == 128
    assert tile_configs.select(9, table="my-gpu", shape="E=3,H=1,F=1,k=1,bfloat16").block_m == 32
    default = tile_configs.select(5, table="default")
    # A shape entry whose buckets stop short falls through to default.json.
    assert tile_configs.select(5, table="gpu-without-buckets", shape=SHAPE) == default
    assert tile_configs.select(5, table="no-such-gpu", shape=SHAPE) == default


def test_wider_operands_get_narrower_k_tiles():
    narrow = tile_configs.select(10_000, operand_bytes=4)
    wide = tile_configs.select(10_000, operand_bytes=2)
    for field in ("gate_up", "down", "input_grad", "gate_up_backward", "down_weight_grad", "gate_up_weight_grad"):
        assert getattr(narrow, field).block_k == getattr(wide, field).block_k // 2, field
    assert narrow.gate_up.block_n == wide.gate_up.block_n
    assert narrow.down_weight_grad.block_m == wide.down_weight_grad.block_m


def test_names():
    assert tile_configs.gpu_table_name("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tile_configs.shape_key(8, 4096, 14336, 2, "bfloat16") == "E=8,H=4096,F=14336,k=2,bfloat16"
    assert arg_specs.DEEPSEEK_V3.tile_key(jnp.bfloat16) == "E=256,H=7168,F=2048,k=8,S=1,bfloat16"


def test_layers_with_shared_experts_look_up_their_own_entry(monkeypatch):
    """The shared experts' rows (T each) change which tiles win: their entry is not the routed
    experts' one, and the bucket is chosen by all the rows, shared ones included."""
    looked_up = []
    select = tile_configs.select

    def recording_select(num_pairs, *args, **kwargs):
        looked_up.append((num_pairs, kwargs["shape"]))
        return select(num_pairs, *args, **kwargs)

    monkeypatch.setattr(tile_configs, "select", recording_select)
    shape = arg_specs.MoeShape("s", num_experts=4, routing=Routing(2), hidden=24, intermediate=40, shared_intermediate=40)
    inputs = arg_specs.random_inputs(shape, 8, jnp.float32, jax.random.key(0))

    def layer(*args):
        return jax_moe.fused_moe(*args, **inputs.extras, **shape.static_options(), backend="interpret")

    jax.eval_shape(layer, *inputs.as_args())
    assert looked_up == [(8 * 3, "E=4,H=24,F=40,k=2,S=1,float32")]


def test_use_forces_its_tiles_on_every_lookup():
    table_tiles = tile_configs.select(16)
    forced = dataclasses.replace(table_tiles, block_m=2 * table_tiles.block_m)
    with tile_configs.use(forced):
        assert tile_configs.select(16, table="nvidia-h100-80gb-hbm3", shape="E=8,H=4096,F=14336,k=2,bfloat16") == forced
        assert tile_configs.select(16, operand_bytes=4) == forced.narrowed_k(2)
    assert tile_configs.select(16) == table_tiles
    with pytest.raises(TypeError, match="config must be a TileConfig.*got dict"):
        with tile_configs.use(dataclasses.asdict(table_tiles)):
            pass


def test_tuned_buckets_claim_only_their_range(monkeypatch):
    real = tile_configs._table
    tuned = {"shapes": {SHAPE: [{**_bucket(100, 128), "min_pairs": 50}]}}
    monkeypatch.setattr(tile_configs, "_table", lambda name: tuned if name == "gpu" else real(name))
    assert tile_configs.select(50, table="gpu", shape=SHAPE).block_m == 128
    assert tile_configs.select(49, table="gpu", shape=SHAPE) == tile_configs.select(49)
    assert tile_configs.select(101, table="gpu", shape=SHAPE) == tile_configs.select(101)


def test_program_orders_outside_their_range_are_refused():
    config = tile_configs.select(16)
    with pytest.raises(ValueError, match="TileConfig.group_m must be >= 0.*got -1"):
        dataclasses.replace(config, group_m=-1)
    with pytest.raises(ValueError, match="WeightGradTiles.group_m must be >= 1.*got 0"):
        dataclasses.replace(config.down_weight_grad, group_m=0)
    assert dataclasses.replace(config, group_m=0).group_m == 0


def test_every_shipped_table_parses():
    for path in tile_configs.CONFIG_DIR.iterdir():
        if path.name.endswith(".json"):
            data = tile_configs._table(path.name.removesuffix(".json"))
            buckets = [*data.get("buckets", []), *(b for entry in data.get("shapes", {}).values() for b in entry)]
            assert buckets or data.get("fallback"), path.name
            if "fallback" in data:
                assert tile_configs._table(data["fallback"]) is not None, (path.name, data["fallback"])
            for bucket in buckets:
                tile_configs.TileConfig.from_dict(bucket)


def test_a_table_falls_back_to_the_tables_it_names(monkeypatch):
    real = tile_configs._table
    fake = {
        "new-gpu": {"shapes": {SHAPE: [{**_bucket(100, 64), "min_pairs": 50}]}, "fallback": "old-gpu"},
        "old-gpu": {"shapes": {SHAPE: [_bucket(None, 16)]}, "fallback": "new-gpu"},
    }
    monkeypatch.setattr(tile_configs, "_table", lambda name: fake[name] if name in fake else real(name))
    assert tile_configs.table_chain("new-gpu") == ("new-gpu", "old-gpu")  # the cycle ends the chain
    assert tile_configs.select(50, table="new-gpu", shape=SHAPE).block_m == 64
    assert tile_configs.select(49, table="new-gpu", shape=SHAPE).block_m == 16
    assert tile_configs.select(101, table="new-gpu", shape=SHAPE).block_m == 16
    assert tile_configs.select(101, table="new-gpu", shape="E=3,H=1,F=1,k=1,bfloat16") == tile_configs.select(101)


def test_tables_that_are_missing_or_misnamed_are_refused(monkeypatch):
    real = tile_configs._table
    fake = {"gpu-with-typo": {"shapes": {}, "fallback": "nvidia-h100-80gb-hmb3"}}
    monkeypatch.setattr(tile_configs, "_table", lambda name: fake[name] if name in fake else real(name))
    with pytest.raises(ValueError, match="configs/gpu-with-typo.json: its fallback 'nvidia-h100-80gb-hmb3' names no table"):
        tile_configs.select(8, table="gpu-with-typo")
    assert tile_configs.table_chain("untuned-gpu") == ("untuned-gpu",)
    with pytest.raises(TypeError, match="table: expected a table name or a non-empty tuple of them, got \\(\\)"):
        tile_configs.select(8, table=())
    with pytest.raises(TypeError, match="table: expected a table name \\(str\\), got int"):
        tile_configs.table_chain(3)
    with pytest.raises(TypeError, match="device: expected a jax.Device \\(with a device_kind\\), got str"):
        tile_configs.device_tables("NVIDIA H200")


def _device(device_kind, compute_capability=None):
    return types.SimpleNamespace(device_kind=device_kind, compute_capability=compute_capability)


def test_devices_read_their_own_table_then_their_architectures():
    h100 = "nvidia-h100-80gb-hbm3"
    assert tile_configs.device_tables(_device("NVIDIA H100 80GB HBM3", "9.0")) == (h100, "cuda-sm90")
    assert tile_configs.device_tables(_device("NVIDIA H100 PCIe", "9.0")) == ("nvidia-h100-pcie", "cuda-sm90", h100)
    assert tile_configs.device_tables(_device("NVIDIA A100-SXM4-80GB", "8.0")) == ("nvidia-a100-sxm4-80gb", "cuda-sm80")
    assert tile_configs.device_tables(types.SimpleNamespace(device_kind="cpu")) == ("cpu",)


def test_an_untuned_hopper_card_takes_the_h100s_tuned_tiles():
    """Every H100-tuned shape, at every token count the benchmark runs: a card of the same
    architecture with no table of its own (nor a shape entry, for the H200) selects the same
    tiles as the H100, not the defaults."""
    h100 = "nvidia-h100-80gb-hbm3"
    differs_from_default = 0
    for model in arg_specs.MODELS:
        shape = model.tile_key(jnp.bfloat16)
        for tokens in (1, 8, 64, 512, 4096):
            pairs = tokens * model.slots
            tuned = tile_configs.select(pairs, table=h100, shape=shape)
            assert tile_configs.select(pairs, table=tile_configs.device_tables(_device("NVIDIA H100 NVL", "9.0")), shape=shape) == tuned
            differs_from_default += tuned != tile_configs.select(pairs)
    assert differs_from_default > 10


def test_every_launch_takes_its_own_fields_tiles(benchmark_module):
    """Each kernel of the forward and backward launches with the tiles of its own config field
    (the training step traced with kernel_resources' recording launcher: nothing runs)."""

    def gemm(block_n, num_warps):
        return {"block_n": block_n, "block_k": 32, "num_warps": num_warps, "num_stages": num_warps + 1}

    def grad(block_n, num_warps):
        return {"block_m": 32, "block_n": block_n, "block_k": 16, "group_m": 2, "num_warps": num_warps,
                "num_stages": num_warps + 1}

    config = tile_configs.TileConfig.from_dict({
        "block_m": 16, "group_m": 1, "gate_up": gemm(16, 1), "down": gemm(32, 2), "input_grad": gemm(64, 4),
        "gate_up_backward": gemm(128, 8), "down_weight_grad": grad(16, 16), "gate_up_weight_grad": grad(32, 32),
    })
    shape = arg_specs.MoeShape("small", num_experts=4, routing=Routing(2), hidden=24, intermediate=40)
    records = benchmark_module("kernel_resources").trace(shape, 8, True, config)
    tiled = [
        (r.kernel.__name__, r.num_warps, r.num_stages, r.constexprs["BLOCK_N"])
        for r in records if r.kernel.__name__ not in ("route_kernel", "dispatch_kernel", "route_dispatch_kernel")
    ]
    assert tiled == [
        ("gate_up_kernel", 1, 2, 16),
        ("expert_gemm_combine_kernel", 2, 3, 32),
        ("gate_up_backward_kernel", 8, 9, 128),
        ("expert_gemm_combine_kernel", 4, 5, 64),
        ("expert_weight_grad_kernel", 16, 17, 16),
        ("expert_weight_grad_kernel", 32, 33, 32),
    ]


@pytest.mark.parametrize(
    "dtype, partial_dtype", [("bfloat16", "bfloat16"), ("float16", "float32"), ("float32", "float32")]
)
def test_top_k_combines_keep_partial_rows_in_bf16_only_for_bf16(benchmark_module, dtype, partial_dtype):
    """The forward's and the input gradient's combines write their partial rows in bf16 for bf16
    layers (half the traffic), in fp32 otherwise (fp16 terms could overflow where their sum does not)."""
    records = []
    plan = pipeline.Plan(
        config=tile_configs.select(16), dot_precision="tf32",
        launch=benchmark_module("kernel_resources").recording_launcher(records),
    )
    shape = arg_specs.MoeShape("small", num_experts=4, routing=Routing(2), hidden=24, intermediate=40)
    inputs = arg_specs.random_inputs(shape, 8, dtype, jax.random.key(0))

    def loss(x, w_gate, w_up, w_down):
        weights, ids = pipeline.top_k_routing(inputs.router_logits, None, routing=Routing(2), launch=plan.launch)
        out = pipeline.experts(x, weights, ids, pipeline.ExpertWeights(w_gate, w_up, w_down), plan=plan)
        return jnp.sum(out.astype(jnp.float32))

    weights = (inputs.w_gate, inputs.w_up, inputs.w_down)
    jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2, 3)), inputs.hidden_states, *weights)
    combines = [r for r in records if r.kernel.__name__ == "expert_gemm_combine_kernel"]
    # Operands, then the outputs: the result, the partial rows, the arrival counters.
    assert [r.pointer_dtypes[-3:] for r in combines] == [[dtype, partial_dtype, "int32"]] * 2
