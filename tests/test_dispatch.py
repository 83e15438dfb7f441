"""Properties of the dispatch metadata (sorted pairs, block -> expert map), for any routing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

import jax_moe
from jax_moe import backend_interpret, kernels, pipeline, tile_configs
from jax_moe.options import Routing

import numpy_moe


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 70))
    top_k = draw(st.integers(1, min(num_experts, 9)))
    num_tokens = draw(st.integers(1, 150))
    # Skewed as often as uniform: a few popular experts stress the padding and block bookkeeping.
    popular = draw(st.integers(1, num_experts))
    ids = draw(
        st.lists(
            st.lists(st.integers(0, popular - 1), min_size=top_k, max_size=top_k, unique=True)
            if popular >= top_k
            else st.permutations(range(num_experts)).map(lambda p: p[:top_k]),
            min_size=num_tokens,
            max_size=num_tokens,
        )
    )
    block_m = draw(st.sampled_from([16, 32, 64, 128]))
    # Small sizes make several histogram steps (some straddling a program's first pair), several
    # rank blocks per program and several programs at these sizes.
    sizes = dict(
        hist_block=draw(st.sampled_from([128, 256, pipeline.DISPATCH_HIST_BLOCK])),
        rank_block=draw(st.sampled_from([16, 32, pipeline.DISPATCH_RANK_BLOCK])),
        chunk_programs=draw(st.sampled_from([1, 3, pipeline.DISPATCH_CHUNK_PROGRAMS])),
    )
    return np.array(ids, np.int32).reshape(num_tokens, top_k), num_experts, block_m, sizes


@settings(max_examples=40, deadline=None)
@given(routings())
def test_dispatch_metadata(routing):
    ids, num_experts, block_m, sizes = routing
    num_pairs = ids.size
    sorted_pairs, block_expert, expert_row_end = map(np.asarray, pipeline.dispatch(
        jnp.asarray(ids), num_experts=num_experts, block_m=block_m, launch=backend_interpret.launch, **sizes
    ))
    max_blocks = min(num_experts, num_pairs) + -(-num_pairs // block_m)
    assert sorted_pairs.shape == (max_blocks * block_m,) and block_expert.shape == (max_blocks,)
    # Every output element written (the interpreter poisons them to INT32_MIN beforehand).
    assert sorted_pairs.min() >= 0 and block_expert.min() >= -1

    # Each (token, slot) pair appears exactly once; every other row is padding, marked NUM_PAIRS.
    real = sorted_pairs < num_pairs
    np.testing.assert_array_equal(np.sort(sorted_pairs[real]), np.arange(num_pairs))
    assert np.all(sorted_pairs[~real] == num_pairs)

    # Blocks in use come first, one expert each, in expert order; the rest are marked -1.
    used = block_expert >= 0
    num_used = used.sum()
    assert used[:num_used].all() and not used[num_used:].any()
    assert np.all(np.diff(block_expert[:num_used]) >= 0)
    flat_ids = ids.reshape(-1)
    rows = sorted_pairs.reshape(max_blocks, block_m)
    for block in range(max_blocks):
        pairs = rows[block][rows[block] < num_pairs]
        if block_expert[block] < 0:
            assert pairs.size == 0
        else:
            assert np.all(flat_ids[pairs] == block_expert[block])
            assert np.all(np.diff(pairs) > 0)  # stable: pair order kept within an expert

    # Exactly the blocks each expert needs: ceil(count / block_m).
    counts = np.bincount(flat_ids, minlength=num_experts)
    np.testing.assert_array_equal(
        np.bincount(block_expert[used], minlength=num_experts), -(-counts // block_m)
    )
    # Each expert's rows end where its padded segment does; padding experts end with the last one.
    ends = np.cumsum(-(-counts // block_m) * block_m)
    np.testing.assert_array_equal(expert_row_end[:num_experts], ends)
    assert np.all(expert_row_end[num_experts:] == ends[-1])


@settings(max_examples=8, deadline=None)
@given(routings(), st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 3]), st.booleans())
def test_padding_rows_never_reach_the_output(routing, seed, group_m, use_tma):
    """Padding rows carry the sentinel pair NUM_PAIRS, i.e. token T: give the output a guard row T
    and check the kernels leave it poisoned while writing every real row, also where they skip a
    block's second half of padding (HALF_BLOCKS, as the pipeline does at 128 rows), in every
    program order (GROUP_M 0: each expert's blocks together; a missed tile leaves poison), with
    the weight tiles read through pointers or TMA descriptors."""
    ids, num_experts, block_m, _ = routing
    num_tokens, top_k = ids.shape
    hidden, intermediate = 24, 20
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_tokens, hidden), np.float32)
    w_gate, w_up = rng.standard_normal((2, num_experts, hidden, intermediate), np.float32)
    w_down = rng.standard_normal((num_experts, intermediate, hidden), np.float32)
    weights = rng.uniform(0.1, 1, ids.shape).astype(np.float32)
    sorted_pairs, block_expert, expert_row_end = pipeline.dispatch(
        jnp.asarray(ids), num_experts=num_experts, block_m=block_m, launch=backend_interpret.launch
    )
    blocks = block_expert.shape[0]
    constants = dict(
        NUM_PAIRS=ids.size, TOP_K=top_k, NUM_ROUTED=num_experts, HAS_BIAS=False,
        MAX_BLOCKS=blocks, BLOCK_M=block_m, BLOCK_N=16, BLOCK_K=16, GROUP_M=group_m, DOT_PRECISION="ieee",
        HALF_BLOCKS=block_m >= 32,  # halves of at least 16 rows, the smallest tl.dot
        USE_TMA=use_tma, **pipeline._quantization_args(pipeline.ExpertWeights(w_gate, w_up, w_down), act_fp8=False),
    )
    absent = jnp.zeros((1,), jnp.float32)  # the scales and zero points of quantized weights, not read
    counters = (num_tokens + 1) * 2  # + the guard row's: zeroed by the gate/up programs (poisoned before)
    zero_block = triton.next_power_of_2(triton.cdiv(counters, blocks * 2))
    act, _, _, zeroed_arrivals = backend_interpret.launch(
        kernels.gate_up_kernel, x, w_gate, w_up, w_gate, w_up, x, x, sorted_pairs, block_expert, expert_row_end,
        *(absent,) * 9,
        out_shapes=(jax.ShapeDtypeStruct((blocks * block_m, intermediate), jnp.float32),) * 3
        + (jax.ShapeDtypeStruct((counters,), jnp.int32),),
        grid=(blocks * 2,), HIDDEN=hidden, INTERMEDIATE=intermediate, SAVE_PREACTIVATIONS=False,
        ACTIVATION="silu", ALPHA=1.0, LIMIT=float("inf"), NUM_ZEROS=counters, ZERO_BLOCK=zero_block, **constants,
    )
    assert not np.asarray(zeroed_arrivals).any()
    out, _, _ = backend_interpret.launch(
        kernels.expert_gemm_combine_kernel, act, w_down, w_down, act, w_down, w_down, x,
        weights.reshape(-1), sorted_pairs, block_expert, expert_row_end, *(absent,) * 9, zeroed_arrivals,
        out_shapes=(
            jax.ShapeDtypeStruct((num_tokens + 1, hidden), jnp.float32),  # + guard row
            jax.ShapeDtypeStruct((ids.size, hidden), jnp.float32),
            jax.ShapeDtypeStruct((counters,), jnp.int32),
        ),
        grid=(blocks * 2,), in_place_zeros={20: 2}, K=intermediate, N=hidden, B_TRANSPOSED=False,
        SECOND_TERM=False, SCALE_BY_ROUTING_WEIGHT=True, **constants,
    )
    out = np.asarray(out)
    assert np.isnan(out[num_tokens]).all()
    ref = numpy_moe.experts(x, weights, ids, w_gate, w_up, w_down)
    assert numpy_moe.rel_error(out[:num_tokens], ref) <= 1e-5


@st.composite
def decode_routings(draw):
    """Layers and token counts small enough for route_and_dispatch, with or without groups and
    shared experts."""
    num_groups = draw(st.sampled_from([1, 2, 4]))
    num_experts = num_groups * draw(st.integers(2, 24))
    top_k = draw(st.integers(1, min(num_experts // num_groups, 8)))
    num_shared = draw(st.integers(0, 2))
    num_tokens = draw(st.integers(1, pipeline.ROUTE_DISPATCH_MAX_PAIRS // (top_k + num_shared)))
    routing = Routing(
        top_k, draw(st.sampled_from(["softmax", "sigmoid"])), draw(st.booleans()), num_groups,
        draw(st.integers(1, num_groups)) if num_groups > 1 else None, 1.5,
    )
    return routing, num_experts, num_shared, num_tokens, draw(st.sampled_from([16, 32, 64, 128]))


@settings(max_examples=25, deadline=None)
@given(decode_routings(), st.integers(0, 2**31 - 1))
def test_route_and_dispatch_is_route_then_dispatch(case, seed):
    """The one-program launch writes what the two launches write, every element of it (the
    interpreter poisons outputs, so anything left unwritten differs)."""
    routing, num_experts, num_shared, num_tokens, block_m = case
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((num_tokens, num_experts), np.float32))
    bias = jnp.asarray(0.1 * rng.standard_normal(num_experts, np.float32)) if routing.scoring == "sigmoid" else None
    launch = backend_interpret.launch
    weights, ids, dispatched = pipeline.route_and_dispatch(
        logits, bias, routing=routing, launch=launch, num_shared=num_shared, block_m=block_m
    )
    want_weights, want_ids = pipeline.top_k_routing(logits, bias, routing=routing, launch=launch, num_shared=num_shared)
    want_dispatched = pipeline.dispatch(want_ids, num_experts=num_experts + num_shared, block_m=block_m, launch=launch)
    np.testing.assert_array_equal(weights, want_weights)
    np.testing.assert_array_equal(ids, want_ids)
    for got, want in zip(dispatched, want_dispatched, strict=True):
        np.testing.assert_array_equal(got, want)


def test_fused_moe_routes_and_dispatches_in_one_launch_at_decode_sizes(key):
    """Three kernel launches at decode sizes (route + dispatch, gate/up, down + combine), four
    above them, shared experts or not."""
    num_experts, hidden, intermediate, top_k = 8, 16, 16, 2
    keys = jax.random.split(key, 4)
    shapes = [(num_experts, hidden, intermediate)] * 2 + [(num_experts, intermediate, hidden)]
    weights = [jax.random.normal(k, s) for k, s in zip(keys[1:], shapes)]
    shared = [w[:1] for w in weights]

    def launches(num_tokens, **extras):
        x = jax.random.normal(keys[0], (num_tokens, hidden))
        logits = jax.random.normal(keys[0], (num_tokens, num_experts))
        layer = lambda: jax_moe.fused_moe(x, logits, *weights, top_k=top_k, backend="interpret", **extras)
        jaxpr = jax.make_jaxpr(layer)()
        return str(jaxpr).count("pure_callback")

    limit = pipeline.ROUTE_DISPATCH_MAX_PAIRS
    assert launches(limit // top_k) == 3 and launches(limit // top_k + 1) == 4
    shared_experts = dict(shared_w_gate=shared[0], shared_w_up=shared[1], shared_w_down=shared[2])
    assert launches(limit // (top_k + 1), **shared_experts) == 3


def test_route_and_dispatch_refuses_what_it_cannot_take(key):
    """Past ROUTE_DISPATCH_MAX_PAIRS pairs it says so; metadata made for other tiles is refused
    by ``experts`` before any launch."""
    num_tokens = pipeline.ROUTE_DISPATCH_MAX_PAIRS // 2 + 1
    logits = jax.random.normal(key, (num_tokens, 8))
    with pytest.raises(ValueError, match=r"at most 64 pairs; got 66"):
        pipeline.route_and_dispatch(logits, None, routing=Routing(2), launch=backend_interpret.launch,
                                    num_shared=0, block_m=16)
    weights, ids, dispatched = pipeline.route_and_dispatch(
        logits[:4], None, routing=Routing(2), launch=backend_interpret.launch, num_shared=0, block_m=16
    )
    w_gate = jnp.ones((8, 16, 16))
    plan = pipeline.Plan(config=tile_configs.select(8, 4, "interpret"), dot_precision="ieee",
                         launch=backend_interpret.launch)
    plan = dataclasses.replace(plan, config=dataclasses.replace(plan.config, block_m=32))
    with pytest.raises(ValueError, match=r"dispatched: the metadata is for 144 rows, the plan's tiles need 288 \(9 blocks of 32\)"):
        pipeline.experts(jnp.ones((4, 16)), weights, ids, pipeline.ExpertWeights(w_gate, w_gate, w_gate),
                         plan=plan, dispatched=dispatched)
