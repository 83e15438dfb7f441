"""flax_layers.FusedMoE (NNX) and its linen twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import jax_moe
from jax_moe import Routing
from flax_layers import FusedMoE, RoutingStats
from flax_layers import linen as moe_linen

import numpy_moe

H, F, E, K = 24, 40, 6, 2


def _layer(backend="interpret", **kwargs):
    return FusedMoE(H, F, E, Routing(K), backend=backend, rngs=nnx.Rngs(kwargs.pop("seed", 0)), **kwargs)


def _logits(layer, x):
    logits = np.asarray(x, np.float64) @ np.asarray(layer.gate.kernel[...], np.float64)
    if layer.gate.bias is not None:
        logits = logits + np.asarray(layer.gate.bias[...], np.float64)
    return logits


@pytest.mark.parametrize("backend", ["interpret", "reference"])
@pytest.mark.parametrize("use_router_bias", [False, True])
def test_layer_equals_the_numpy_layer_on_its_parameters(key, backend, use_router_bias):
    layer = _layer(backend, use_router_bias=use_router_bias, router_bias_init=nnx.initializers.normal(1.0))
    x = jax.random.normal(key, (2, 7, H))
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    ref = numpy_moe.fused_moe(
        x, _logits(layer, x), layer.wi_0[...], layer.wi_1[...], layer.wo[...], top_k=K
    )
    assert numpy_moe.rel_error(out, ref) <= 1e-5


def test_bfloat16_compute_dtype(key):
    layer = _layer(dtype=jnp.bfloat16)
    x = jax.random.normal(key, (9, H))
    out = layer(x)
    assert out.dtype == jnp.bfloat16
    cast = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))
    ref = numpy_moe.fused_moe(
        cast(x), _logits(layer, x), cast(layer.wi_0[...]), cast(layer.wi_1[...]), cast(layer.wo[...]), top_k=K
    )
    assert numpy_moe.rel_error(out, ref) <= 1e-2


def test_parameter_names_shapes_and_sharding():
    layer = _layer(use_router_bias=True)
    params = nnx.state(layer, nnx.Param)
    shapes = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(params))
    assert shapes == {"gate": {"kernel": (H, E), "bias": (E,)}, "wi_0": (E, H, F), "wi_1": (E, H, F), "wo": (E, F, H)}
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    assert specs["wi_0"] == jax.sharding.PartitionSpec("expert", "embed", "mlp")
    assert specs["wo"] == jax.sharding.PartitionSpec("expert", "mlp", "embed")
    assert specs["gate"]["kernel"] == jax.sharding.PartitionSpec("embed", None)
    renamed = FusedMoE(H, F, E, Routing(K), expert_axis="exp", embed_axis=None, mlp_axis="ff", rngs=nnx.Rngs(0))
    spec = nnx.get_partition_spec(nnx.state(renamed, nnx.Param))
    assert nnx.to_pure_dict(spec)["wi_1"] == jax.sharding.PartitionSpec("exp", None, "ff")


def _linen_params(layer):
    return {"params": nnx.to_pure_dict(nnx.state(layer, nnx.Param))}


def test_linen_twin_has_the_same_parameters_and_results(key):
    """A checkpoint moves both ways between the twins; results are bitwise equal."""
    layer = _layer(use_router_bias=True)
    twin = moe_linen.FusedMoE(H, F, E, Routing(K), backend="interpret", use_router_bias=True)
    x = jax.random.normal(key, (5, H))
    initialized = twin.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, nn.meta.unbox(initialized)) == jax.tree.map(jnp.shape, _linen_params(layer))
    np.testing.assert_array_equal(twin.apply(_linen_params(layer), x), layer(x))
    # and back: a linen checkpoint loaded into an NNX layer
    other = _layer(seed=7, use_router_bias=True)
    nnx.update(other, nnx_state_from_linen(other, initialized))
    np.testing.assert_array_equal(other(x), twin.apply(initialized, x))


def nnx_state_from_linen(layer, variables):
    state = nnx.state(layer, nnx.Param)
    nnx.replace_by_pure_dict(state, nn.meta.unbox(variables)["params"])
    return state


def test_linen_logical_partitioning():
    twin = moe_linen.FusedMoE(H, F, E, Routing(K), backend="reference")
    variables = twin.init(jax.random.key(0), jnp.ones((2, H)))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["wi_0"] == jax.sharding.PartitionSpec("expert", "embed", "mlp")
    assert specs["gate"]["kernel"] == jax.sharding.PartitionSpec("embed", None)


def test_auxiliary_losses_match_numpy(key):
    layer = _layer("reference", load_balancing_loss_weight=0.5, router_z_loss_weight=0.25)
    x = jax.random.normal(key, (3, 11, H)) * 3
    _, aux = nnx.capture(layer, nnx.Intermediate)(x)
    logits = _logits(layer, x).reshape(-1, E)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    _, ids = numpy_moe.softmax_top_k(logits, K, True)
    fraction = np.array([(ids == e).any(axis=1).mean() for e in range(E)])
    load_balancing = E * np.sum(fraction * probs.mean(0))
    z = np.mean((np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)) ** 2)
    np.testing.assert_allclose(aux["load_balancing_loss"][0], 0.5 * load_balancing, rtol=1e-5)
    np.testing.assert_allclose(aux["router_z_loss"][0], 0.25 * z, rtol=1e-5)


def test_auxiliary_losses_are_off_by_default(key):
    layer = _layer("reference")
    _, aux = nnx.capture(layer, nnx.Intermediate)(jax.random.normal(key, (4, H)))
    assert not aux


def test_linen_sows_the_same_auxiliary_losses(key):
    layer = _layer("reference", load_balancing_loss_weight=0.5, router_z_loss_weight=0.25)
    twin = moe_linen.FusedMoE(H, F, E, Routing(K), backend="reference", load_balancing_loss_weight=0.5, router_z_loss_weight=0.25)
    x = jax.random.normal(key, (6, H))
    _, aux = nnx.capture(layer, nnx.Intermediate)(x)
    _, state = twin.apply(_linen_params(layer), x, mutable=["intermediates"])
    for name in ("load_balancing_loss", "router_z_loss"):
        np.testing.assert_allclose(state["intermediates"][name][0], aux[name][0], rtol=1e-6)


def test_capacity_drops_are_counted(key):
    routing = Routing(K, capacity_factor=0.5)
    layer = FusedMoE(H, F, E, routing, backend="reference", rngs=nnx.Rngs(0))
    twin = moe_linen.FusedMoE(H, F, E, routing, backend="reference")
    x = jax.random.normal(key, (20, H))
    _, aux = nnx.capture(layer, nnx.Intermediate)(x)
    assert not aux  # a count, not a loss: training loops sum the intermediates into theirs
    _, stats = nnx.capture(layer, RoutingStats)(x)
    _, ids = numpy_moe.drop_over_capacity(*numpy_moe.softmax_top_k(_logits(layer, x), K, True), E, 0.5)
    assert stats["dropped_pairs"][0] == (ids < 0).sum() > 0
    _, state = twin.apply(_linen_params(layer), x, mutable=["routing_stats"])
    assert state["routing_stats"]["dropped_pairs"][0] == stats["dropped_pairs"][0]


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_nnx_jit_and_grad(key, backend):
    layer = _layer(backend, load_balancing_loss_weight=0.1)
    x = jax.random.normal(key, (8, H))

    @nnx.jit
    def loss_and_grads(model, x):
        def loss(model):
            y, aux = nnx.capture(model, nnx.Intermediate)(x)
            return jnp.mean(y**2) + sum(jax.tree.leaves(aux))

        return nnx.value_and_grad(loss)(model)

    value, grads = loss_and_grads(layer, x)
    ref_layer = _layer("reference", load_balancing_loss_weight=0.1)
    ref_value, ref_grads = loss_and_grads(ref_layer, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(nnx.to_pure_dict(ref_grads))):
        assert np.abs(np.asarray(g)).sum() > 0
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 1e-4


def test_eval_shape_split_merge(key):
    abstract = nnx.eval_shape(lambda: _layer("reference"))
    assert abstract.wi_0.shape == (E, H, F)
    layer = _layer("reference")
    graphdef, state = nnx.split(layer)
    merged = nnx.merge(graphdef, state)
    x = jax.random.normal(key, (3, H))
    np.testing.assert_array_equal(merged(x), layer(x))


def test_orbax_round_trip(key, tmp_path):
    import orbax.checkpoint as ocp

    layer = _layer("reference", seed=3)
    _, state = nnx.split(layer)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "moe", state)
    fresh = _layer("reference", seed=4)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: _layer("reference", seed=4)))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "moe", abstract)
    restored_layer = nnx.merge(graphdef, restored)
    x = jax.random.normal(key, (4, H))
    np.testing.assert_array_equal(restored_layer(x), layer(x))
    assert not np.array_equal(fresh(x), layer(x))


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(top_k=7), ValueError, r"top_k must lie in \[1, 6\] \(the number of experts\); got 7"),
        (dict(top_k=0), ValueError, "top_k must be >= 1; got 0"),
        (dict(hidden_size=0), ValueError, "hidden_size must be >= 1; got 0"),
        (dict(intermediate_size=-3), ValueError, "intermediate_size must be >= 1; got -3"),
        (dict(num_shared_experts=-1), ValueError, "num_shared_experts must be >= 0; got -1"),
        (dict(scoring="tanh"), ValueError, r"scoring must be one of \('softmax', 'sigmoid'\); got 'tanh'"),
        (dict(num_groups=4), ValueError, r"num_groups \(4\) must divide the number of experts E=6"),
        (dict(num_groups=3, top_groups=1, top_k=3), ValueError, "top_k=3 exceeds the 2 experts of the top_groups=1"),
        (dict(activation="gelu"), ValueError, r"activation must be one of \('silu', 'clamped_swiglu'\)"),
        (dict(use_shared_expert_gate=True), ValueError, "use_shared_expert_gate needs num_shared_experts >= 1"),
        (dict(num_experts=2.0), TypeError, "num_experts must be an int; got float 2.0"),
        (dict(backend="cuda"), ValueError, r"backend must be one of .*got 'cuda'"),
        (dict(router_z_loss_weight=-1.0), ValueError, "router_z_loss_weight must be >= 0; got -1.0"),
        (dict(capacity_factor=0.0), ValueError, "capacity_factor must be positive and finite; got 0.0"),
        (dict(capacity_factor="1"), TypeError, "capacity_factor must be a Python number or None; got str '1'"),
        (dict(expert_exchange="ring"), ValueError, r"expert_exchange must be one of \('all_gather', 'all_to_all'\); got 'ring'"),
        (dict(routing=2), TypeError, r"routing must be a jax_moe.Routing \(e.g. jax_moe.Routing\(top_k=2\)\); got int"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs, error, message):
    """Routing fields fail where the Routing is made; the rest where the layer is."""
    routing_fields = {k: v for k, v in kwargs.items() if k in jax_moe.options.ROUTING_KEYWORDS}
    layer_fields = {k: v for k, v in kwargs.items() if k not in routing_fields}

    def args():
        return dict(hidden_size=H, intermediate_size=F, num_experts=E, routing=Routing(**({"top_k": K} | routing_fields))) | layer_fields

    with pytest.raises(error, match=message):
        FusedMoE(**args(), rngs=nnx.Rngs(0))
    with pytest.raises(error, match=message):
        moe_linen.FusedMoE(**args())


@pytest.mark.parametrize("twin", ["nnx", "linen"])
def test_bad_input_fails_before_any_kernel(twin):
    """The layer checks its input's width and dtype itself, naming the argument."""
    if twin == "nnx":
        call = _layer("interpret")
    else:
        layer = moe_linen.FusedMoE(H, F, E, Routing(K), backend="interpret")
        variables = layer.init(jax.random.key(0), jnp.ones((2, H)))
        call = lambda x: layer.apply(variables, x)
    with pytest.raises(ValueError, match=rf"x must have shape \[..., hidden_size\] = \[..., {H}\]; got shape \[3, {H + 1}\]"):
        call(jnp.ones((3, H + 1)))
    with pytest.raises(TypeError, match="x must have a floating-point dtype; got int32"):
        call(jnp.ones((3, H), jnp.int32))


@pytest.mark.gpu
def test_layer_on_gpu_trains_like_the_reference(key):
    layer = FusedMoE(1024, 2048, 8, Routing(2), dtype=jnp.bfloat16, backend="triton", rngs=nnx.Rngs(0))
    ref = FusedMoE(1024, 2048, 8, Routing(2), dtype=jnp.bfloat16, backend="reference", rngs=nnx.Rngs(0))
    x = jax.random.normal(key, (256, 1024), jnp.bfloat16)
    assert numpy_moe.rel_error(layer(x), np.asarray(ref(x).astype(jnp.float32), np.float64)) <= 1e-2
    grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x).astype(jnp.float32) ** 2)))
    for g, w in zip(jax.tree.leaves(nnx.to_pure_dict(grad(layer))), jax.tree.leaves(nnx.to_pure_dict(grad(ref)))):
        assert numpy_moe.rel_error(g, np.asarray(w, np.float64)) <= 2e-2


def test_example_block_trains():
    """examples/train_tiny_moe.py: the loss of the tiny MoE block falls (reference backend here;
    the GPU runs it through triton)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "train_tiny_moe.py"
    spec = importlib.util.spec_from_file_location("train_tiny_moe", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.train("reference", steps=40)
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("module", ["flax_layers.nnx_moe", "flax_layers.linen"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


def test_empty_batch_with_auxiliary_losses(key):
    """No tokens: an empty output and zero auxiliary losses (no NaN from a mean over nothing)."""
    layer = _layer("interpret", load_balancing_loss_weight=0.5, router_z_loss_weight=0.25)
    y, aux = nnx.capture(layer, nnx.Intermediate)(jnp.zeros((0, 3, H)))
    assert y.shape == (0, 3, H)
    assert float(aux["load_balancing_loss"][0]) == 0.0 and float(aux["router_z_loss"][0]) == 0.0


@pytest.mark.parametrize("twin", ["nnx", "linen"])
def test_quantized_layer_holds_frozen_quantized_weights(twin):
    scheme = jax_moe.Quantization("int4", "group", group_size=32, zero_point=True)
    hidden, intermediate = 32, 64
    x = jax.random.normal(jax.random.key(1), (5, hidden))
    if twin == "nnx":
        layer = FusedMoE(hidden, intermediate, E, Routing(K), quantization=scheme, use_expert_bias=True,
                         backend="interpret", rngs=nnx.Rngs(0))
        weights = [getattr(layer, n).get_value() for n in ("wi_0", "wi_1", "wo")]
        assert sorted(nnx.state(layer, nnx.Param).keys()) == ["gate", "wi_0_bias", "wi_1_bias", "wo_bias"]
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.Param))(layer)
        assert set(grads.keys()) == {"gate", "wi_0_bias", "wi_1_bias", "wo_bias"}
        assert float(jnp.abs(grads["gate"]["kernel"][...]).sum()) > 0
        # Every variable, integer ones allowed: the float scales reach jax_moe, which refuses.
        with pytest.raises(ValueError, match="w_gate is a quantized weight, frozen"):
            nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, ...), allow_int=True)(layer)
        out = layer(x)
    else:
        layer = moe_linen.FusedMoE(hidden, intermediate, E, Routing(K), quantization=scheme, backend="reference")
        variables = layer.init(jax.random.key(0), x)
        assert sorted(variables["quantized"]) == ["wi_0", "wi_1", "wo"] and "wi_0" not in variables["params"]
        weights = [variables["quantized"][n] for n in ("wi_0", "wi_1", "wo")]
        grads = jax.grad(lambda p: jnp.sum(layer.apply({**variables, "params": p}, x) ** 2))(variables["params"])
        assert sorted(grads) == ["gate"]
        out = layer.apply(variables, x)
    assert [w.shape for w in weights] == [(E, hidden, intermediate)] * 2 + [(E, intermediate, hidden)]
    assert all(isinstance(w, jax_moe.QuantizedArray) and w.scheme == scheme for w in weights)
    if twin == "nnx":
        router = layer.gate.kernel[...]
        biases = dict(gate_bias=layer.wi_0_bias[...], up_bias=layer.wi_1_bias[...], down_bias=layer.wo_bias[...])
    else:
        router, biases = nn.unbox(variables["params"])["gate"]["kernel"], {}
    ref = jax_moe.fused_moe(x, x @ router, *weights, top_k=K, backend="reference", **biases)
    assert numpy_moe.rel_error(out, np.asarray(ref, np.float64)) <= 1e-5


def test_quantized_layer_checks_its_sizes():
    with pytest.raises(ValueError, match=r"wo \(K = intermediate_size\): K=40 must be a multiple of the group size 32"):
        FusedMoE(32, 40, E, Routing(K), quantization=jax_moe.Quantization("int8", "group", group_size=32),
                 rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="quantization must be a jax_moe.Quantization or None; got str"):
        FusedMoE(32, 64, E, Routing(K), quantization="int8", rngs=nnx.Rngs(0))
