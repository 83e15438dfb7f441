"""The Triton kernels, run by Triton's interpreter, against the float64 numpy re-derivation.

The interpret backend poisons every kernel output before the kernel runs (NaN for floats), so an
element that no program writes reaches the result as NaN, and ``rel_error`` fails on it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import arg_specs, pipeline, stacks, tile_configs
from jax_moe.options import Routing

import numpy_moe

# H and F are odd and straddle the interpreter's 32-wide tiles.
HIDDEN, INTERMEDIATE = 37, 45
EXPERTS_AND_TOP_K = [(1, 1), (3, 1), (3, 2), (8, 1), (8, 2), (8, 6), (60, 1), (60, 2), (60, 6)]


def _shape(num_experts, top_k):
    return arg_specs.MoeShape("odd", num_experts, Routing(top_k), HIDDEN, INTERMEDIATE)


@pytest.mark.parametrize("num_tokens", [0, 1, 5, 64, 257])
@pytest.mark.parametrize("num_experts,top_k", EXPERTS_AND_TOP_K)
def test_fused_moe_matches_numpy(key, num_experts, top_k, num_tokens):
    inputs = arg_specs.random_inputs(_shape(num_experts, top_k), num_tokens, "float32", key)
    out = jax_moe.fused_moe(*inputs.as_args(), top_k=top_k, backend="interpret")
    ref = numpy_moe.fused_moe(*inputs.as_args(), top_k=top_k)
    assert out.shape == (num_tokens, HIDDEN) and out.dtype == jnp.float32
    assert numpy_moe.rel_error(out, ref) <= 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_dtypes(key, dtype):
    shape = _shape(8, 2)
    inputs = arg_specs.random_inputs(shape, 50, dtype, key)
    out = jax_moe.fused_moe(*inputs.as_args(), top_k=2, backend="interpret")
    assert out.dtype == jnp.dtype(dtype)
    ref = numpy_moe.fused_moe(*inputs.as_args(), top_k=2)
    assert numpy_moe.rel_error(out, ref) <= numpy_moe.TOLERANCE[dtype]


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_kernel_matches_numpy(key, renormalize):
    logits = jax.random.normal(key, (70, 60), jnp.float32)
    weights, ids = jax_moe.route(logits, top_k=6, renormalize=renormalize, backend="interpret")
    ref_weights, ref_ids = numpy_moe.softmax_top_k(logits, 6, renormalize)
    np.testing.assert_array_equal(ids, ref_ids)
    assert numpy_moe.rel_error(weights, ref_weights) <= 1e-6


def test_route_kernel_breaks_ties_like_lax_top_k():
    # bf16 logits collide often; -inf logits must still yield distinct experts; lax.top_k puts
    # 0.0 above -0.0.
    logits = jnp.array(
        [[1.0, 3.0, 3.0, 0.5, 3.0], [-jnp.inf, 2.0, -jnp.inf, -jnp.inf, -jnp.inf], [-1.0, -0.0, 0.0, -0.0, -2.0]],
        jnp.bfloat16,
    )
    _, ids = jax_moe.route(logits, top_k=3, backend="interpret")
    _, ref_ids = jax.lax.top_k(logits.astype(jnp.float32), 3)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(ids, [[1, 2, 4], [1, 0, 2], [2, 1, 3]])


def test_leading_dims_and_jit(key):
    shape = _shape(8, 2)
    inputs = arg_specs.random_inputs(shape, 12, "float32", key)
    x = inputs.hidden_states.reshape(2, 2, 3, HIDDEN)
    logits = inputs.router_logits.reshape(2, 2, 3, 8)
    layer = jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=2, renormalize=False, backend="interpret"))
    out = layer(x, logits, inputs.w_gate, inputs.w_up, inputs.w_down)
    ref = numpy_moe.fused_moe(x, logits, inputs.w_gate, inputs.w_up, inputs.w_down, 2, renormalize=False)
    assert out.shape == (2, 2, 3, HIDDEN)
    assert numpy_moe.rel_error(out, ref) <= 1e-5


def test_moe_experts_with_custom_routing(key, rng):
    """Every token on one expert: the most padding-free and most crowded block layout at once."""
    shape = _shape(60, 2)
    inputs = arg_specs.random_inputs(shape, 40, "float32", key)
    ids = np.stack([np.full(40, 7), rng.integers(0, 60, 40)], axis=1).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (40, 2)).astype(np.float32)
    args = (inputs.hidden_states, weights, ids, inputs.w_gate, inputs.w_up, inputs.w_down)
    out = jax_moe.moe_experts(*args, backend="interpret")
    assert numpy_moe.rel_error(out, numpy_moe.experts(*args)) <= 1e-5


@pytest.mark.parametrize("save_activations", [False, True])
def test_128_row_blocks_skip_a_second_half_of_padding(key, save_activations):
    """Experts with 140, 100, 40 and 20 rows in 128-row blocks: expert 0's second block (12 rows)
    and experts 2 and 3 compute their first 64 rows only, expert 1 (100 rows) its whole block.
    The forward and the gradients (whose input-gradient combine halves blocks too) must match the
    reference, with the rows left unwritten never read (the interpreter poisons them)."""
    shape = _shape(4, 2)
    inputs = arg_specs.random_inputs(shape, 150, "float32", key)
    first = np.repeat([0, 1], [140, 10])
    second = np.repeat([1, 2, 3, 3], [90, 40, 10, 10])
    ids = jnp.asarray(np.stack([first, second], axis=1), jnp.int32)
    assert np.bincount(np.asarray(ids).ravel()).tolist() == [140, 100, 40, 20]
    weights = jax.random.uniform(jax.random.fold_in(key, 1), (150, 2), jnp.float32, 0.1, 1.0)

    def loss(backend, x, w_gate, w_up, w_down):
        out = jax_moe.moe_experts(
            x, weights, ids, w_gate, w_up, w_down, backend=backend, save_activations=save_activations
        )
        return jnp.sum(out * jnp.cos(out)), out

    args = (inputs.hidden_states, inputs.w_gate, inputs.w_up, inputs.w_down)
    config = dataclasses.replace(tile_configs.select(300, table="interpret"), block_m=128)
    with tile_configs.use(config):
        (_, out), grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)("interpret", *args)
    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(1, 2, 3, 4), has_aux=True)("reference", *args)
    assert numpy_moe.rel_error(out, numpy_moe.experts(inputs.hidden_states, weights, ids, *args[1:])) <= 1e-5
    assert numpy_moe.rel_error(out, ref) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert numpy_moe.rel_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_capacity_drops_pairs_in_a_fixed_order(key, capacity_factor):
    """Route, layer and gradients with an expert capacity: the same drops as the numpy rule, the
    dropped pairs contributing nothing, on the kernels and the reference alike."""
    inputs = arg_specs.random_inputs(_shape(8, 2), 40, "float32", key)
    routing = Routing(2, capacity_factor=capacity_factor)
    want_weights, want_ids = numpy_moe.drop_over_capacity(
        *numpy_moe.softmax_top_k(inputs.router_logits, 2, True), 8, capacity_factor
    )
    assert 0 < (want_ids < 0).sum() < want_ids.size
    for backend in ("interpret", "reference"):
        weights, ids = jax_moe.route(inputs.router_logits, routing, backend=backend)
        np.testing.assert_array_equal(ids, want_ids)
        assert numpy_moe.rel_error(weights, want_weights) <= 1e-6

    def loss(backend, *args):
        out = jax_moe.fused_moe(*args, routing=routing, backend=backend)
        return jnp.sum(out * jnp.cos(out)), out

    value_and_grad = lambda backend: jax.value_and_grad(functools.partial(loss, backend), argnums=range(5), has_aux=True)
    (_, out), grads = jax.jit(value_and_grad("interpret"))(*inputs.as_args())
    (_, ref), ref_grads = value_and_grad("reference")(*inputs.as_args())
    assert numpy_moe.rel_error(out, numpy_moe.experts(inputs.hidden_states, want_weights, want_ids, *inputs.as_args()[2:])) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert numpy_moe.rel_error(grad, np.asarray(ref_grad, np.float64)) <= 1e-5
    # moe_experts takes the dropped pairs (-1) as route gives them, under jit too.
    experts_out = jax.jit(lambda *a: jax_moe.moe_experts(*a, backend="interpret"))(
        inputs.hidden_states, jnp.asarray(want_weights, jnp.float32), jnp.asarray(want_ids), *inputs.as_args()[2:]
    )
    assert numpy_moe.rel_error(experts_out, np.asarray(out, np.float64)) <= 1e-5


def _tiles_that_follow_the_batch(monkeypatch):
    """Tile tables as a GPU's: narrower K steps below 64 pairs, so the order of a token's
    reductions follows the batch it is in."""
    select = pipeline._tile_config

    def by_batch(backend, num_pairs, *args):
        config = select(backend, num_pairs, *args)
        if num_pairs > 64:
            return config
        narrow = dataclasses.replace(config.gate_up, block_k=8)
        return dataclasses.replace(config, gate_up=narrow, down=dataclasses.replace(config.down, block_k=8))

    monkeypatch.setattr(pipeline, "_tile_config", by_batch)


def test_batch_invariant_outputs_do_not_depend_on_the_batch(key, monkeypatch):
    _tiles_that_follow_the_batch(monkeypatch)
    inputs = arg_specs.random_inputs(_shape(8, 2), 96, "float32", key)
    x, logits, *weights = inputs.as_args()

    def layer(tokens, batch_invariant):
        return jax.jit(lambda *a: jax_moe.fused_moe(
            *a, top_k=2, backend="interpret", batch_invariant=batch_invariant, return_routing=True
        ))(x[:tokens], logits[:tokens], *weights)

    whole, whole_weights, _ = layer(96, True)
    assert numpy_moe.rel_error(whole, numpy_moe.fused_moe(x, logits, *weights, top_k=2)) <= 1e-5
    for tokens in (1, 3, 20):
        out, routing_weights, _ = layer(tokens, True)
        np.testing.assert_array_equal(out, whole[:tokens])
        np.testing.assert_array_equal(routing_weights, whole_weights[:tokens])
    # The yardstick: without the option the same tokens come out in other bits here.
    assert not np.array_equal(layer(20, False)[0], layer(96, False)[0][:20])


def test_batch_invariant_needs_a_kernel_backend(key):
    inputs = arg_specs.random_inputs(_shape(8, 2), 4, "float32", key)
    with pytest.raises(ValueError, match="batch_invariant=True needs a kernel backend"):
        jax_moe.fused_moe(*inputs.as_args(), top_k=2, backend="reference", batch_invariant=True)
    with pytest.raises(TypeError, match="batch_invariant must be a bool; got str"):
        jax_moe.route(inputs.router_logits, top_k=2, backend="interpret", batch_invariant="yes")
    with pytest.raises(ValueError, match="can't take a routing with a capacity_factor"):
        jax_moe.fused_moe(*inputs.as_args(), top_k=2, capacity_factor=1.0, backend="interpret", batch_invariant=True)
    shared = arg_specs.random_inputs(
        arg_specs.MoeShape("gated", 8, Routing(2), HIDDEN, INTERMEDIATE, shared_intermediate=INTERMEDIATE,
                           shared_gate=True), 4, "float32", key,
    )
    with pytest.raises(ValueError, match="can't take a shared_gate"):
        jax_moe.fused_moe(*shared.as_args(), **shared.extras, top_k=2, backend="interpret", batch_invariant=True)


def test_out_of_range_ids_under_jit_poison_their_token(key):
    shape = _shape(3, 2)
    inputs = arg_specs.random_inputs(shape, 3, "float32", key)
    ids = jnp.array([[0, 1], [2, 3], [1, 2]], jnp.int32)  # token 1 names expert 3 of 3
    weights = jnp.full((3, 2), 0.5, jnp.float32)
    layer = jax.jit(lambda i: jax_moe.moe_experts(inputs.hidden_states, weights, i, inputs.w_gate, inputs.w_up, inputs.w_down, backend="interpret"))
    out = np.asarray(layer(ids))
    assert np.isnan(out[1]).all()
    assert np.isfinite(out[[0, 2]]).all()


def test_many_experts_and_wide_top_k(key):
    """E = 160 (not a power of two) and top_k = 10 (beyond 8)."""
    shape = arg_specs.MoeShape("wide", 160, Routing(10), HIDDEN, INTERMEDIATE)
    inputs = arg_specs.random_inputs(shape, 33, "float32", key)
    out = jax_moe.fused_moe(*inputs.as_args(), top_k=10, backend="interpret")
    assert numpy_moe.rel_error(out, numpy_moe.fused_moe(*inputs.as_args(), top_k=10)) <= 1e-5


def test_wide_column_tiles_combine_in_column_chunks(key):
    """Down-projection and input-gradient tiles of 128 columns sum a token's partial rows 64
    columns at a time; with H = 100 the second chunk is part padding. The forward and the
    gradients (whose input-gradient combine is the same kernel) must match the reference."""
    shape = arg_specs.MoeShape("wide-columns", 8, Routing(3), 100, INTERMEDIATE)
    inputs = arg_specs.random_inputs(shape, 40, "float32", key)
    wide = tile_configs.GemmTiles(block_n=128, block_k=32, num_warps=4, num_stages=1)
    config = dataclasses.replace(tile_configs.select(120, table="interpret"), down=wide, input_grad=wide)

    def loss(backend, x, w_down):
        args = dataclasses.replace(inputs, hidden_states=x, w_down=w_down).as_args()
        out = jax_moe.fused_moe(*args, top_k=3, backend=backend)
        return jnp.sum(out * jnp.cos(out)), out

    args = (inputs.hidden_states, inputs.w_down)
    with tile_configs.use(config):
        (_, out), grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)("interpret", *args)
    (_, ref), ref_grads = jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)("reference", *args)
    assert numpy_moe.rel_error(out, numpy_moe.fused_moe(*inputs.as_args(), top_k=3)) <= 1e-5
    assert numpy_moe.rel_error(out, ref) <= 1e-5
    for grad, ref_grad in zip(grads, ref_grads):
        assert numpy_moe.rel_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("intermediate", [48, 50])
def test_tma_weight_tiles_match_the_reference(key, intermediate):
    """TMA weight tiles (the interpreter emulates the descriptors) give the reference's results,
    forward and backward, shared experts included; F = 50 fp32 rows are not 16-byte aligned, so the
    gate/up GEMMs fall back to pointer loads there while the down projection keeps TMA."""
    shape = arg_specs.MoeShape("tma", 6, Routing(2), 64, intermediate, shared_intermediate=intermediate)
    inputs = arg_specs.random_inputs(shape, 20, "float32", key)
    config = dataclasses.replace(tile_configs.select(20 * shape.slots, table="interpret"), tma=True)
    plan = dataclasses.replace(pipeline.make_plan(
        "interpret", jax_moe.ExpertWeights(inputs.w_gate, inputs.w_up, inputs.w_down), num_tokens=20, top_k=2,
        dtype=jnp.float32, save_activations=False, activation=jax_moe.SILU,
    ), config=config, tma=True)
    assert pipeline._use_tma(plan, intermediate, jnp.float32) == (intermediate == 48)
    assert pipeline._use_tma(plan, 64, jnp.float32)

    def loss(backend, x):
        return jnp.sum(jax_moe.fused_moe(x, *inputs.as_args()[1:], **inputs.extras, routing=shape.routing, backend=backend) ** 2)

    with tile_configs.use(config):
        value, grad = jax.value_and_grad(functools.partial(loss, "interpret"))(inputs.hidden_states)
    want_value, want_grad = jax.value_and_grad(functools.partial(loss, "reference"))(inputs.hidden_states)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    assert numpy_moe.rel_error(grad, np.asarray(want_grad, np.float64)) <= 1e-5


@pytest.mark.parametrize(
    "jax_triton,triton,capability,expected",
    [("0.3.1", "3.6.0", "9.0", False), ("0.4.1", "3.7.1", "8.0", False), ("0.4.1", "3.7.1", "9.0", True)],
)
def test_tma_is_switched_off_where_the_gpu_cannot_give_it(monkeypatch, jax_triton, triton, capability, expected):
    """A config's ``tma`` runs TMA tiles on a Hopper GPU with a stack that gives them (jax-triton
    0.4); on jax-triton 0.3.x or an older GPU it runs pointer loads. The interpreter always can."""
    fake = stacks.Installed(python="3.12.0", jax="0.11.2", jaxlib="0.11.2", jax_triton=jax_triton, triton=triton,
                            cuda_plugins={})
    gpu = type("Gpu", (), {"compute_capability": capability, "platform": "gpu"})()
    monkeypatch.setattr(stacks, "installed", lambda: fake)
    monkeypatch.setattr(jax, "devices", lambda *a: [gpu])
    pipeline.tma_available.cache_clear()
    try:
        assert pipeline.tma_available("triton") == expected
        assert pipeline.tma_available("interpret")
    finally:
        pipeline.tma_available.cache_clear()
