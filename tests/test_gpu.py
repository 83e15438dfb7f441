"""The triton backend on the GPU, at real model dimensions (marked ``gpu``; skipped without one).

jax-triton hands kernels uninitialized outputs, so poisoning works differently than in the
interpreter: the kernel runs first on fresh random inputs, right after a NaN-filled buffer of the
output's size was freed (the allocator tends to hand that block out next), and every element is
compared with a reference. An element no program wrote holds NaN or a stale value computed from
other inputs, and fails.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_moe
from jax_moe import arg_specs, backend_triton, pipeline, stacks, tile_configs

import numpy_moe

pytestmark = pytest.mark.gpu

MODELS = [
    arg_specs.MIXTRAL_8X7B,
    arg_specs.DEEPSEEK_V3.with_experts(32),  # 256 experts of 7168 x 2048 don't fit in fp32 beside the reference
    arg_specs.QWEN3_30B_A3B,
]
# fp32 runs tf32x3 dots by default (fp32 accuracy); bf16/fp16 operands accumulate in fp32.
TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
NUMPY_TOKENS = 48  # the float64 host reference runs on a sample of tokens; the JAX reference on all


def _poison_allocator(shape, dtype):
    jnp.full(shape, jnp.nan, dtype).block_until_ready()


def _triton_layer(top_k):
    return jax.jit(lambda *args: jax_moe.fused_moe(*args, top_k=top_k, backend="triton"))


def _assert_close_everywhere(out, ref, dtype):
    out = np.asarray(out.astype(jnp.float32), np.float64)
    ref = np.asarray(ref, np.float64)
    assert np.isfinite(out).all(), f"{np.size(out) - np.isfinite(out).sum()} elements not finite"
    assert numpy_moe.rel_error(out, ref) <= TOLERANCE[dtype]
    rms = np.sqrt(np.mean(ref**2))
    worst = np.max(np.abs(out - ref) - (0.02 * np.abs(ref) + 0.1 * rms))
    assert worst <= 0, f"an element is off by {worst + 0.1 * rms:.3g} (rms of the output {rms:.3g})"


@pytest.mark.parametrize("num_tokens", [1, 77, 512])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", MODELS, ids=lambda s: s.name)
def test_triton_matches_references(key, shape, dtype, num_tokens):
    inputs = arg_specs.random_inputs(shape, num_tokens, dtype, key)
    _poison_allocator((num_tokens, shape.hidden), dtype)
    out = _triton_layer(shape.top_k)(*inputs.as_args())
    out.block_until_ready()
    assert out.shape == (num_tokens, shape.hidden) and out.dtype == jnp.dtype(dtype)

    sample = np.arange(min(num_tokens, NUMPY_TOKENS))
    ref_sample = numpy_moe.fused_moe(
        inputs.hidden_states[sample], inputs.router_logits[sample], inputs.w_gate, inputs.w_up,
        inputs.w_down, top_k=shape.top_k,
    )
    assert numpy_moe.rel_error(out[sample], ref_sample) <= TOLERANCE[dtype]

    ref = jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=shape.top_k, backend="reference"))(*inputs.as_args())
    _assert_close_everywhere(out, ref.astype(jnp.float32), dtype)


@pytest.mark.parametrize("shape", [arg_specs.MIXTRAL_8X7B, MODELS[1]], ids=lambda s: s.name)
def test_triton_is_deterministic(key, shape):
    inputs = arg_specs.random_inputs(shape, 1024, "bfloat16", key)
    layer = _triton_layer(shape.top_k)
    first = np.asarray(layer(*inputs.as_args()).view(jnp.uint16))
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(layer(*inputs.as_args()).view(jnp.uint16)), first)


def test_route_kernel_matches_numpy_on_gpu(key):
    logits = jax.random.normal(key, (300, 256), jnp.float32)
    weights, ids = jax.jit(lambda l: jax_moe.route(l, top_k=8, backend="triton"))(logits)
    ref_weights, ref_ids = numpy_moe.softmax_top_k(logits, 8, True)
    np.testing.assert_array_equal(ids, ref_ids)
    assert numpy_moe.rel_error(weights, ref_weights) <= 1e-6


def test_skewed_routing_and_many_tokens(key):
    """All tokens on the same two experts: one expert's rows span many blocks."""
    shape = arg_specs.QWEN3_30B_A3B.with_experts(16)
    inputs = arg_specs.random_inputs(shape, 4096, "bfloat16", key)
    logits = inputs.router_logits.at[:, 3].add(100.0).at[:, 11].add(90.0)
    layer = jax.jit(lambda *a: jax_moe.fused_moe(*a, top_k=2, backend="triton"))
    out = layer(inputs.hidden_states, logits, inputs.w_gate, inputs.w_up, inputs.w_down)
    ref = jax_moe.fused_moe(inputs.hidden_states, logits, inputs.w_gate, inputs.w_up, inputs.w_down, top_k=2,
                            backend="reference")
    _assert_close_everywhere(out, ref.astype(jnp.float32), "bfloat16")


def _lowered_decode_layer():
    shape = arg_specs.QWEN3_30B_A3B
    e, h, f = shape.num_experts, shape.hidden, shape.intermediate
    shapes = [((1, h), jnp.bfloat16), ((1, e), jnp.float32)] + [((e, h, f), jnp.bfloat16)] * 2 + [((e, f, h), jnp.bfloat16)]
    return _triton_layer(shape.top_k).lower(*[jax.ShapeDtypeStruct(s, d) for s, d in shapes])


def test_kernels_launch_without_line_info():
    """XLA's launch cost on the host grows with the kernel's PTX on every call; line info makes it
    ~1.7x larger."""
    payloads = backend_triton.kernel_protos(_lowered_decode_layer())
    assert len(payloads) == 3  # routing + dispatch, gate/up, down + combine
    for payload in payloads:
        assert b".version" in payload and b".entry" in payload  # the PTX is there, decoded
        assert b".loc" not in payload and b".file" not in payload


def test_combine_counters_come_zeroed_from_gate_up():
    """The down + combine launch updates the counters that gate/up zeroed in place (one aliased
    buffer, no memset of its own) under the jax-triton this machine has."""
    text = _lowered_decode_layer().as_text()
    if backend_triton._output_keyword() == "out_shape":
        assert text.count("output_operand_aliases") == 1
    else:
        pytest.skip("this jax-triton binds aliased buffers once: the counters are a zeroed output")


def test_auto_picks_triton_here():
    from jax_moe import api

    assert api._resolve_backend("auto") == "triton"


@pytest.mark.parametrize(
    "precision,tolerance", [("highest", 1e-5), (None, 1e-5), ("tensorfloat32", 5e-3)]
)
def test_fp32_follows_jax_matmul_precision(key, precision, tolerance):
    """Default and "highest" keep fp32 accuracy (tf32x3, exact FMA); "tensorfloat32" trades it
    for speed: about 2e-3 over the two chained GEMMs."""
    shape = arg_specs.QWEN3_30B_A3B.with_experts(16)
    inputs = arg_specs.random_inputs(shape, 64, "float32", key)
    with jax.default_matmul_precision(precision):
        out = _triton_layer(shape.top_k)(*inputs.as_args())
    ref = numpy_moe.fused_moe(*inputs.as_args(), top_k=shape.top_k)
    assert numpy_moe.rel_error(out, ref) <= tolerance


GRAD_CASES = [
    (arg_specs.MIXTRAL_8X7B, 256, "bfloat16", 2e-2),
    (arg_specs.DEEPSEEK_V3.with_experts(32), 128, "bfloat16", 2e-2),
    (arg_specs.QWEN3_30B_A3B, 256, "bfloat16", 2e-2),
    (arg_specs.QWEN3_30B_A3B.with_experts(16), 64, "float32", 1e-4),
    # Prefill sizes: the tuned tables' largest buckets (deep weight-gradient pipelines).
    (arg_specs.MIXTRAL_8X7B, 2048, "bfloat16", 2e-2),
    (arg_specs.QWEN3_30B_A3B, 2048, "bfloat16", 2e-2),
]


def _grad_fn(backend, top_k, cotangent, **options):
    def loss(*args):
        out = jax_moe.fused_moe(*args, top_k=top_k, backend=backend, **options)
        return jnp.sum(out.astype(jnp.float32) * cotangent)

    return jax.jit(jax.grad(loss, argnums=range(5)))


@pytest.mark.parametrize("save_activations", [False, True])
@pytest.mark.parametrize("shape,num_tokens,dtype,tolerance", GRAD_CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_gradients_match_reference(key, shape, num_tokens, dtype, tolerance, save_activations):
    k_inputs, k_cot = jax.random.split(key)
    inputs = arg_specs.random_inputs(shape, num_tokens, dtype, k_inputs)
    cotangent = jax.random.normal(k_cot, (num_tokens, shape.hidden))
    got = _grad_fn("triton", shape.top_k, cotangent, save_activations=save_activations)(*inputs.as_args())
    want = _grad_fn("reference", shape.top_k, cotangent)(*inputs.as_args())
    for name, g, w in zip(("x", "logits", "w_gate", "w_up", "w_down"), got, want):
        assert g.dtype == w.dtype, name
        assert numpy_moe.rel_error(g, np.asarray(w.astype(jnp.float32), np.float64)) <= tolerance, name


def test_gradients_are_deterministic(key):
    shape = arg_specs.DEEPSEEK_V3.with_experts(32)
    k_inputs, k_cot = jax.random.split(key)
    inputs = arg_specs.random_inputs(shape, 512, "bfloat16", k_inputs)
    grad = _grad_fn("triton", shape.top_k, jax.random.normal(k_cot, (512, shape.hidden)))
    first = [np.asarray(g.astype(jnp.float32)) for g in grad(*inputs.as_args())]
    for _ in range(2):
        for a, b in zip(first, grad(*inputs.as_args())):
            np.testing.assert_array_equal(np.asarray(b.astype(jnp.float32)), a)


def test_launches_lower_to_ffi_where_the_stack_gives_it():
    """jax-triton >= 0.4 with triton >= 3.7 lowers every launch to the XLA FFI custom call, which
    command buffers capture; 0.3.x to the legacy one."""
    text = _lowered_decode_layer().as_text()
    ffi, legacy = text.count("@triton_kernel_call_ffi("), text.count("@triton_kernel_call(")
    assert (ffi, legacy) == ((3, 0) if stacks.installed().ffi_launches else (0, 3))


@pytest.mark.parametrize("num_tokens", [8, 512])
def test_tma_weight_tiles_where_the_stack_gives_them(key, num_tokens):
    """A config that asks for TMA weight tiles runs them on a stack that gives them and falls back
    to pointer loads on one that doesn't: the same results either way, forward and backward."""
    shape = arg_specs.QWEN3_30B_A3B.with_experts(16)
    inputs = arg_specs.random_inputs(shape, num_tokens, "bfloat16", key)
    tables = tile_configs.device_tables(jax.devices()[0])
    tuned = tile_configs.select(num_tokens * shape.top_k, 2, tables, shape.tile_key("bfloat16"))
    cotangent = jax.random.normal(key, (num_tokens, shape.hidden))
    with tile_configs.use(dataclasses.replace(tuned, tma=True)):
        plan = pipeline.make_plan(
            "triton", jax_moe.ExpertWeights(inputs.w_gate, inputs.w_up, inputs.w_down), num_tokens=num_tokens,
            top_k=shape.top_k, dtype=jnp.bfloat16, save_activations=False, activation=jax_moe.SILU,
        )
        assert plan.tma == stacks.installed().tma
        out = _triton_layer(shape.top_k)(*inputs.as_args())
        grads = _grad_fn("triton", shape.top_k, cotangent)(*inputs.as_args())
    ref = jax_moe.fused_moe(*inputs.as_args(), top_k=shape.top_k, backend="reference")
    _assert_close_everywhere(out, ref.astype(jnp.float32), "bfloat16")
    want = _grad_fn("reference", shape.top_k, cotangent)(*inputs.as_args())
    for name, g, w in zip(("x", "logits", "w_gate", "w_up", "w_down"), grads, want):
        assert numpy_moe.rel_error(g, np.asarray(w.astype(jnp.float32), np.float64)) <= 2e-2, name


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_expert_exchanges_across_gpus(key, capacity_factor):
    """Expert parallelism over every GPU present, tokens split over the same axis: both exchanges
    give the single-device layer's output and gradients, and ``all_to_all`` moves the pairs' rows
    with XLA's ragged all-to-all."""
    devices = jax.devices("gpu")
    if len(devices) < 2:
        pytest.skip("needs two or more GPUs")
    mesh = jax.make_mesh((len(devices),), ("expert",), devices=devices)
    shape = dataclasses.replace(
        arg_specs.QWEN3_30B_A3B, routing=jax_moe.Routing(arg_specs.QWEN3_30B_A3B.top_k, capacity_factor=capacity_factor)
    )
    inputs = arg_specs.random_inputs(shape, 64 * len(devices), "bfloat16", key)
    specs = (P("expert"), P("expert"), P("expert"), P("expert"), P("expert"))
    placed = [jax.device_put(a, jax.NamedSharding(mesh, s)) for a, s in zip(inputs.as_args(), specs)]

    def loss(exchange, backend, *args):
        out = jax_moe.fused_moe(*args, routing=shape.routing, backend=backend, expert_exchange=exchange)
        return jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32))), out

    grads_of = lambda exchange, backend: jax.jit(
        jax.value_and_grad(functools.partial(loss, exchange, backend), argnums=range(5), has_aux=True)
    )
    local = inputs.hidden_states.shape[0] // len(devices)
    want = [jax.device_put(a, devices[0]) for a in inputs.as_args()]
    # The capacity counts each device's own tokens: the reference runs them one device's share at a time.
    ref_out = jnp.concatenate([
        jax_moe.fused_moe(want[0][i:i + local], want[1][i:i + local], *want[2:], routing=shape.routing, backend="reference")
        for i in range(0, want[0].shape[0], local)
    ])
    for exchange in ("all_gather", "all_to_all"):
        (_, out), grads = grads_of(exchange, "triton")(*placed)
        assert numpy_moe.rel_error(out, np.asarray(ref_out.astype(jnp.float32), np.float64)) <= 1e-2, exchange
        (_, _), ref_grads = grads_of(exchange, "reference")(*placed)
        for grad, ref_grad in zip(grads, ref_grads):
            assert numpy_moe.rel_error(grad, np.asarray(ref_grad.astype(jnp.float32), np.float64)) <= 1e-2, exchange
    hlo = grads_of("all_to_all", "triton").lower(*placed).compile().as_text()
    assert "ragged-all-to-all" in hlo


def test_auto_mesh_layer_across_gpus(key):
    """On a mesh of Auto axes the triton backend's layout is read when XLA partitions the program
    (``jax.experimental.custom_partitioning``): tokens and experts split over every GPU present,
    forward and gradients as on one device."""
    devices = jax.devices("gpu")
    if len(devices) < 2:
        pytest.skip("needs two or more GPUs")
    mesh = jax.make_mesh((len(devices),), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
    shape = arg_specs.QWEN3_30B_A3B
    inputs = arg_specs.random_inputs(shape, 64 * len(devices), "bfloat16", key)
    placed = [jax.device_put(a, jax.NamedSharding(mesh, P("expert"))) for a in inputs.as_args()]

    def loss(backend, *args):
        out = jax_moe.fused_moe(*args, routing=shape.routing, backend=backend).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(out)), out

    grads_of = lambda backend: jax.value_and_grad(functools.partial(loss, backend), argnums=range(5), has_aux=True)
    compiled = jax.jit(grads_of("triton")).lower(*placed).compile()
    assert "custom_partitioning" in compiled.as_text()
    (_, out), grads = compiled(*placed)
    assert out.sharding.spec == P("expert")
    one = [jax.device_put(a, devices[0]) for a in inputs.as_args()]
    (_, want), want_grads = jax.jit(grads_of("reference"))(*one)
    assert numpy_moe.rel_error(out, np.asarray(want, np.float64)) <= 1e-2
    for grad, want_grad in zip(grads, want_grads):
        assert numpy_moe.rel_error(grad, np.asarray(want_grad.astype(jnp.float32), np.float64)) <= 1e-2


@pytest.mark.parametrize("shape", [arg_specs.MIXTRAL_8X7B, arg_specs.QWEN3_30B_A3B], ids=lambda s: s.name)
def test_batch_invariant_tokens_keep_their_bits_in_any_batch(key, shape):
    """With ``batch_invariant=True`` the first tokens of a 2048-token batch come out bitwise as
    they do alone or in smaller batches, across every tile bucket of the tables."""
    inputs = arg_specs.random_inputs(shape, 2048, "bfloat16", key)
    x, logits, *weights = inputs.as_args()
    layer = jax.jit(lambda *a: jax_moe.fused_moe(*a, **shape.static_options(), backend="triton", batch_invariant=True))
    whole = np.asarray(layer(x, logits, *weights).astype(jnp.float32))
    for tokens in (1, 8, 64, 512):
        part = np.asarray(layer(x[:tokens], logits[:tokens], *weights).astype(jnp.float32))
        np.testing.assert_array_equal(part, whole[:tokens])
    reference = jax_moe.fused_moe(x[:NUMPY_TOKENS], logits[:NUMPY_TOKENS], *weights, **shape.static_options(),
                                  backend="reference")
    assert numpy_moe.rel_error(whole[:NUMPY_TOKENS], np.asarray(reference.astype(jnp.float32), np.float64)) <= 1e-2
