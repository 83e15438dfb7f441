"""The helpers around the kernels: input specs, timing, the tuner's plumbing."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe import arg_specs, backend_triton, reference, tile_configs, timing, tune
from jax_moe.options import Routing

import numpy_moe


def test_zipf_routing_is_skewed(key):
    logits = arg_specs.zipf_router_logits(key, 4000, 16, s=1.2)
    _, ids = jax.lax.top_k(logits, 2)
    counts = np.bincount(np.asarray(ids).ravel(), minlength=16)
    assert counts[0] > counts[3] > counts[15] > 0
    assert len(set(map(tuple, np.asarray(ids)))) > 16  # still random per token


def test_random_inputs_have_the_model_shapes(key):
    inputs = arg_specs.random_inputs(arg_specs.QWEN3_30B_A3B.with_experts(4), 3, jnp.bfloat16, key)
    assert inputs.hidden_states.shape == (3, 2048) and inputs.hidden_states.dtype == jnp.bfloat16
    assert inputs.w_down.shape == (4, 768, 2048) and inputs.router_logits.dtype == jnp.float32
    assert float(jnp.std(inputs.w_gate.astype(jnp.float32))) == pytest.approx(2048**-0.5, rel=0.05)


def test_arrays_too_big_to_draw_whole_are_drawn_one_expert_at_a_time(key, monkeypatch):
    shape = arg_specs.QWEN3_30B_A3B.with_experts(4)
    monkeypatch.setattr(arg_specs, "MAX_WHOLE_DRAW", 2048 * 768)  # one expert's matrix: drawn whole
    inputs = arg_specs.random_inputs(shape, 3, jnp.bfloat16, key)
    whole = arg_specs.random_inputs(shape, 3, jnp.bfloat16, key)
    assert inputs.w_gate.shape == (4, 2048, 768) and inputs.w_gate.dtype == jnp.bfloat16
    w_gate = np.asarray(inputs.w_gate, np.float32)
    assert [np.std(w) for w in w_gate] == pytest.approx([2048**-0.5] * 4, rel=0.05)
    assert not np.array_equal(w_gate[0], w_gate[1])  # each expert its own draw
    assert np.array_equal(np.asarray(inputs.hidden_states), np.asarray(whole.hidden_states))  # small: as before
    monkeypatch.setattr(arg_specs, "MAX_WHOLE_DRAW", 1 << 28)
    assert not np.array_equal(np.asarray(arg_specs.random_inputs(shape, 3, jnp.bfloat16, key).w_gate, np.float32), w_gate)


def test_median_call_us_times_a_call():
    fn = jax.jit(lambda a: a * 2)
    us = timing.median_call_us(fn, [(jnp.ones(8),), (jnp.zeros(8),)], calls=3, repeats=3, warmup=1)
    assert 0 < us < 1e6


def test_train_step_reduces_only_the_weight_gradients(key):
    keys = jax.random.split(key, 6)
    x, logits, cotangent = (jax.random.normal(k, (5, 3)) for k in keys[:3])
    w_gate, w_up, w_down = (jax.random.normal(k, (2, 3, 12)) for k in keys[3:])

    def terms(x, logits, w_gate, w_up, w_down, cotangent):
        mixed = x * jnp.tanh(logits) + jnp.einsum("th,ehf->th", x, w_gate * w_up) + jnp.sum(w_down**2)
        return mixed * cotangent

    def loss(*args):
        return jnp.sum(terms(*args))

    args = (x, logits, w_gate, w_up, w_down, cotangent)
    value, grad_x, grad_logits, weight_grad_sums = timing.train_step(loss)(*args)
    want_value, want = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4))(*args)
    # The jitted and the eager sum round in different orders: the bound is relative to the terms'
    # magnitude, not to their (possibly cancelled) sum. Seed 3039547683 differed by 1.6e-5 of it.
    np.testing.assert_allclose(value, want_value, rtol=0, atol=1e-5 * float(jnp.sum(jnp.abs(terms(*args)))))
    np.testing.assert_allclose(grad_x, want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad_logits, want[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weight_grad_sums, [jnp.sum(g[..., :8]) for g in want[2:]], rtol=1e-5, atol=1e-6)


def test_block_m_candidates_follow_rows_per_expert():
    assert tune._block_m_candidates(2, 8) == [16]
    assert tune._block_m_candidates(1024, 8) == [16, 32, 64, 128]
    assert tune._block_m_candidates(64, 256) == [16]


def test_tuning_new_token_counts_keeps_the_buckets_that_hold_none_of_them():
    def bucket(lo, hi, tag):
        return {"min_pairs": lo, "max_pairs": hi, "tag": tag}

    prefill = [bucket(512, 2896, "old 512"), bucket(2897, None, "old 8192")]
    decode = [(2, bucket(1, 4, "new 1")), (16, bucket(5, 44, "new 8")), (128, bucket(45, None, "new 64"))]
    merged = tune._merge_buckets(prefill, decode)
    assert [(b["min_pairs"], b["max_pairs"], b["tag"]) for b in merged] == [
        (1, 4, "new 1"), (5, 44, "new 8"), (45, 511, "new 64"), (512, 2896, "old 512"), (2897, None, "old 8192"),
    ]
    # A tuned count inside an old bucket replaces it; one kept between two tuned counts splits them.
    merged = tune._merge_buckets(prefill + [bucket(0, 100, "old decode")], [(128, bucket(64, 1024, "new 64")),
                                                                           (8192, bucket(1025, None, "new 4096"))])
    assert [(b["min_pairs"], b["max_pairs"], b["tag"]) for b in merged] == [
        (0, 100, "old decode"), (101, 511, "new 64"), (512, 2896, "old 512"), (2897, None, "new 4096"),
    ]
    # Neighbours with the same tiles and touching ranges become one bucket; a gap keeps them apart.
    merged = tune._merge_buckets([bucket(0, 100, "same"), bucket(2000, None, "same")],
                                 [(256, bucket(101, 1024, "same"))])
    assert [(b["min_pairs"], b["max_pairs"], b["tag"]) for b in merged] == [(0, 1024, "same"), (2000, None, "same")]


@pytest.mark.skipif(backend_triton.unavailable_reason() is None, reason="a GPU with jax-triton is here")
def test_tune_says_why_it_cannot_run_here():
    with pytest.raises(SystemExit, match="tuning needs the triton backend"):
        tune.main(["--models", "mixtral-8x7b"])


def _extras_shapes(shape, key):
    """The shapes of ``random_inputs``' extras, traced abstractly: real model widths, no memory."""
    extras = jax.eval_shape(lambda k: arg_specs.random_inputs(shape, 2, jnp.bfloat16, k).extras, key)
    return {name: a.shape for name, a in extras.items()}


def test_random_inputs_carry_each_familys_extras(key):
    deepseek = _extras_shapes(arg_specs.DEEPSEEK_V3.with_experts(16), key)
    assert deepseek["selection_bias"] == (16,)
    assert deepseek["shared_w_down"] == (1, 2048, 7168)
    qwen2 = _extras_shapes(arg_specs.QWEN2_57B_A14B.with_experts(8), key)
    assert arg_specs.QWEN2_57B_A14B.num_shared == 8 and qwen2["shared_gate"] == (3584,)
    assert qwen2["shared_w_gate"] == (8, 3584, 2560)
    gpt_oss = _extras_shapes(arg_specs.GPT_OSS_120B.with_experts(4), key)
    assert gpt_oss == {"gate_bias": (4, 2880), "up_bias": (4, 2880), "down_bias": (4, 2880)}
    assert arg_specs.DEEPSEEK_V3.with_experts(16).routing.num_groups == 8


def test_deepseek_inputs_route_every_expert_evenly(key):
    """Uniform routing means every expert gets about its share of the tokens: the benchmark's and
    the tuner's DeepSeek-V3 inputs must not let their selection bias pick the experts."""
    shape = arg_specs.DEEPSEEK_V3
    logits_key, bias_key = jax.random.split(key)
    logits = jax.random.normal(logits_key, (4096, shape.num_experts))
    bias = arg_specs.SELECTION_BIAS_STD * jax.random.normal(bias_key, (shape.num_experts,))
    _, ids = reference.route(logits, shape.routing, bias)
    loads = np.bincount(np.asarray(ids).ravel(), minlength=shape.num_experts)
    mean = 4096 * shape.top_k / shape.num_experts
    assert loads.min() > 0.5 * mean and loads.max() < 1.5 * mean, (loads.min(), loads.max())


def test_keep_forward_needs_an_existing_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(backend_triton, "unavailable_reason", lambda: None)
    output = tmp_path / "table.json"
    with pytest.raises(SystemExit, match="has no entry for E=8,H=4096,F=14336,k=2,bfloat16"):
        tune.main(["--models", "mixtral-8x7b", "--tokens", "8", "--backward", "--keep-forward", "--output", str(output)])


def test_kernel_profile_report_sums_ncu_durations(tmp_path, capsys, benchmark_module):
    kernel_profile = benchmark_module("kernel_profile")
    header = '"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"'
    rows = [
        '"0","gate_up_kernel","gpu__time_duration.sum","us","1,000.5"',
        '"1","loop_fusion","gpu__time_duration.sum","ns","2500"',
        '"2","gate_up_kernel","gpu__time_duration.sum","ms","0.5"',
    ]
    log = tmp_path / "profile.csv"
    log.write_text("\n".join(["==PROF== Connected to process 1", header, *rows]) + "\n")
    kernel_profile.report(str(log))
    lines = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines["gate_up_kernel"][:2] == ["2", "1500.5"]
    assert lines["loop_fusion"][:2] == ["1", "2.5"]
    assert lines["total"] == ["3", "1503.0"]


def test_train_bench_floor_is_the_slower_of_gemms_and_weight_traffic(benchmark_module):
    train_bench = benchmark_module("train_bench")
    read_bw, gemm_rate = 3e12, 7e14
    # Mixtral at T = 8192, compute-bound: the forward's three GEMMs of 2 * 16384 * 4096 * 14336
    # FLOPs each, and the backward's six.
    mixtral = arg_specs.MoeShape("m", 8, Routing(2), 4096, 14336)
    assert train_bench.floor_us(mixtral, 8192, read_bw, gemm_rate) == pytest.approx(
        9 * 2 * 16384 * 4096 * 14336 / gemm_rate * 1e6
    )
    # DeepSeek-V3's routed experts at T = 2048: 256 x 3 x 7168 x 2048 bf16 weights, read twice, written once.
    deepseek = arg_specs.MoeShape("d", 256, Routing(8), 7168, 2048)
    assert train_bench.floor_us(deepseek, 2048, read_bw, gemm_rate) == pytest.approx(
        3 * 256 * 3 * 7168 * 2048 * 2 / read_bw * 1e6
    )


def test_forward_floor_is_the_mean_over_the_input_sets(benchmark_module):
    """The timing cycles through input sets that select different experts: the floor must too."""
    moe_bench = benchmark_module("moe_bench")
    shape = arg_specs.MoeShape("s", num_experts=8, routing=Routing(2), hidden=64, intermediate=32)
    expert_us = 3 * 64 * 32 * 2 / 1e9 * 1e6
    activation_us = 2 * 1 * 64 * 2 / 1e9 * 1e6
    floor = moe_bench.floor_us(shape, 1, [np.array([[0, 1]]), np.array([[2, 2]])], read_bw=1e9, gemm_rate=1e15)
    assert floor == pytest.approx((2 * expert_us + expert_us) / 2 + activation_us)


def test_refloor_recomputes_recorded_floors_from_the_same_inputs(benchmark_module, tmp_path, monkeypatch):
    moe_bench = benchmark_module("moe_bench")
    monkeypatch.setattr(moe_bench, "plot", lambda rows, path: None)  # matplotlib is the bench extra's
    shape = arg_specs.QWEN3_30B_A3B  # at T = 1 every input set selects top_k = 8 experts
    path = tmp_path / "results.json"
    row = {"model": shape.name, "T": 1, "routing": "uniform", "route": "jax_moe", "time_us": 100.0, "floor_us": 1.0}
    path.write_text(json.dumps({"header": {"read_bw_GBps": 3000.0, "gemm_rate_TFLOPs": 700.0}, "rows": [row]}))
    moe_bench.main(["--refloor", str(path)])
    data = json.loads(path.read_text())
    floor = (8 * 3 * shape.hidden * shape.intermediate * 2 + 2 * shape.hidden * 2) / 3e12 * 1e6
    assert data["rows"][0]["floor_us"] == pytest.approx(floor)
    assert data["rows"][0]["floor_fraction"] == pytest.approx(floor / 100.0)
    assert "--refloor" in data["header"]["floor_recomputed"]
    assert f"| {floor:.4g} |" in path.with_suffix(".md").read_text()
    row["model"] = "no-such-model"
    path.write_text(json.dumps({"header": data["header"], "rows": [row]}))
    with pytest.raises(ValueError, match=r"models or routings this script does not know: \['no-such-model'\]"):
        moe_bench.main(["--refloor", str(path)])
    with pytest.raises(ValueError, match="is not a results file"):
        moe_bench.main(["--refloor", str(tmp_path / "missing.json")])


def test_results_names(benchmark_module, monkeypatch):
    common = benchmark_module("common")
    monkeypatch.setattr(common, "gpu_slug", lambda: "nvidia-h100-80gb-hbm3")
    # A full run replaces the run before it; --quick and --tag write files of their own.
    assert common.results_name() == "nvidia-h100-80gb-hbm3"
    assert common.results_name("train") == "nvidia-h100-80gb-hbm3-train"
    assert common.results_name(quick=True) == "nvidia-h100-80gb-hbm3-quick"
    assert common.results_name("train", tag="pcie") == "nvidia-h100-80gb-hbm3-train-pcie"
    assert common.results_name("train", quick=True, tag="x") == "nvidia-h100-80gb-hbm3-train-quick-x"


@pytest.mark.parametrize("first_us, calls", [(100.0, 20), (2_000.0, 10), (7_000.0, 5), (30_000.0, 1)])
def test_slower_routes_are_timed_with_fewer_calls_per_repeat(benchmark_module, monkeypatch, first_us, calls):
    common = benchmark_module("common")
    timed = []

    def fake_median(fn, input_sets, calls=20, repeats=7, warmup=3):
        timed.append(calls)
        return first_us

    monkeypatch.setattr(timing, "median_call_us", fake_median)
    assert common.time_route(None, [()]) == first_us
    assert timed == [1, calls]


def test_forward_benchmark_checks_and_times_every_route_it_can_compile(benchmark_module, monkeypatch):
    moe_bench, routes = benchmark_module("moe_bench"), benchmark_module("routes")
    if backend_triton.unavailable_reason() is not None:
        # jax_moe's rows through the interpreter: every step of the benchmark runs on the CPU too.
        fused_moe = routes.jax_moe.fused_moe
        monkeypatch.setattr(
            routes.jax_moe, "fused_moe", lambda *args, backend, **kwargs: fused_moe(*args, **kwargs, backend="interpret")
        )
        monkeypatch.setattr(moe_bench, "IN_GRAPH_LAYERS", 2)  # the interpreter takes its time
    tiny = arg_specs.MoeShape("tiny", num_experts=8, routing=Routing(2), hidden=64, intermediate=32)
    programs = moe_bench.model_programs(tiny, (1, 8, 32), (8,), gemm_rate=1e12)
    # The routings share one program per route and T; the parity reference runs on all tokens
    # here (the dense route's own program); decode sizes get jax_moe's program of several layers.
    assert {(route, t) for _, route, t in programs} == {
        (route, t) for route in ("reference", "jax_moe", "jax_moe_batch_invariant", "dense_einsum", "ragged_dot")
        for t in (1, 8, 32)
    } | {("jax_moe in graph", 1), ("jax_moe in graph", 8)}
    compiled = moe_bench.compile_programs(programs, threads=2)
    assert compiled[("tiny", "reference", 8)] is compiled[("tiny", "dense_einsum", 8)]
    rows = moe_bench.run_model(tiny, (1, 8, 32), (8,), read_bw=1e11, gemm_rate=1e12, compiled=compiled)
    assert {(r["T"], r["routing"]) for r in rows} == {(1, "uniform"), (8, "uniform"), (32, "uniform"), (8, "zipf1.2")}
    for row in rows:
        assert row["floor_us"] > 0
        if row["route"] in ("jax_moe", "jax_moe_batch_invariant", "dense_einsum", "ragged_dot"):
            assert row["rel_err"] <= 1e-2 and row["time_us"] > 0, row
        in_graph = row["route"] == "jax_moe" and row["T"] <= moe_bench.IN_GRAPH_MAX_TOKENS
        assert ("in_graph_us" in row) == in_graph, row
        if in_graph:
            assert row["in_graph_rel_err"] <= 1e-2 and row["in_graph_us"] > 0, row
            assert 0 < row["in_graph_floor_fraction"] < np.inf, row


def test_forward_benchmark_times_quantized_routes_on_weights_quantized_once(benchmark_module, monkeypatch):
    """Named quantized routes run on weights quantized before timing (shared experts too), are
    checked against the bf16 reference, floored by their stored bytes and compared with jax_moe."""
    moe_bench, routes = benchmark_module("moe_bench"), benchmark_module("routes")
    if backend_triton.unavailable_reason() is not None:
        fused_moe = routes.jax_moe.fused_moe
        monkeypatch.setattr(
            routes.jax_moe, "fused_moe", lambda *args, backend, **kwargs: fused_moe(*args, **kwargs, backend="interpret")
        )
        monkeypatch.setattr(moe_bench, "IN_GRAPH_LAYERS", 2)
    timed = []
    monkeypatch.setattr(moe_bench.common, "time_route", lambda fn, sets: timed.append(fn(*sets[0])) or 100.0 * len(timed))
    quantized = []
    route_weights = routes.route_weights
    monkeypatch.setattr(routes, "route_weights", lambda name, *w: quantized.append(name) or route_weights(name, *w))
    tiny = arg_specs.MoeShape(
        "tiny", num_experts=8, routing=Routing(2), hidden=128, intermediate=128, shared_intermediate=128
    )
    selected = ["jax_moe", "jax_moe_int4", "jax_moe_fp8_w8a8"]
    programs = moe_bench.model_programs(tiny, (1,), (), gemm_rate=1e12, selected=selected)
    assert {route for _, route, _ in programs} == {"reference", "jax_moe in graph", *selected}
    compiled = moe_bench.compile_programs(programs, threads=2)
    quantized.clear()
    rows = moe_bench.run_model(tiny, (1,), (), read_bw=1e11, gemm_rate=1e12, compiled=compiled, selected=selected)
    assert sorted(quantized) == ["jax_moe_fp8_w8a8", "jax_moe_int4"]  # each route's weights made once
    assert all(np.isfinite(np.asarray(out, np.float32)).all() for out in timed)
    case = {r["route"]: r for r in rows}
    assert case.keys() == set(selected)
    for name in ("jax_moe_int4", "jax_moe_fp8_w8a8"):
        row = case[name]
        assert 0 < row["rel_err"] <= 0.2, row  # quantization's error, for information
        assert row["speedup_vs_bf16"] == pytest.approx(case["jax_moe"]["time_us"] / row["time_us"])
        assert routes.expert_bytes(tiny, name) / routes.expert_bytes(tiny, "jax_moe") < 0.55
        assert row["floor_us"] < case["jax_moe"]["floor_us"]
    assert "speedup_vs_bf16" not in case["jax_moe"]


def test_forward_benchmark_compiles_xla_programs_first_smallest_first(benchmark_module, monkeypatch):
    """XLA's programs autotune on the GPU and take the longest: none of them may start last."""
    moe_bench = benchmark_module("moe_bench")
    submitted = []
    monkeypatch.setattr(timing, "compile_all", lambda programs, threads, seconds: submitted.extend(programs) or {})
    keys = [("a", "jax_moe", 1), ("a", "dense_einsum", 8), ("b", "jax_moe+dense_shared", 2), ("b", "ragged_dot", 2),
            ("a", "reference", 1)]
    moe_bench.compile_programs(dict.fromkeys(keys), threads=2)
    assert submitted == [
        ("a", "reference", 1), ("b", "ragged_dot", 2), ("a", "dense_einsum", 8), ("a", "jax_moe", 1),
        ("b", "jax_moe+dense_shared", 2),
    ]


def test_routes_that_multiply_by_every_expert_are_left_out_past_their_cost(benchmark_module):
    """XLA's ragged_dot meets every expert with each of a token's top_k rows: k times the dense cost."""
    moe_bench = benchmark_module("moe_bench")
    shape, rate = arg_specs.DEEPSEEK_V3, 660e12
    dense = moe_bench._costs_every_expert_s(shape, "dense_einsum", 512, rate)
    assert dense == pytest.approx(2 * 512 * 256 * 3 * 7168 * 2048 / rate)
    assert moe_bench._costs_every_expert_s(shape, "ragged_dot", 512, rate) == pytest.approx(8 * dense)
    assert moe_bench._costs_every_expert_s(shape, "jax_moe", 512, rate) == 0
    programs = moe_bench.model_programs(shape, (128, 512), (), rate)  # 1.8 / 17 ms dense, 14 / 140 ms ragged
    assert {(route, t) for _, route, t in programs if route in ("dense_einsum", "ragged_dot")} == {
        ("dense_einsum", 128), ("ragged_dot", 128), ("dense_einsum", 512)
    }


def test_compile_all_keeps_the_error_of_a_program_that_fails():
    def refuses(x):
        raise NotImplementedError("no such route here")

    seconds = {}
    compiled = timing.compile_all(
        {"double": (lambda x: 2 * x, (jnp.arange(3.0),)), "refuses": (refuses, (jnp.arange(3.0),))}, 2, seconds
    )
    np.testing.assert_array_equal(compiled["double"](jnp.arange(3.0)), [0.0, 2.0, 4.0])
    assert isinstance(compiled["refuses"], NotImplementedError)
    assert set(seconds) == {"double", "refuses"} and all(s >= 0 for s in seconds.values())


def test_tuner_sweeps_the_down_tiles_of_every_row_block_size(monkeypatch):
    """A row-block size that loses with the table's down tiles can win with its own."""
    shape = arg_specs.MoeShape("small", num_experts=4, routing=Routing(2), hidden=32, intermediate=16)
    winning_down = tune.DOWN_CANDIDATES[-1]  # the wide tile only the down sweep tries

    def fake_times(shape, configs, input_sets, *args, **kwargs):
        return [
            {16: 10.0, 32: 11.0}.get(c.block_m, 20.0) - (6.0 if (c.block_m, c.down) == (32, winning_down) else 0.0)
            for c in configs
        ]

    monkeypatch.setattr(tune, "time_configs", fake_times)
    monkeypatch.setattr(tune, "_block_m_candidates", lambda pairs, experts: [16, 32])
    best, us = tune.tune_one(shape, 8, jnp.float32)
    assert (best.block_m, best.down, us) == (32, winning_down, 5.0)


def test_tuner_times_its_winner_in_the_other_program_order(monkeypatch):
    shape = arg_specs.MoeShape("small", num_experts=4, routing=Routing(2), hidden=32, intermediate=16)
    swept_orders = []

    def fake_times(shape, configs, input_sets, *args, **kwargs):
        swept_orders.append({c.group_m for c in configs})
        return [9.0 if c.group_m == 8 else 10.0 for c in configs]

    monkeypatch.setattr(tune, "time_configs", fake_times)
    monkeypatch.setattr(tune, "_block_m_candidates", lambda pairs, experts: [16])
    best, us = tune.tune_one(shape, 8, jnp.float32)
    assert (best.group_m, us) == (8, 9.0)
    # The sweeps, the other order alone, then the confirmation of the winner against the table's.
    assert swept_orders[-2] == {8} and 0 in swept_orders[0]


@pytest.mark.parametrize("confirming_rounds,expect_winner", [(2, True), (1, False), (0, False)])
def test_tuner_keeps_the_tables_tiles_unless_the_winner_confirms(monkeypatch, confirming_rounds, expect_winner):
    """The sweep's winner must beat the table's tiles again in every interleaved, longer round."""
    shape = arg_specs.MoeShape("small", num_experts=4, routing=Routing(2), hidden=32, intermediate=16)
    confirmations = []

    def fake_times(shape, configs, input_sets, *args, calls=10, repeats=3, **kwargs):
        if calls == 10:  # the sweep: the wide down tile looks fastest
            return [5.0 if c.down == tune.DOWN_CANDIDATES[-1] else 10.0 for c in configs]
        confirmations.append(configs)
        rounds = [(9.0, 8.0)] * confirming_rounds + [(9.0, 9.5)] * (tune.CONFIRM_ROUNDS - confirming_rounds)
        return [t for pair in rounds for t in pair]

    monkeypatch.setattr(tune, "time_configs", fake_times)
    monkeypatch.setattr(tune, "_block_m_candidates", lambda pairs, experts: [16])
    base = tile_configs.select(16, 4, tile_configs.device_tables(jax.devices()[0]), shape.tile_key(jnp.float32))
    best, us = tune.tune_one(shape, 8, jnp.float32)
    assert len(confirmations) == 1 and len(confirmations[0]) == 2 * tune.CONFIRM_ROUNDS
    assert confirmations[0][0::2] == [base] * tune.CONFIRM_ROUNDS
    if expect_winner:
        assert best.down == tune.DOWN_CANDIDATES[-1] and us == 8.0
    else:
        assert best == base and us == 9.0


def test_tuner_writes_the_table_after_every_token_count(tmp_path, monkeypatch):
    """A run stopped part way (a time limit on the GPU machine) keeps the buckets it measured."""
    monkeypatch.setattr(backend_triton, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tune.jax, "devices", lambda: [type("Device", (), {"device_kind": "Test GPU"})()])
    fast = tile_configs.select(16, 2, "default")

    def tune_one(shape, num_tokens, dtype):
        if num_tokens > 8:
            raise KeyboardInterrupt
        return fast, 1.0

    monkeypatch.setattr(tune, "tune_one", tune_one)
    key = "E=8,H=4096,F=14336,k=2,bfloat16"
    old = tile_configs.select(1 << 20, 2, "default")
    output = tmp_path / "table.json"
    output.write_text(json.dumps({"shapes": {key: [{"min_pairs": 5, "max_pairs": None, **dataclasses.asdict(old)}]}}))
    with pytest.raises(KeyboardInterrupt):
        tune.main(["--models", "mixtral-8x7b", "--tokens", "8", "64", "--output", str(output)])
    buckets = json.loads(output.read_text())["shapes"][key]
    # T = 8 (16 pairs) claims up to the midpoint with T = 64; the old bucket keeps the rest,
    # T = 64's share included, until a run gets there.
    assert [(b["min_pairs"], b["max_pairs"], tile_configs.TileConfig.from_dict(b)) for b in buckets] == [
        (5, 7, old), (8, 44, fast), (45, None, old)
    ]


def test_tuned_token_counts_claim_up_to_twice_the_largest(tmp_path, monkeypatch):
    """Decode sizes tuned on their own leave the larger counts to the tiles they had: here an old
    bucket of the file; where the file has none, its fallback tables'."""
    monkeypatch.setattr(backend_triton, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tune.jax, "devices", lambda: [type("Device", (), {"device_kind": "Test GPU"})()])
    fast = tile_configs.select(16, 2, "default")
    monkeypatch.setattr(tune, "tune_one", lambda shape, num_tokens, dtype: (fast, 1.0))
    key = "E=8,H=4096,F=14336,k=2,bfloat16"
    old = tile_configs.select(1 << 20, 2, "default")
    output = tmp_path / "table.json"
    output.write_text(json.dumps({"shapes": {key: [{"min_pairs": 1024, "max_pairs": None, **dataclasses.asdict(old)}]}}))
    tune.main(["--models", "mixtral-8x7b", "--tokens", "8", "32", "--output", str(output)])
    buckets = json.loads(output.read_text())["shapes"][key]
    assert [(b["min_pairs"], b["max_pairs"], tile_configs.TileConfig.from_dict(b)) for b in buckets] == [
        (8, 128, fast), (1024, None, old)
    ]


def test_time_configs_compiles_a_repeated_config_once_and_times_it_each_time(monkeypatch):
    """The confirmation rounds list the same two configs again: one compile each, timed in order."""
    first, second = tile_configs.select(16, 2, "default"), tile_configs.select(1 << 20, 2, "default")
    compiled_configs, timed = [], []

    def compile_all(programs, threads):
        compiled_configs.extend(programs)
        return {config: config for config in programs}

    monkeypatch.setattr(tune, "_with_tiles", lambda build, shape, config, save_activations=False: config)
    monkeypatch.setattr(timing, "compile_all", compile_all)
    monkeypatch.setattr(timing, "median_call_us", lambda config, sets, **kwargs: timed.append(config) or len(timed))
    times = tune.time_configs(None, [first, second, first, second], [()])
    assert compiled_configs == [first, second]
    assert timed == [first, second, first, second] and times == [1, 2, 3, 4]


def test_input_sets_share_the_weights_and_draw_fresh_activations(key):
    shape = arg_specs.MoeShape("s", num_experts=8, routing=Routing(2), hidden=16, intermediate=8, shared_intermediate=8)
    weights = arg_specs.random_inputs(shape, 1, jnp.bfloat16, key)
    assert shape.slots == 3
    sets = arg_specs.input_sets(shape, weights, 5, key, count=2, routing="zipf", with_cotangent=True)
    assert len(sets) == 2
    (x0, logits0, *rest0), (x1, *_) = sets
    assert x0.shape == (5, 16) and x0.dtype == jnp.bfloat16 and logits0.shape == (5, 8)
    assert not np.array_equal(x0, x1)
    assert rest0[0] is weights.w_gate and rest0[3].shape == (5, 16) and rest0[4] is weights.extras
    with pytest.raises(ValueError, match='routing must be "uniform" or "zipf"; got \'skewed\''):
        arg_specs.input_sets(shape, weights, 5, key, routing="skewed")


def test_compile_all_compiles_the_same_program_once():
    """The same function on arguments of the same shapes (the benchmark's parity reference and its
    dense route at decode sizes) is one compile; other shapes or functions are their own."""
    double, triple = (lambda x: 2 * x), (lambda x: 3 * x)
    seconds = {}
    compiled = timing.compile_all({
        "a": (double, (jnp.arange(3.0),)), "b": (double, (jax.ShapeDtypeStruct((3,), jnp.float32),)),
        "c": (double, (jnp.arange(4.0),)), "d": (triple, (jnp.arange(3.0),)),
    }, 2, seconds)
    assert compiled["a"] is compiled["b"] and set(seconds) == {"a", "c", "d"}
    assert len({id(c) for c in compiled.values()}) == 3
    np.testing.assert_array_equal(compiled["b"](jnp.arange(3.0)), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(compiled["d"](jnp.arange(3.0)), [0.0, 3.0, 6.0])


def test_tile_tables_times_the_tiles_each_table_selects(benchmark_module, monkeypatch, capsys):
    """Every case is built with the tiles ``select`` gives for each table (``device``: this GPU's
    tables, an architecture's fallback included) and reported against the first table's time."""
    tile_tables = benchmark_module("tile_tables")
    tiny = arg_specs.MoeShape("tiny", num_experts=8, routing=Routing(2), hidden=64, intermediate=32)
    hopper = type("Device", (), {"device_kind": "NVIDIA H200", "compute_capability": "9.0"})()
    h100, real_table = "nvidia-h100-80gb-hbm3", tile_configs._table
    tuned = {**dataclasses.asdict(tile_configs.select(1)), "block_m": 128, "max_pairs": None}
    monkeypatch.setattr(
        tile_configs, "_table",
        lambda name: {"shapes": {tiny.tile_key(jnp.bfloat16): [tuned]}} if name == h100 else real_table(name),
    )
    monkeypatch.setattr(arg_specs, "MODELS", (tiny,))
    monkeypatch.setattr(tile_tables.jax, "devices", lambda: [hopper])
    monkeypatch.setattr(tune, "_with_tiles", lambda build, shape, config: config)
    monkeypatch.setattr(timing, "compile_all", lambda programs, threads: {k: fn for k, (fn, _) in programs.items()})
    monkeypatch.setattr(timing, "median_call_us", lambda config, sets, **kwargs: float(config.block_m))
    tile_tables.main(["--tables", "default", "device", "--models", "tiny", "--tokens", "1", "512"])
    lines = capsys.readouterr().out.splitlines()
    assert "('nvidia-h200', 'cuda-sm90', 'nvidia-h100-80gb-hbm3')" in lines[0]
    for line, tokens in zip(lines[1:], (1, 512)):
        default = tile_configs.select(tokens * tiny.slots, 2, "default").block_m
        device = 128  # the H100's tiles, reached through cuda-sm90
        assert default != device
        assert line.split() == [
            "tiny", f"T={tokens}", "default", f"{default:.1f}", "us", "(1.000)",
            "device", f"{device:.1f}", "us", f"({device / default:.3f})",
        ]
    assert len(lines) == 3


def test_parallel_benchmark_times_every_layout(benchmark_module):
    """The multi-device benchmark on 8 host devices (reference backend, tiny layer): every layout
    checks its output against one device, times itself and its one-device share, and the
    layouts that move data time their collectives."""
    parallel_bench = benchmark_module("parallel_bench")
    assert parallel_bench.mesh_shape(("data", "expert", "tensor"), 8) == {"data": 2, "expert": 2, "tensor": 2}
    assert parallel_bench.mesh_shape(("data", "expert"), 8) == {"data": 4, "expert": 2}
    assert parallel_bench.mesh_shape(("expert", "tensor"), 8) == {"expert": 4, "tensor": 2}
    assert parallel_bench.mesh_shape(("expert",), 8) == {"expert": 8}
    shape = arg_specs.MoeShape("tiny", num_experts=16, routing=Routing(2), hidden=32, intermediate=16)
    devices = jax.devices("cpu")[:8]
    for layout in parallel_bench.DEFAULT_LAYOUTS:
        row = parallel_bench.run_layout(shape, tuple(layout.split(",")), 8, "reference", devices)
        assert row["rel_err"] <= 1e-2 and row["time_us"] > 0 and row["one_device_us"] > 0, row  # bf16
        assert row["efficiency"] == row["one_device_us"] / row["time_us"]
        assert ("comm_us" in row) == (layout != "data"), row
    too_many = arg_specs.MoeShape("odd", num_experts=6, routing=Routing(2), hidden=32, intermediate=16)
    assert "skipped" in parallel_bench.run_layout(too_many, ("expert",), 8, "reference", devices)
    # XLA:CPU has no ragged all-to-all: the benchmark records the exchange as skipped, and why.
    row = parallel_bench.run_layout(shape, ("data", "expert"), 8, "reference", devices, "all_to_all")
    assert row["skipped"] == "no ragged all-to-all on cpu" and row["exchange"] == "all_to_all"


def _ragged_dot_of_one_dtype(lhs, rhs, group_sizes, preferred_element_type):
    """``jax.lax.ragged_dot`` whose backward multiplies the cotangent with the other operand and
    refuses two dtypes there, as tokamax's ragged dots do."""

    @jax.custom_vjp
    def dot(lhs, rhs):
        return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)

    def backward(operands, cotangent):
        lhs, rhs = operands
        if cotangent.dtype != rhs.dtype:
            raise TypeError(f"lhs and rhs must have same dtype; got {cotangent.dtype} and {rhs.dtype}")
        _, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, group_sizes), lhs, rhs)
        return vjp(cotangent)

    dot.defvjp(lambda lhs, rhs: (dot(lhs, rhs), (lhs, rhs)), backward)
    return dot(lhs, rhs)


def test_ragged_routes_train_through_ragged_dots_of_one_dtype(benchmark_module, key):
    """The tokamax routes' GEMMs return the activations' dtype, so their backward runs; the
    float32 products of the ragged_dot route would not."""
    routes = benchmark_module("routes")
    shape = arg_specs.MoeShape("tiny", num_experts=8, routing=Routing(2), hidden=32, intermediate=16)
    inputs = arg_specs.random_inputs(shape, 24, "bfloat16", key)
    args = (*inputs.as_args(), inputs.extras)

    def loss(route, *weights):
        x, logits, *_, extras = args
        return jnp.sum(route(x, logits, *weights, extras).astype(jnp.float32))

    weights = inputs.as_args()[2:]
    route = routes.sorted_ragged(shape, _ragged_dot_of_one_dtype, products_in_input_dtype=True)
    grads = jax.grad(functools.partial(loss, route), argnums=(0, 1, 2))(*weights)
    want = jax.grad(functools.partial(loss, routes.dense_einsum(shape)), argnums=(0, 1, 2))(*weights)
    for grad, expected in zip(grads, want):
        assert grad.dtype == jnp.bfloat16
        assert numpy_moe.rel_error(grad, np.asarray(expected.astype(jnp.float32), np.float64)) <= 2e-2
    with pytest.raises(TypeError, match="lhs and rhs must have same dtype"):
        jax.grad(functools.partial(loss, routes.sorted_ragged(shape, _ragged_dot_of_one_dtype)))(*weights)
