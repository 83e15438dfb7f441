"""Gradients of the kernel backends (custom_vjp over Triton kernels) against JAX autodiff of the
reference, on the interpreter."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_moe
from jax_moe import arg_specs, tile_configs
from jax_moe.options import Routing

import numpy_moe

HIDDEN, INTERMEDIATE = 37, 45
ARGNAMES = ("hidden_states", "router_logits", "w_gate", "w_up", "w_down")


def _loss(backend, top_k, cotangent, **options):
    def loss(*args):
        out = jax_moe.fused_moe(*args, top_k=top_k, backend=backend, **options)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return loss


def _grads(backend, inputs, top_k, cotangent, **options):
    return jax.jit(jax.grad(_loss(backend, top_k, cotangent, **options), argnums=range(5)))(*inputs.as_args())


# top_k = 1 with renormalize has weights identically 1: no gradient reaches the logits to compare.
@pytest.mark.parametrize(
    "num_experts,top_k,renormalize", [(3, 1, False), (3, 2, True), (8, 1, False), (8, 2, True), (8, 2, False)]
)
@pytest.mark.parametrize("save_activations", [False, True])
def test_gradients_match_reference(key, num_experts, top_k, renormalize, save_activations):
    shape = arg_specs.MoeShape("odd", num_experts, Routing(top_k), HIDDEN, INTERMEDIATE)
    k_inputs, k_cot = jax.random.split(key)
    inputs = arg_specs.random_inputs(shape, 19, "float32", k_inputs)
    cotangent = jax.random.normal(k_cot, (19, HIDDEN))
    got = _grads("interpret", inputs, top_k, cotangent, renormalize=renormalize, save_activations=save_activations)
    want = _grads("reference", inputs, top_k, cotangent, renormalize=renormalize)
    for name, g, w in zip(ARGNAMES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 1e-4, name


@pytest.mark.parametrize("group_m", [0, 3])
def test_program_orders_of_popular_experts_give_the_reference_gradients(key, group_m):
    """Every token picks expert 0 (19 rows: two 16-row blocks, one of them partly padding): the
    row-block kernels' program orders, by expert (0) or by groups of blocks, cover every tile of
    the forward, the gate/up backward and the input gradient."""
    shape = arg_specs.MoeShape("popular", 4, Routing(2), HIDDEN, INTERMEDIATE)
    k_inputs, k_cot = jax.random.split(key)
    inputs = arg_specs.random_inputs(shape, 19, "float32", k_inputs)
    inputs = dataclasses.replace(inputs, router_logits=inputs.router_logits.at[:, 0].add(20.0))
    cotangent = jax.random.normal(k_cot, (19, HIDDEN))
    config = dataclasses.replace(tile_configs.select(19 * 2, 2, "interpret"), group_m=group_m)
    with tile_configs.use(config):
        got = _grads("interpret", inputs, 2, cotangent)
    want = _grads("reference", inputs, 2, cotangent)
    for name, g, w in zip(ARGNAMES, got, want):
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 1e-4, name


def test_experts_no_token_chose_get_zero_gradient(key):
    shape = arg_specs.MoeShape("sparse", 8, Routing(1), HIDDEN, INTERMEDIATE)
    inputs = arg_specs.random_inputs(shape, 3, "float32", key)
    logits = jnp.full((3, 8), -5.0).at[:, 2].set(5.0).at[1, 6].set(9.0)  # experts 2 and 6 only
    cotangent = jnp.ones((3, HIDDEN))
    args = (inputs.hidden_states, logits, inputs.w_gate, inputs.w_up, inputs.w_down)
    got = jax.grad(_loss("interpret", 1, cotangent), argnums=(2, 3, 4))(*args)
    want = jax.grad(_loss("reference", 1, cotangent), argnums=(2, 3, 4))(*args)
    unused = [0, 1, 3, 4, 5, 7]
    for g, w in zip(got, want):
        assert np.all(np.asarray(g)[unused] == 0)
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 1e-4


def test_zero_routing_weights_give_zero_input_gradient(key):
    """moe_experts with custom routing: a token whose weights are all zero selects nothing."""
    shape = arg_specs.MoeShape("custom", 3, Routing(2), HIDDEN, INTERMEDIATE)
    inputs = arg_specs.random_inputs(shape, 4, "float32", key)
    ids = jnp.array([[0, 1], [1, 2], [2, 0], [0, 2]], jnp.int32)
    weights = jnp.array([[0.3, 0.7], [0.0, 0.0], [1.0, 0.5], [0.2, 0.2]], jnp.float32)
    experts = (inputs.w_gate, inputs.w_up, inputs.w_down)

    def loss(backend):
        def f(x, w, *ws):
            return jnp.sum(jax_moe.moe_experts(x, w, ids, *ws, backend=backend) ** 2)

        return jax.grad(f, argnums=(0, 1, 2, 3, 4))

    got = loss("interpret")(inputs.hidden_states, weights, *experts)
    want = loss("reference")(inputs.hidden_states, weights, *experts)
    assert np.all(np.asarray(got[0])[1] == 0)
    for g, w in zip(got, want):
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 1e-4


def test_bfloat16_gradients(key):
    shape = arg_specs.MoeShape("bf16", 8, Routing(2), HIDDEN, INTERMEDIATE)
    k_inputs, k_cot = jax.random.split(key)
    inputs = arg_specs.random_inputs(shape, 24, "bfloat16", k_inputs)
    cotangent = jax.random.normal(k_cot, (24, HIDDEN))
    got = _grads("interpret", inputs, 2, cotangent)
    want = _grads("reference", inputs, 2, cotangent)
    for name, g, w in zip(ARGNAMES, got, want):
        assert g.dtype == w.dtype, name
        assert numpy_moe.rel_error(g, np.asarray(w.astype(jnp.float32), np.float64)) <= 2e-2, name


def test_value_and_grad_checkpoint_and_leading_dims(key):
    shape = arg_specs.MoeShape("t", 3, Routing(2), HIDDEN, INTERMEDIATE)
    inputs = arg_specs.random_inputs(shape, 6, "float32", key)
    x = inputs.hidden_states.reshape(2, 3, HIDDEN)
    logits = inputs.router_logits.reshape(2, 3, 3)

    def loss(backend):
        layer = jax.checkpoint(lambda *a: jax_moe.fused_moe(*a, top_k=2, backend=backend))
        return lambda *a: jnp.sum(jnp.tanh(layer(*a)))

    args = (x, logits, *inputs.as_args()[2:])
    value, grads = jax.jit(jax.value_and_grad(loss("interpret"), argnums=(0, 1)))(*args)
    ref_value, ref_grads = jax.value_and_grad(loss("reference"), argnums=(0, 1))(*args)
    # The loss sums terms of both signs: relative to their magnitudes, not to the (possibly
    # cancelled) sum (seed 2584588128: a sum of 0.074 off by 1e-6, 1.3e-5 of itself).
    magnitude = jnp.sum(jnp.abs(jnp.tanh(jax_moe.fused_moe(*args, top_k=2, backend="reference"))))
    assert abs(value - ref_value) <= 1e-5 * magnitude
    for g, w in zip(grads, ref_grads):
        assert g.shape == w.shape
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 1e-4


def test_second_derivatives_raise_a_clear_error(key):
    shape = arg_specs.MoeShape("t", 3, Routing(2), HIDDEN, INTERMEDIATE)
    inputs = arg_specs.random_inputs(shape, 2, "float32", key)
    loss = lambda x: jnp.sum(jax_moe.fused_moe(x, *inputs.as_args()[1:], top_k=2, backend="interpret") ** 2)
    with pytest.raises(NotImplementedError, match="higher-order derivatives .* not supported"):
        jax.grad(lambda x: jnp.sum(jax.grad(loss)(x)))(inputs.hidden_states)
    with pytest.raises(NotImplementedError, match="higher-order derivatives"):
        jax.jvp(jax.grad(loss), (inputs.hidden_states,), (inputs.hidden_states,))


def test_reference_matches_finite_differences(key):
    """The yardstick of the tests above, checked against central differences on a tiny layer."""
    shape = arg_specs.MoeShape("tiny", 3, Routing(2), 5, 7)
    inputs = arg_specs.random_inputs(shape, 2, "float32", key)
    # Logits far apart: a finite-difference step must not change which experts are chosen.
    logits = jnp.array([[2.0, 0.0, -2.0], [-2.0, 0.0, 2.0]])
    f = lambda x, l, *ws: jax_moe.reference.fused_moe(x, l, jax_moe.ExpertWeights(*ws), Routing(2))
    # The layer is about cubic in a joint step of x and the three weights, so central differences
    # are off by ~eps^2 / 6 times its third derivative along check_grads' unnormalized random
    # direction: eps = 1e-2 failed 14 of 201 seeds, 1e-3 none (float32 rounding stays well inside).
    check_grads(f, (inputs.hidden_states, logits, *inputs.as_args()[2:]), order=1, modes=("rev",), eps=1e-3, atol=5e-3, rtol=5e-3)
