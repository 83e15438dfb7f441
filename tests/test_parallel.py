"""Multi-device layouts (``jax_moe.sharding``) on 8 CPU devices (tests/conftest.py asks for them):
data, expert and tensor parallel layers, FSDP-style weights and their combinations, forward and
gradients, against the same call on one device; the Flax layers and the sharded training example."""

import dataclasses
import functools
import importlib
import itertools
import math
import pathlib
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_moe
from jax_moe import Routing
from flax_layers import FusedMoE
from flax_layers import linen as moe_linen
from jax_moe import arg_specs, backend_interpret, pipeline, sharding

import numpy_moe

CPUS = jax.devices("cpu")
BATCH, SEQ = 8, 4  # 32 tokens
PLAIN = arg_specs.MoeShape("plain", num_experts=8, routing=Routing(2), hidden=8, intermediate=16)
# Every option at once: sigmoid scores, groups, selection bias, expert biases, gpt-oss's clamped
# activation, two gated shared experts.
ALL_OPTIONS = arg_specs.MoeShape(
    "all options", num_experts=8, hidden=8, intermediate=16,
    routing=Routing(2, scoring="sigmoid", num_groups=4, top_groups=2, routed_scaling_factor=2.5),
    selection_bias=True, expert_bias=True, activation=jax_moe.GPT_OSS_SWIGLU, shared_intermediate=32, shared_gate=True,
)
COLLECTIVES = r"(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"


def _mesh(shape, names, axis_types=None):
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=CPUS[: math.prod(shape)])


def _specs(tokens=P(), expert=None, tensor=None, hidden=None) -> dict:
    """Every argument's PartitionSpec: the token dims of the activations, the expert, F and H
    dims of the weights."""
    return dict(
        hidden_states=tokens, router_logits=tokens, w_gate=P(expert, hidden, tensor),
        w_up=P(expert, hidden, tensor), w_down=P(expert, tensor, hidden), gate_bias=P(expert, tensor),
        up_bias=P(expert, tensor), down_bias=P(expert, hidden), shared_w_gate=P(None, hidden, tensor),
        shared_w_up=P(None, hidden, tensor), shared_w_down=P(None, tensor, hidden), shared_gate=P(hidden),
        selection_bias=P(),
    )


# name: (mesh shape, mesh axes, argument specs)
LAYOUTS = {
    "data": ((8,), ("data",), _specs(P("data"))),
    "data on both dims, 2x4": ((2, 4), ("data", "seq"), _specs(P("data", "seq"))),
    "data on both axes, 2x4": ((2, 4), ("a", "b"), _specs(P(("a", "b")))),
    "expert": ((8,), ("expert",), _specs(expert="expert")),
    "data x expert": ((2, 4), ("data", "expert"), _specs(P(("data", "expert")), expert="expert")),
    # Experts split over both axes, listed against the mesh's order; the tokens over one of them.
    "expert on both axes": ((2, 4), ("a", "b"), _specs(P("a"), expert=("b", "a"))),
    "tensor": ((2, 4), ("data", "tensor"), _specs(P("data"), tensor="tensor")),
    "expert x tensor": ((2, 4), ("expert", "tensor"), _specs(expert="expert", tensor="tensor")),
    "data x expert x tensor": (
        (2, 2, 2), ("data", "expert", "tensor"), _specs(P("data", "expert"), expert="expert", tensor="tensor")
    ),
    "fsdp": ((8,), ("data",), _specs(P("data"), hidden="data")),
    "fsdp x expert": ((2, 4), ("data", "expert"), _specs(P("data"), expert="expert", hidden="data")),
}


@functools.cache
def _arrays(shape: arg_specs.MoeShape, dtype: str = "float32") -> dict:
    inputs = arg_specs.random_inputs(shape, BATCH * SEQ, dtype, jax.random.key(0))
    arrays = dict(
        hidden_states=inputs.hidden_states.reshape(BATCH, SEQ, -1),
        router_logits=inputs.router_logits.reshape(BATCH, SEQ, -1),
        w_gate=inputs.w_gate, w_up=inputs.w_up, w_down=inputs.w_down, **inputs.extras,
    )
    return jax.device_put(arrays, CPUS[0])


def _cotangent(hidden):
    return jnp.cos(jnp.arange(BATCH * SEQ * hidden, dtype=jnp.float32)).reshape(BATCH, SEQ, hidden)


def _loss(backend, shape: arg_specs.MoeShape, **options):
    def loss(arrays):
        arrays = dict(arrays)
        args = [arrays.pop(name) for name in ("hidden_states", "router_logits", "w_gate", "w_up", "w_down")]
        out = jax_moe.fused_moe(*args, **arrays, **shape.static_options(), backend=backend, **options)
        return jnp.sum(out.astype(jnp.float32) * _cotangent(shape.hidden)), out

    return loss


def _value_and_grads(backend, shape, arrays, **options):
    """(output, gradients of every array, compiled HLO text) of one jitted call."""
    compiled = jax.jit(jax.value_and_grad(_loss(backend, shape, **options), has_aux=True)).lower(arrays).compile()
    (_, out), grads = compiled(arrays)
    return out, grads, compiled.as_text()


@functools.cache
def _one_device(shape: arg_specs.MoeShape, dtype: str = "float32"):
    """The reference on one device: the output and the gradients."""
    out, grads, _ = _value_and_grads("reference", shape, _arrays(shape, dtype))
    return out, grads


def _on_mesh(arrays: dict, mesh, specs: dict) -> dict:
    return {name: jax.device_put(a, NamedSharding(mesh, specs[name])) for name, a in arrays.items()}


def _padded(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _collective_shapes(hlo: str, op: str) -> set:
    """The shapes of the arrays the collectives ``op`` produce in compiled HLO text."""
    shapes = set()
    for result in re.findall(r"= (\(?[^=]*?\)?) " + op + r"(?:-start)?\(", hlo):
        shapes |= {tuple(map(int, dims.split(","))) for dims in re.findall(r"\[([\d,]+)\]", result)}
    return shapes


def _shard_shapes(array, spec: P, mesh) -> set:
    """The shapes of ``array`` with any subset of its dims split as ``spec`` says."""
    options = []
    for size, entry in zip(array.shape, _padded(spec, array.ndim)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        options.append({size, size // math.prod(mesh.shape[a] for a in axes)})
    return set(itertools.product(*options))


def _check_parity(out, grads, want_out, want_grads, tolerance):
    assert numpy_moe.rel_error(out, np.asarray(want_out, np.float64)) <= tolerance
    for name, want in want_grads.items():
        if name == "selection_bias":
            continue  # no gradient by design (stop_gradient): zeros on both
        assert numpy_moe.rel_error(grads[name], np.asarray(want, np.float64)) <= tolerance, name


@pytest.mark.parametrize(
    "layout,backend",
    [(name, "interpret") for name in LAYOUTS] + [("data", "reference"), ("data x expert x tensor", "reference")],
)
def test_layout_matches_one_device(layout, backend):
    mesh_shape, axes, specs = LAYOUTS[layout]
    mesh = _mesh(mesh_shape, axes)
    arrays = _on_mesh(_arrays(PLAIN), mesh, specs)
    out, grads, hlo = _value_and_grads(backend, PLAIN, arrays)
    _check_parity(out, grads, *_one_device(PLAIN), 1e-5)

    # The output keeps the tokens' sharding; each gradient its argument's.
    assert _padded(out.sharding.spec, 3) == _padded(specs["hidden_states"], 3)
    for name, grad in grads.items():
        assert _padded(grad.sharding.spec, grad.ndim) == _padded(specs[name], grad.ndim), name

    weight_shapes = set().union(*(_shard_shapes(arrays[n], specs[n], mesh) for n in ("w_gate", "w_up", "w_down")))
    if layout.startswith("data on") or layout == "data":
        # Data parallel: no collective but the sums of the weight gradients.
        assert not re.search(r"all-gather|reduce-scatter|all-to-all|collective-permute", hlo)
        assert {(8, 8, 16), (8, 16, 8)} <= _collective_shapes(hlo, "all-reduce") <= weight_shapes
    if layout == "fsdp":
        # The weights are gathered (and their gradients reduce-scattered), never the activations.
        assert {(8, 8, 16), (8, 16, 8)} <= _collective_shapes(hlo, "all-gather") <= weight_shapes


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_every_family_option_in_a_data_expert_tensor_layout(backend):
    mesh_shape, axes, specs = LAYOUTS["data x expert x tensor"]
    arrays = _on_mesh(_arrays(ALL_OPTIONS), _mesh(mesh_shape, axes), specs)
    out, grads, _ = _value_and_grads(backend, ALL_OPTIONS, arrays)
    _check_parity(out, grads, *_one_device(ALL_OPTIONS), 1e-5)


def test_saved_activations_and_bfloat16_in_a_data_expert_tensor_layout():
    mesh_shape, axes, specs = LAYOUTS["data x expert x tensor"]
    mesh = _mesh(mesh_shape, axes)
    out, grads, _ = _value_and_grads("interpret", PLAIN, _on_mesh(_arrays(PLAIN), mesh, specs), save_activations=True)
    _check_parity(out, grads, *_one_device(PLAIN), 1e-5)
    out, grads, _ = _value_and_grads("interpret", PLAIN, _on_mesh(_arrays(PLAIN, "bfloat16"), mesh, specs))
    assert out.dtype == jnp.bfloat16
    _check_parity(out, grads, *_one_device(PLAIN, "bfloat16"), 1e-2)


def test_route_and_moe_experts_in_a_data_expert_layout():
    mesh = _mesh((2, 4), ("data", "expert"))
    specs = _specs(P(("data", "expert")), expert="expert")
    arrays = _arrays(PLAIN)
    sharded = _on_mesh(arrays, mesh, specs)
    route = jax.jit(lambda logits: jax_moe.route(logits, top_k=2, backend="interpret"))
    weights, ids = route(sharded["router_logits"])
    want_weights, want_ids = jax_moe.route(arrays["router_logits"], top_k=2, backend="reference")
    assert weights.sharding.spec == ids.sharding.spec == P(("data", "expert"), None, None)
    np.testing.assert_array_equal(ids, want_ids)
    assert numpy_moe.rel_error(weights, np.asarray(want_weights, np.float64)) <= 1e-6

    def loss(backend, expert_ids, x, routing_weights, w_gate, w_up, w_down):
        out = jax_moe.moe_experts(x, routing_weights, expert_ids, w_gate, w_up, w_down, backend=backend)
        return jnp.sum(out * _cotangent(PLAIN.hidden)), out

    value_and_grads = lambda backend, expert_ids: jax.value_and_grad(
        functools.partial(loss, backend, expert_ids), argnums=range(5), has_aux=True
    )
    experts = ("w_gate", "w_up", "w_down")
    (_, out), grads = jax.jit(value_and_grads("interpret", ids))(
        sharded["hidden_states"], weights, *(sharded[n] for n in experts)
    )
    (_, want), want_grads = value_and_grads("reference", want_ids)(
        arrays["hidden_states"], want_weights, *(arrays[n] for n in experts)
    )
    assert out.sharding.spec == P(("data", "expert"), None, None)
    assert numpy_moe.rel_error(out, np.asarray(want, np.float64)) <= 1e-5
    for got, want in zip(grads, want_grads):
        assert numpy_moe.rel_error(got, np.asarray(want, np.float64)) <= 1e-5


def test_eager_call_places_unsharded_weights_on_the_tokens_mesh():
    mesh = _mesh((8,), ("data",))
    arrays = _arrays(PLAIN)
    x, logits = (jax.device_put(arrays[n], NamedSharding(mesh, P("data"))) for n in ("hidden_states", "router_logits"))
    out = jax_moe.fused_moe(x, logits, arrays["w_gate"], arrays["w_up"], arrays["w_down"], top_k=2, backend="reference")
    assert out.sharding.spec == P("data", None, None)
    assert numpy_moe.rel_error(out, np.asarray(_one_device(PLAIN)[0], np.float64)) <= 1e-5


def test_dispatch_gives_absent_pairs_no_rows():
    """Negative ids (another device's experts) are skipped; the present pairs are sorted as if
    they were alone, stably."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=(37, 3)).astype(np.int32)
    ids[rng.random(ids.shape) < 0.4] = -1
    block_m = 16
    sorted_pairs, block_expert, expert_row_end = map(np.asarray, pipeline.dispatch(
        jnp.asarray(ids), num_experts=5, block_m=block_m, launch=backend_interpret.launch, hist_block=32,
        rank_block=16, chunk_programs=3,
    ))
    flat = ids.reshape(-1)
    num_pairs = flat.size
    counts = np.bincount(flat[flat >= 0], minlength=5)
    np.testing.assert_array_equal(expert_row_end[:5], np.cumsum(-(-counts // block_m) * block_m))
    real = sorted_pairs[sorted_pairs < num_pairs]
    np.testing.assert_array_equal(real, np.concatenate([np.flatnonzero(flat == e) for e in range(5)]))
    assert np.all(sorted_pairs[sorted_pairs >= num_pairs] == num_pairs)
    used = block_expert >= 0
    assert used.sum() == np.sum(-(-counts // block_m))
    for block in np.flatnonzero(used):
        rows = sorted_pairs[block * block_m:(block + 1) * block_m]
        assert np.all(flat[rows[rows < num_pairs]] == block_expert[block])


def test_auto_mesh_interpret_warns_and_explicit_axes_spreads_it():
    mesh = _mesh((2, 4), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)
    specs = _specs(P("data"), expert="expert")
    arrays = _arrays(PLAIN)
    sharded = _on_mesh(arrays, mesh, specs)
    names = ("hidden_states", "router_logits", "w_gate", "w_up", "w_down")
    layer = lambda *args: jax_moe.fused_moe(*args, top_k=2, backend="interpret")
    with pytest.warns(UserWarning, match="host callbacks can't run inside XLA's partitioner"):
        jax.jit(layer).lower(*(sharded[n] for n in names))
    with jax.set_mesh(mesh):
        spread = jax.sharding.explicit_axes(layer, in_sharding=tuple(specs[n] for n in names))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = jax.jit(spread)(*(sharded[n] for n in names))
    assert out.sharding.spec == P("data")
    assert numpy_moe.rel_error(out, np.asarray(_one_device(PLAIN)[0], np.float64)) <= 1e-5
    # Outside jax.jit the arrays say how they are split: the layer spreads without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = layer(*(sharded[n] for n in names))
    assert out.sharding.spec == P("data", None, None)
    assert numpy_moe.rel_error(out, np.asarray(_one_device(PLAIN)[0], np.float64)) <= 1e-5


@pytest.fixture
def deferred_reference(monkeypatch):
    """The reference backend laid out as the triton backend is on a mesh of Auto axes: when XLA
    partitions the program (the interpret backend's host callbacks can't run there)."""
    monkeypatch.setattr(sharding, "DEFERRED_BACKENDS", ("reference",))


@pytest.mark.parametrize("layout", [
    "data", "data on both dims, 2x4", "expert", "data x expert", "expert on both axes", "tensor",
    "data x expert x tensor", "fsdp", "fsdp x expert",
])
def test_auto_mesh_layouts_are_read_when_xla_partitions(deferred_reference, layout):
    mesh_shape, axes, specs = LAYOUTS[layout]
    mesh = _mesh(mesh_shape, axes, axis_types=(AxisType.Auto,) * len(axes))
    arrays = _on_mesh(_arrays(PLAIN), mesh, specs)
    out, grads, hlo = _value_and_grads("reference", PLAIN, arrays)
    assert "custom_partitioning" in hlo  # the layer went through the partitioner
    _check_parity(out, grads, *_one_device(PLAIN), 1e-5)
    assert _padded(out.sharding.spec, 3) == _padded(specs["hidden_states"], 3)
    for name, grad in grads.items():
        assert _padded(grad.sharding.spec, grad.ndim) == _padded(specs[name], grad.ndim), name
    assert "all-to-all" not in hlo  # nothing resharded behind the layer's back
    if layout in ("data", "data on both dims, 2x4"):
        assert not re.search(r"all-gather|reduce-scatter", hlo)
    if layout == "fsdp":
        weight_shapes = set().union(*(_shard_shapes(arrays[n], specs[n], mesh) for n in ("w_gate", "w_up", "w_down")))
        assert {(8, 8, 16), (8, 16, 8)} <= _collective_shapes(hlo, "all-gather") <= weight_shapes


def test_auto_mesh_options_route_and_moe_experts_when_xla_partitions(deferred_reference, ragged_all_to_all_on_cpu):
    """Every family option, the all-to-all exchange and a capacity; ``route`` and
    ``moe_experts``; inputs placed by ``jax.jit``'s own in_shardings."""
    mesh_shape, axes, specs = LAYOUTS["data x expert x tensor"]
    mesh = _mesh(mesh_shape, axes, axis_types=(AxisType.Auto,) * len(axes))
    arrays = _on_mesh(_arrays(ALL_OPTIONS), mesh, specs)
    out, grads, _ = _value_and_grads("reference", ALL_OPTIONS, arrays, expert_exchange="all_to_all")
    _check_parity(out, grads, *_one_device(ALL_OPTIONS), 1e-5)

    shape = dataclasses.replace(PLAIN, routing=Routing(2, capacity_factor=1.0))
    mesh_shape, axes, specs = LAYOUTS["data x expert"]
    mesh = _mesh(mesh_shape, axes, axis_types=(AxisType.Auto,) * len(axes))
    shardings = {name: NamedSharding(mesh, specs[name]) for name in _arrays(shape)}
    compiled = jax.jit(jax.value_and_grad(_loss("reference", shape), has_aux=True), in_shardings=(shardings,))
    with jax.set_mesh(mesh):  # arrays placed by in_shardings carry no mesh: the context names it
        (_, out), grads = compiled(jax.device_get(_arrays(shape)))
    _check_parity(out, grads, *_each_devices_tokens_alone(_arrays(shape), mesh, specs["hidden_states"], shape), 1e-5)

    arrays = _arrays(PLAIN)
    sharded = _on_mesh(arrays, mesh, specs)
    weights, ids = jax.jit(lambda logits: jax_moe.route(logits, top_k=2, backend="reference"))(sharded["router_logits"])
    want_weights, want_ids = jax_moe.route(arrays["router_logits"], top_k=2, backend="reference")
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.sharding.spec == P(("data", "expert"))

    def loss(backend, x, routing_weights, w_gate, w_up, w_down, expert_ids):
        out = jax_moe.moe_experts(x, routing_weights, expert_ids, w_gate, w_up, w_down, backend=backend)
        return jnp.sum(out * _cotangent(PLAIN.hidden))

    experts = [sharded[n] for n in ("w_gate", "w_up", "w_down")]
    grads = jax.jit(jax.grad(functools.partial(loss, "reference"), argnums=range(5)))(
        sharded["hidden_states"], weights, *experts, ids
    )
    want = jax.grad(functools.partial(loss, "reference"), argnums=range(5))(
        arrays["hidden_states"], want_weights, *(arrays[n] for n in ("w_gate", "w_up", "w_down")), want_ids
    )
    for got, expected in zip(grads, want):
        assert numpy_moe.rel_error(got, np.asarray(expected, np.float64)) <= 1e-5


FLAX_RULES = (("expert", "expert"), ("mlp", "tensor"), ("embed", None))


def test_nnx_layer_takes_its_layout_from_the_mesh_and_its_axis_names():
    mesh = _mesh((2, 2, 2), ("data", "expert", "tensor"))
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, 16))
    make = lambda: FusedMoE(16, 8, 8, Routing(2), backend="reference", use_expert_bias=True, num_shared_experts=1,
                            bias_init=nnx.initializers.normal(0.1), rngs=nnx.Rngs(0))
    single = make()

    def loss(layer, x):
        return jnp.sum(layer(x) * _cotangent(16))

    want, want_grads = nnx.jit(nnx.value_and_grad(loss))(single, x)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(FLAX_RULES):
        layer = make()
        assert jax.typeof(layer.wi_0[...]).sharding.spec == P("expert", None, "tensor")
        assert jax.typeof(layer.wo[...]).sharding.spec == P("expert", "tensor", None)
        got, grads = nnx.jit(nnx.value_and_grad(loss))(layer, jax.device_put(x, NamedSharding(mesh, P("data", "expert"))))
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads)):
        assert numpy_moe.rel_error(g[...], np.asarray(w[...], np.float64)) <= 1e-5, path


def test_linen_layer_on_a_mesh_matches_one_device():
    mesh = _mesh((2, 4), ("expert", "tensor"))
    layer = moe_linen.FusedMoE(16, 8, 8, Routing(2), backend="interpret")
    x = jax.random.normal(jax.random.key(2), (BATCH * SEQ, 16))
    params = layer.init(jax.random.key(0), x)
    want = layer.apply(params, x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(params), mesh, FLAX_RULES)
    placed = jax.device_put(nn.meta.unbox(params), nn.meta.unbox(shardings))
    assert placed["params"]["wi_1"].sharding.spec == P("expert", None, "tensor")
    with jax.set_mesh(mesh), nn.logical_axis_rules(FLAX_RULES):
        got = jax.jit(layer.apply)(placed, x)
    assert numpy_moe.rel_error(got, np.asarray(want, np.float64)) <= 1e-5


def test_layer_sizes_the_mesh_axes_do_not_divide_raise():
    mesh = _mesh((2, 4), ("data", "expert"))
    with jax.set_mesh(mesh), nnx.logical_axis_rules((("mlp", None), ("embed", None))):
        with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by 4.*'expert'"):
            FusedMoE(16, 8, 6, Routing(2), backend="reference", rngs=nnx.Rngs(0))
    with jax.set_mesh(mesh), nn.logical_axis_rules((("mlp", "data"), ("embed", None))):
        layer = moe_linen.FusedMoE(16, 5, 8, Routing(2), expert_axis=None, backend="reference")
        with pytest.raises(ValueError, match=r"intermediate_size=5 must be divisible by 2.*'mlp'"):
            layer.init(jax.random.key(0), jnp.ones((4, 16)))


def test_sharded_training_example_reaches_the_losses_of_one_device():
    examples = str(pathlib.Path(__file__).parents[1] / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    example = importlib.import_module("train_sharded_moe")
    mesh = _mesh(example.MESH_SHAPE, example.MESH_AXES)
    sharded = example.train_tiny_moe.train("reference", 3, mesh=mesh, rules=example.RULES)
    single = example.train_tiny_moe.train("reference", 3)
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert sharded[-1] < sharded[0]


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_empty_batch_on_an_expert_mesh(backend):
    """No tokens under expert parallelism: an empty result, as on one device."""
    mesh = _mesh((4,), ("expert",))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    w = put(jnp.ones((8, 16, 8)), P("expert"))
    w_down = put(jnp.ones((8, 8, 16)), P("expert"))
    out = jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=2, backend=backend))(
        jnp.zeros((0, 16)), jnp.zeros((0, 8)), w, w, w_down
    )
    assert out.shape == (0, 16)


def _ragged_rows(operand, output, input_offsets, send_sizes, output_offsets, *, axis_name):
    """``jax.lax.ragged_all_to_all`` as its documentation specifies it, built from ``all_gather``
    (XLA:CPU has no ragged all-to-all): every receiver takes, from every sender,
    ``send_sizes[receiver]`` rows at ``input_offsets[receiver]`` and writes them at
    ``output_offsets[receiver]``. Also returns which rows of ``output`` were written."""
    operands = jax.lax.all_gather(operand, axis_name)
    starts, sizes, places = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
    receiver = jax.lax.axis_index(axis_name)
    rows = jnp.arange(output.shape[0])
    result, written = output, jnp.zeros(output.shape[0], bool)
    for sender in range(operands.shape[0]):
        place, size, start = places[sender, receiver], sizes[sender, receiver], starts[sender, receiver]
        taken = (rows >= place) & (rows < place + size)
        source = jnp.clip(start + rows - place, 0, operand.shape[0] - 1)
        result = jnp.where(taken.reshape(-1, *[1] * (output.ndim - 1)), operands[sender][source], result)
        written = written | taken
    return result, written


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _ragged_all_to_all_stand_in(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    return _ragged_rows(operand, output, input_offsets, send_sizes, output_offsets, axis_name=axis_name)[0]


def _stand_in_forward(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
    result, written = _ragged_rows(operand, output, input_offsets, send_sizes, output_offsets, axis_name=axis_name)
    return result, (operand, input_offsets, send_sizes, output_offsets, recv_sizes, written)


def _stand_in_backward(axis_name, residuals, cotangent):
    """JAX's transpose of ragged_all_to_all: the cotangent's rows go back to their senders, the
    offsets' roles swapped (each side's offsets learnt from the other by an all-to-all)."""
    operand, input_offsets, send_sizes, output_offsets, recv_sizes, written = residuals
    places_here = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    starts_there = jax.lax.all_to_all(input_offsets, axis_name, 0, 0, tiled=True)
    operand_cotangent, _ = _ragged_rows(
        cotangent, jnp.zeros_like(operand), places_here, recv_sizes, starts_there, axis_name=axis_name
    )
    output_cotangent = jnp.where(written.reshape(-1, *[1] * (cotangent.ndim - 1)), 0, cotangent)
    return operand_cotangent, output_cotangent, None, None, None, None


_ragged_all_to_all_stand_in.defvjp(_stand_in_forward, _stand_in_backward)


@pytest.fixture
def ragged_all_to_all_on_cpu(monkeypatch):
    monkeypatch.setattr(sharding, "_ragged_all_to_all", lambda *args, axis_name: _ragged_all_to_all_stand_in(
        *args, axis_name))
    monkeypatch.setattr(sharding, "ragged_all_to_all_available", lambda: True)


EXCHANGE_LAYOUTS = {
    "expert, tokens split": ((8,), ("expert",), _specs(P("expert"), expert="expert")),
    "data x expert": LAYOUTS["data x expert"],
    "data x expert x tensor": LAYOUTS["data x expert x tensor"],
}


@pytest.mark.parametrize(
    "layout,backend,shape",
    [(name, "reference", PLAIN) for name in EXCHANGE_LAYOUTS]
    + [("data x expert", "interpret", PLAIN), ("data x expert x tensor", "interpret", ALL_OPTIONS),
       ("data x expert x tensor", "reference", ALL_OPTIONS)],
)
def test_all_to_all_exchange_matches_one_device(ragged_all_to_all_on_cpu, layout, backend, shape):
    mesh_shape, axes, specs = EXCHANGE_LAYOUTS[layout]
    arrays = _on_mesh(_arrays(shape), _mesh(mesh_shape, axes), specs)
    out, grads, hlo = _value_and_grads(backend, shape, arrays, expert_exchange="all_to_all")
    _check_parity(out, grads, *_one_device(shape), 1e-5)
    assert _padded(out.sharding.spec, 3) == _padded(specs["hidden_states"], 3)
    # No device gathers the tokens of the expert axis (the stand-in gathers the pairs' rows,
    # [devices, rows, H]).
    assert _gathered_tokens(mesh_shape, axes, specs, shape) not in _collective_shapes(hlo, "all-gather")


def _gathered_tokens(mesh_shape, axes, specs, shape) -> tuple[int, int]:
    """The shape of the tokens of the devices along the expert axis, gathered."""
    sizes = dict(zip(axes, mesh_shape))
    token_axes = [a for entry in specs["hidden_states"] for a in ((entry,) if isinstance(entry, str) else entry or ())]
    return (BATCH * SEQ // math.prod(sizes[a] for a in token_axes) * sizes["expert"], shape.hidden)


@pytest.mark.parametrize("layout", EXCHANGE_LAYOUTS)
def test_all_gather_exchange_gathers_the_tokens(layout):
    """The yardstick of the test above: the default exchange gathers them."""
    mesh_shape, axes, specs = EXCHANGE_LAYOUTS[layout]
    arrays = _on_mesh(_arrays(PLAIN), _mesh(mesh_shape, axes), specs)
    _, _, hlo = _value_and_grads("reference", PLAIN, arrays)
    assert _gathered_tokens(mesh_shape, axes, specs, PLAIN) in _collective_shapes(hlo, "all-gather")


def _each_devices_tokens_alone(arrays: dict, mesh, token_spec: P, shape: arg_specs.MoeShape, **options):
    """(output, gradients) of the reference run separately on the tokens each device holds."""
    token_shape = arrays["hidden_states"].shape
    token_slices = {tuple((s.start, s.stop) for s in index): index for index in
                    NamedSharding(mesh, token_spec).devices_indices_map(token_shape).values()}

    def loss(arrays):
        arrays = dict(arrays)
        x, logits = arrays.pop("hidden_states"), arrays.pop("router_logits")
        out = jnp.zeros_like(x)
        for index in token_slices.values():
            out = out.at[index].set(jax_moe.fused_moe(
                x[index], logits[index], **arrays, **shape.static_options(), backend="reference", **options
            ))
        return jnp.sum(out.astype(jnp.float32) * _cotangent(shape.hidden)), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(arrays)
    return out, grads


@pytest.mark.parametrize("exchange,backend", [("all_gather", "interpret"), ("all_to_all", "interpret"),
                                              ("all_to_all", "reference")])
def test_capacity_under_expert_parallelism_counts_each_devices_tokens(ragged_all_to_all_on_cpu, exchange, backend):
    """With a capacity, each device drops pairs among its own tokens, as one device holding only
    them would; both exchanges give that result, forward and backward."""
    mesh_shape, axes, specs = LAYOUTS["data x expert"]
    mesh = _mesh(mesh_shape, axes)
    shape = dataclasses.replace(PLAIN, routing=Routing(2, capacity_factor=1.0))
    arrays = _on_mesh(_arrays(shape), mesh, specs)
    out, grads, _ = _value_and_grads(backend, shape, arrays, expert_exchange=exchange)
    want, want_grads = _each_devices_tokens_alone(_arrays(shape), mesh, specs["hidden_states"], shape)
    _check_parity(out, grads, want, want_grads, 1e-5)
    _, ids = jax.jit(lambda a: jax_moe.fused_moe(
        a["hidden_states"], a["router_logits"], a["w_gate"], a["w_up"], a["w_down"], **shape.static_options(),
        backend=backend, expert_exchange=exchange, return_routing=True,
    )[1:])(arrays)
    assert int(jnp.sum(ids < 0)) > 0  # the capacity binds: some pairs were dropped


def test_all_to_all_needs_tokens_split_over_all_expert_axes_and_a_gpu():
    arrays = _arrays(PLAIN)
    names = ("hidden_states", "router_logits", "w_gate", "w_up", "w_down")
    layer = lambda *a: jax_moe.fused_moe(*a, top_k=2, backend="reference", expert_exchange="all_to_all")
    mesh_shape, axes, specs = LAYOUTS["data x expert"]
    sharded = _on_mesh(arrays, _mesh(mesh_shape, axes), specs)
    with pytest.raises(ValueError, match="ragged all-to-all, which the cpu backend lacks"):
        jax.jit(layer)(*(sharded[n] for n in names))
    mesh_shape, axes, specs = LAYOUTS["expert on both axes"]
    sharded = _on_mesh(arrays, _mesh(mesh_shape, axes), specs)
    with pytest.raises(ValueError, match=r"split over all of the expert axes \('b', 'a'\) or none"):
        jax.jit(layer)(*(sharded[n] for n in names))
    with pytest.raises(ValueError, match="expert_exchange must be one of"):
        jax_moe.fused_moe(*(arrays[n] for n in names), top_k=2, expert_exchange="ring")
