"""jax_moe.reference against the float64 numpy re-derivation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import arg_specs
from jax_moe.options import Routing

import numpy_moe

SMALL = arg_specs.MoeShape("small", num_experts=8, routing=Routing(2), hidden=48, intermediate=40)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("logits_dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_route_matches_numpy(key, renormalize, logits_dtype):
    logits = jax.random.normal(key, (33, 60), jnp.float32).astype(logits_dtype)
    weights, ids = jax_moe.reference.route(logits, Routing(6, renormalize=renormalize))
    ref_weights, ref_ids = numpy_moe.softmax_top_k(logits, 6, renormalize)
    assert weights.dtype == jnp.float32 and ids.dtype == jnp.int32
    np.testing.assert_array_equal(ids, ref_ids)
    assert numpy_moe.rel_error(weights, ref_weights) <= 1e-6
    if renormalize:
        np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, rtol=1e-6)


def test_route_ties_go_to_the_lower_expert():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.5, 3.0]])
    _, ids = jax_moe.reference.route(logits, Routing(3))
    np.testing.assert_array_equal(ids, [[1, 2, 4]])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_fused_moe_matches_numpy(key, dtype):
    inputs = arg_specs.random_inputs(SMALL, 21, dtype, key)
    out = jax_moe.reference.fused_moe(*inputs.as_args()[:2], jax_moe.ExpertWeights(*inputs.as_args()[2:]), SMALL.routing)
    ref = numpy_moe.fused_moe(*inputs.as_args(), top_k=SMALL.top_k)
    assert out.dtype == jnp.dtype(dtype) and out.shape == ref.shape
    assert numpy_moe.rel_error(out, ref) <= numpy_moe.TOLERANCE[dtype]


def test_moe_experts_sums_repeated_experts(key):
    """Custom routing may name one expert twice for a token: both contributions count."""
    inputs = arg_specs.random_inputs(SMALL, 4, "float32", key)
    weights = jnp.full((4, 2), 0.5, jnp.float32)
    twice = jnp.array([[3, 3]] * 4, jnp.int32)
    once = jnp.array([[3]] * 4, jnp.int32)
    experts = jax_moe.ExpertWeights(inputs.w_gate, inputs.w_up, inputs.w_down)
    both = jax_moe.reference.moe_experts(inputs.hidden_states, weights, twice, experts)
    single = jax_moe.reference.moe_experts(inputs.hidden_states, weights[:, :1] * 2, once, experts)
    np.testing.assert_allclose(both, single, rtol=1e-5, atol=1e-6)


def test_numpy_reference_matches_a_hand_computed_token():
    """Pins the yardstick itself on one token, two experts, computed step by step."""
    x = np.array([[1.0, -2.0]])
    logits = np.array([[0.0, np.log(3.0)]])  # softmax: [0.25, 0.75]
    w_gate = np.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # expert 0: x0, expert 1: x1
    w_up = np.ones((2, 2, 1))  # x0 + x1 = -1
    w_down = np.array([[[2.0, 0.0]], [[0.0, 1.0]]])
    silu = lambda v: v / (1 + np.exp(-v))
    expected = 0.25 * (silu(1.0) * -1.0) * np.array([2.0, 0.0]) + 0.75 * (silu(-2.0) * -1.0) * np.array([0.0, 1.0])
    out = numpy_moe.fused_moe(x, logits, w_gate, w_up, w_down, top_k=2, renormalize=True)
    np.testing.assert_allclose(out[0], expected, rtol=1e-12)
