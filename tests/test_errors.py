"""Every documented bad input raises a clear error naming the argument, before any kernel runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe
from jax_moe import api, arg_specs, backend_triton, pipeline
from jax_moe.options import Routing

E, H, F, T = 4, 16, 24, 5


@pytest.fixture
def args():
    inputs = arg_specs.random_inputs(arg_specs.MoeShape("t", E, Routing(2), H, F), T, "float32", jax.random.key(0))
    return dict(zip(["hidden_states", "router_logits", "w_gate", "w_up", "w_down"], inputs.as_args()))


def call(args, top_k=2, backend="interpret", **overrides):
    merged = {**args, **overrides}
    return jax_moe.fused_moe(*merged.values(), top_k=top_k, backend=backend)


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("w_gate", jnp.zeros((E, H + 1, F)), r"w_gate must have shape \[E, H, F\] = \[4, 16, 24\].*got \[4, 17, 24\]"),
        ("w_up", jnp.zeros((E, H, F + 1)), r"w_up must have shape \[E, H, F\] = \[4, 16, 24\].*got \[4, 16, 25\]"),
        ("w_up", jnp.zeros((E + 1, H, F)), r"w_up must have shape .* got \[5, 16, 24\]"),
        ("w_down", jnp.zeros((E, H, F)), r"w_down must have shape \[E, F, H\] = \[4, 24, 16\] .*got \[4, 16, 24\]"),
        ("w_down", jnp.zeros((E, F)), r"w_down must have shape \[E, F, H\]; got shape \[4, 24\]"),
        ("w_gate", jnp.zeros((H, F)), r"w_gate must have shape \[E, H, F\]; got shape \[16, 24\]"),
        ("router_logits", jnp.zeros((T, E + 1)), r"router_logits must have shape \[..., E\] = \[5, 4\].*got \[5, 5\]"),
        ("router_logits", jnp.zeros((T + 1, E)), r"router_logits must have shape .* got \[6, 4\]"),
        ("hidden_states", jnp.zeros(()), r"hidden_states must have shape \[..., H\]; got a scalar"),
    ],
)
def test_shape_errors(args, name, value, message):
    with pytest.raises(ValueError, match=message):
        call(args, **{name: value})


@pytest.mark.parametrize(
    "name,dtype,message",
    [
        ("hidden_states", jnp.int32, r"hidden_states must be bfloat16, float16 or float32; got int32"),
        ("w_gate", jnp.bfloat16, r"w_gate must have the dtype of hidden_states \(float32\); got bfloat16"),
        ("w_down", jnp.float16, r"w_down must have the dtype of hidden_states \(float32\); got float16"),
        ("router_logits", jnp.int32, r"router_logits must have a floating-point dtype; got int32"),
    ],
)
def test_dtype_errors(args, name, dtype, message):
    with pytest.raises(TypeError, match=message):
        call(args, **{name: args[name].astype(dtype)})


def test_float64_activations_are_refused(args):
    with pytest.raises(TypeError, match="hidden_states must be bfloat16, float16 or float32; got float64"):
        call(args, hidden_states=np.asarray(args["hidden_states"], np.float64))


@pytest.mark.parametrize("top_k,message", [(0, "top_k must be >= 1; got 0"), (-1, "top_k must be >= 1; got -1"),
                                           (E + 1, rf"top_k must lie in \[1, {E}\] \(the number of experts\); got {E + 1}")])
def test_top_k_out_of_range(args, top_k, message):
    with pytest.raises(ValueError, match=message):
        call(args, top_k=top_k)


@pytest.mark.parametrize("top_k", [2.0, "2", True])
def test_top_k_must_be_an_int(args, top_k):
    with pytest.raises(TypeError, match="top_k must be a Python int"):
        call(args, top_k=top_k)


def test_unknown_backend(args):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'interpret', 'reference'\); got 'cuda'"):
        call(args, backend="cuda")


@pytest.mark.skipif(backend_triton.unavailable_reason() is None, reason="a GPU with jax-triton is here")
def test_triton_backend_without_gpu_says_why(args):
    with pytest.raises(ValueError, match='backend="triton" can\'t run here: no GPU is visible'):
        call(args, backend="triton")


def test_triton_backend_without_jax_triton_says_how_to_install(monkeypatch):
    monkeypatch.setattr(jax, "devices", lambda: [type("FakeGpu", (), {"platform": "gpu", "client": type("C", (), {"platform_version": "cuda 13"})()})()])

    def missing():
        raise ImportError("No module named 'jax_triton'")

    monkeypatch.setattr(backend_triton, "_jax_triton", missing)
    with pytest.raises(ValueError, match=r"jax-triton can't be imported .*pip install"):
        api._resolve_backend("triton")


def test_moe_experts_checks_routing(args):
    weights = jnp.full((T, 2), 0.5)
    ids = jnp.zeros((T, 2), jnp.int32)
    experts = (args["w_gate"], args["w_up"], args["w_down"])
    x = args["hidden_states"]
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\], or be -1 for a dropped pair; got values from 0 to 4"):
        jax_moe.moe_experts(x, weights, ids.at[0, 1].set(4), *experts, backend="interpret")
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 3\], or be -1 for a dropped pair; got values from -2 to 0"):
        jax_moe.moe_experts(x, weights, ids.at[2, 0].set(-2), *experts, backend="interpret")
    with pytest.raises(TypeError, match="ids must have an integer dtype; got float32"):
        jax_moe.moe_experts(x, weights, ids.astype(jnp.float32), *experts, backend="interpret")
    with pytest.raises(TypeError, match="weights must have a floating-point dtype; got int32"):
        jax_moe.moe_experts(x, ids, ids, *experts, backend="interpret")
    with pytest.raises(ValueError, match=r"weights and ids must have the same shape; got \[5, 2\] and \[5, 3\]"):
        jax_moe.moe_experts(x, weights, jnp.zeros((T, 3), jnp.int32), *experts, backend="interpret")
    with pytest.raises(ValueError, match=r"ids must have shape \[..., k\] = \[5, k\] \(the leading dims of hidden_states.*got shape \[4, 2\]"):
        jax_moe.moe_experts(x, weights, ids[:4], *experts, backend="interpret")
    with pytest.raises(ValueError, match=r"weights must have shape \[..., k\] = \[5, k\] .*got shape \[5\]"):
        jax_moe.moe_experts(x, weights[:, 0], ids[:, 0], *experts, backend="interpret")
    with pytest.raises(ValueError, match=r"ids: each token's number of experts \(its last dim\) must lie in \[1, 4\] \(E of w_gate\); got 5"):
        jax_moe.moe_experts(x, jnp.ones((T, 5)), jnp.zeros((T, 5), jnp.int32), *experts, backend="interpret")


def test_route_checks_its_arguments():
    with pytest.raises(TypeError, match="router_logits must have a floating-point dtype; got int32"):
        jax_moe.route(jnp.zeros((3, 4), jnp.int32), top_k=1)
    with pytest.raises(ValueError, match=r"top_k must lie in \[1, 4\]"):
        jax_moe.route(jnp.zeros((3, 4)), top_k=5)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_empty_input_gives_an_empty_result(args, backend):
    x = jnp.zeros((0, 3, H), jnp.bfloat16)
    logits = jnp.zeros((0, 3, E), jnp.float32)
    experts = [args[n].astype(jnp.bfloat16) for n in ("w_gate", "w_up", "w_down")]
    out = jax_moe.fused_moe(x, logits, *experts, top_k=2, backend=backend)
    assert out.shape == (0, 3, H) and out.dtype == jnp.bfloat16
    weights, ids = jax_moe.route(logits, top_k=2, backend=backend)
    assert weights.shape == ids.shape == (0, 3, 2)


def test_dot_precision_follows_jax():
    assert pipeline._dot_precision(jnp.float32) == "tf32x3"
    assert pipeline._dot_precision(jnp.bfloat16) == "tf32"
    with jax.default_matmul_precision("highest"):
        assert pipeline._dot_precision(jnp.float32) == "ieee"
    with jax.default_matmul_precision("tensorfloat32"):
        assert pipeline._dot_precision(jnp.float32) == "tf32"


@pytest.mark.parametrize(
    "options,error,message",
    [
        (dict(scoring="relu"), ValueError, r"scoring must be one of \('softmax', 'sigmoid'\); got 'relu'"),
        (dict(num_groups=3), ValueError, r"num_groups \(3\) must divide the number of experts E=4"),
        (dict(num_groups=2, top_groups=3), ValueError, r"top_groups must be an int in \[1, num_groups=2\]; got 3"),
        (dict(num_groups=4, top_groups=1), ValueError, "top_k=2 exceeds the 1 experts of the top_groups=1 kept groups"),
        (dict(routed_scaling_factor=float("nan")), ValueError, "routed_scaling_factor must be finite; got nan"),
        (dict(selection_bias=jnp.zeros((E + 1,))), ValueError, r"selection_bias must have shape \[E\] = \[4\]; got \[5\]"),
        (dict(selection_bias=jnp.zeros((E,), jnp.int32)), TypeError, "selection_bias must have a floating-point dtype"),
        (dict(gate_bias=jnp.zeros((E, F))), ValueError, r"expert biases come as .* together; missing \['up_bias', 'down_bias'\]"),
        (dict(gate_bias=jnp.zeros((E, F)), up_bias=jnp.zeros((E, F)), down_bias=jnp.zeros((E, F))),
         ValueError, r"down_bias must have shape \[E, H\] = \[4, 16\]; got \[4, 24\]"),
        (dict(activation="gelu"), ValueError, r"activation must be one of \('silu', 'clamped_swiglu'\); got 'gelu'"),
        (dict(activation=3), TypeError, "activation must be a name or a jax_moe.Activation; got int"),
        (dict(shared_w_gate=jnp.zeros((1, H, F))), ValueError, r"missing \['shared_w_up', 'shared_w_down'\]"),
        (dict(shared_w_gate=jnp.zeros((2, H, F)), shared_w_up=jnp.zeros((2, H, F)), shared_w_down=jnp.zeros((2, H, F))),
         ValueError, r"shared_w_down must have shape \[S, F, H\] = \[2, 24, 16\] .*got \[2, 16, 24\]"),
        (dict(shared_w_gate=jnp.zeros((1, H, F), jnp.bfloat16), shared_w_up=jnp.zeros((1, H, F)),
              shared_w_down=jnp.zeros((1, F, H))), TypeError, r"shared_w_gate must have the dtype of hidden_states \(float32\)"),
        (dict(shared_gate=jnp.zeros((H,))), ValueError, "shared_gate was given without shared experts"),
        (dict(shared_w_gate=jnp.zeros((1, H, F)), shared_w_up=jnp.zeros((1, H, F)), shared_w_down=jnp.zeros((1, F, H)),
              shared_gate=jnp.zeros((H, 1))), ValueError, r"shared_gate must have shape \[H\] = \[16\]; got \[16, 1\]"),
    ],
)
def test_family_option_errors(args, options, error, message):
    with pytest.raises(error, match=message):
        jax_moe.fused_moe(*args.values(), top_k=2, backend="interpret", **options)


def test_split_shared_expert_pads_and_checks():
    w_gate, w_up = jnp.ones((H, 50)), jnp.ones((H, 50))
    w_down = jnp.ones((50, H))
    gate, up, down = jax_moe.split_shared_expert(w_gate, w_up, w_down, F)
    assert gate.shape == up.shape == (3, H, F) and down.shape == (3, F, H)
    assert float(gate[2, :, 2:].sum()) == 0 and float(down[2, 2:].sum()) == 0 and float(gate[2, :, :2].sum()) == 2 * H
    with pytest.raises(ValueError, match=r"w_gate, w_up must be \[H, F_s\] and w_down \[F_s, H\] alike"):
        jax_moe.split_shared_expert(w_gate, w_up, w_down.T, F)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_empty_input_with_every_option(args, backend):
    x = jnp.zeros((0, H), jnp.float32)
    out = jax_moe.fused_moe(
        x, jnp.zeros((0, E)), args["w_gate"], args["w_up"], args["w_down"], top_k=2, scoring="sigmoid",
        selection_bias=jnp.zeros((E,)), num_groups=2, top_groups=1, gate_bias=jnp.zeros((E, F)),
        up_bias=jnp.zeros((E, F)), down_bias=jnp.zeros((E, H)), activation="clamped_swiglu",
        shared_w_gate=args["w_gate"][:1], shared_w_up=args["w_up"][:1], shared_w_down=args["w_down"][:1],
        shared_gate=jnp.ones((H,)), backend=backend,
    )
    assert out.shape == (0, H)


def test_activation_checks_itself():
    with pytest.raises(ValueError, match="the clamped_swiglu limit must be positive; got -1.0"):
        jax_moe.Activation("clamped_swiglu", limit=-1.0)
    with pytest.raises(ValueError, match=r"activation must be one of \('silu', 'clamped_swiglu'\); got 'gelu'"):
        jax_moe.Activation("gelu")
    with pytest.raises(TypeError, match="the activation's alpha must be a real number; got 'x'"):
        jax_moe.Activation("clamped_swiglu", alpha="x")


@pytest.mark.parametrize(
    "fields,error,message",
    [
        (dict(top_k=0), ValueError, "top_k must be >= 1; got 0"),
        (dict(top_k=2.0), TypeError, "top_k must be a Python int; got float 2.0"),
        (dict(top_k=2, scoring="relu"), ValueError, r"scoring must be one of \('softmax', 'sigmoid'\); got 'relu'"),
        (dict(top_k=2, renormalize="yes"), TypeError, "renormalize must be a bool; got str"),
        (dict(top_k=2, num_groups=0), ValueError, "num_groups must be a positive int; got 0"),
        (dict(top_k=2, num_groups=2.0), TypeError, "num_groups must be an int; got float 2.0"),
        (dict(top_k=2, num_groups=2, top_groups="1"), TypeError, "top_groups must be an int or None; got str"),
        (dict(top_k=2, routed_scaling_factor="2"), TypeError, "routed_scaling_factor must be a Python number; got str"),
        (dict(top_k=2, num_groups=2, top_groups=3), ValueError, r"top_groups must be an int in \[1, num_groups=2\]; got 3"),
        (dict(top_k=2, routed_scaling_factor=float("inf")), ValueError, "routed_scaling_factor must be finite; got inf"),
        (dict(top_k=2, capacity_factor=-1), ValueError, "capacity_factor must be positive and finite; got -1"),
        (dict(top_k=2, capacity_factor=float("nan")), ValueError, "capacity_factor must be positive and finite; got nan"),
        (dict(top_k=2, capacity_factor=True), TypeError, "capacity_factor must be a Python number or None; got bool"),
    ],
)
def test_routing_checks_its_fields_at_construction(fields, error, message):
    with pytest.raises(error, match=message):
        jax_moe.Routing(**fields)


def test_options_come_typed_or_flat_never_both(args):
    x, logits, w_gate, w_up, w_down = args.values()
    experts = jax_moe.ExpertWeights(w_gate, w_up, w_down)
    routing = jax_moe.Routing(2)
    typed = jax_moe.fused_moe(x, logits, experts=experts, routing=routing, backend="reference")
    flat = jax_moe.fused_moe(x, logits, w_gate, w_up, w_down, top_k=2, backend="reference")
    np.testing.assert_array_equal(typed, flat)
    with pytest.raises(TypeError, match=r"pass routing=Routing\(...\) or its fields \['top_k'\], not both"):
        jax_moe.fused_moe(x, logits, experts=experts, routing=routing, top_k=2)
    with pytest.raises(TypeError, match=r"pass experts=ExpertWeights\(...\) or the arrays \['w_gate'\], not both"):
        jax_moe.fused_moe(x, logits, w_gate, experts=experts, routing=routing)
    with pytest.raises(TypeError, match=r"fused_moe\(\) got unexpected keyword arguments \['topk'\]"):
        jax_moe.fused_moe(x, logits, w_gate, w_up, w_down, topk=2)
    with pytest.raises(TypeError, match=r"fused_moe\(\) needs routing=jax_moe.Routing\(...\) or top_k="):
        jax_moe.fused_moe(x, logits, w_gate, w_up, w_down)
    with pytest.raises(TypeError, match=r"missing \['w_down'\]"):
        jax_moe.fused_moe(x, logits, w_gate, w_up, top_k=2)
    with pytest.raises(TypeError, match=r"moe_experts\(\) got unexpected keyword arguments \['top_k'\]"):
        jax_moe.moe_experts(x, jnp.ones((T, 2)), jnp.zeros((T, 2), jnp.int32), experts=experts, top_k=2)
    with pytest.raises(TypeError, match="routing must be a jax_moe.Routing; got dict"):
        jax_moe.route(logits, {"top_k": 2})


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_zero_width_layers_give_zeros(backend):
    """H = 0 or F = 0: every expert's output is empty or zero, and so is the layer's."""
    logits = jax.random.normal(jax.random.key(0), (T, E))
    for hidden, intermediate in ((0, F), (H, 0)):
        w_gate = jnp.ones((E, hidden, intermediate))
        w_down = jnp.ones((E, intermediate, hidden))
        out = jax_moe.fused_moe(jnp.ones((T, hidden)), logits, w_gate, w_gate, w_down, top_k=2, backend=backend)
        assert out.shape == (T, hidden)
        np.testing.assert_array_equal(out, np.zeros((T, hidden), np.float32))


@pytest.mark.parametrize("backend", ["interpret", "reference"])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_nan_and_inf_router_logits_poison_only_their_token(args, backend, scoring):
    """The contract: a NaN logit (and, under softmax, a +inf one) makes that token's routing
    weights and output NaN; every other token comes out as without it."""
    x, logits, w_gate, w_up, w_down = args.values()
    bad = logits.at[1, 2].set(jnp.nan).at[3, 0].set(jnp.inf)
    layer = lambda l: jax_moe.fused_moe(
        x, l, w_gate, w_up, w_down, top_k=2, scoring=scoring, backend=backend, return_routing=True
    )
    out, weights, _ = layer(bad)
    clean_out, _, _ = layer(logits)
    assert np.isnan(out[1]).all() and np.isnan(weights[1]).all()
    inf_token_is_nan = scoring == "softmax"
    assert np.isnan(out[3]).all() == inf_token_is_nan and np.isnan(weights[3]).any() == inf_token_is_nan
    for token in (0, 2, 4):
        np.testing.assert_array_equal(out[token], clean_out[token])


def test_more_pairs_than_int32_dispatch_rows_is_refused():
    """Dispatch indexes (token, expert) pairs in int32: a batch past that fails at trace time."""
    tokens = 2**29
    x = jax.ShapeDtypeStruct((tokens, H), jnp.bfloat16)
    logits = jax.ShapeDtypeStruct((tokens, E), jnp.float32)
    w = jax.ShapeDtypeStruct((E, H, F), jnp.bfloat16)
    w_down = jax.ShapeDtypeStruct((E, F, H), jnp.bfloat16)
    layer = lambda *a: jax_moe.fused_moe(*a, top_k=E, backend="interpret")
    message = r"hidden_states: 536870912 tokens make 2147483648 \(token, expert\) pairs.*int32"
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(layer, x, logits, w, w, w_down)


@pytest.mark.parametrize("backend", ["interpret", "reference"])
def test_no_intermediate_columns_leave_the_down_biases(backend):
    """F = 0 with expert biases: each token's output is its experts' weighted down biases, on
    every backend, as the reference computes it."""
    logits = jax.random.normal(jax.random.key(0), (T, E))
    x = jnp.ones((T, H))
    w = jnp.ones((E, H, 0))
    biases = dict(gate_bias=jnp.ones((E, 0)), up_bias=jnp.ones((E, 0)),
                  down_bias=jax.random.normal(jax.random.key(1), (E, H)))
    out, weights, ids = jax_moe.fused_moe(x, logits, w, w, jnp.ones((E, 0, H)), top_k=2, backend=backend,
                                          return_routing=True, **biases)
    want = jnp.einsum("tk,tkh->th", weights, biases["down_bias"][ids])
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(out).max()) > 0


# Quantized weights: H = 16, F = 24 fit group 32 nowhere, so these layers use channel scales
# unless a test is about groups.
def quantized(args, scheme, *names):
    return {name: jax_moe.quantize(args[name], scheme) for name in names or ("w_gate", "w_up", "w_down")}


@pytest.mark.parametrize(
    "fields,error,message",
    [
        (dict(format="fp4"), ValueError, r"Quantization.format must be one of .*got 'fp4'"),
        (dict(format="fp8", granularity="group"), ValueError, r"granularity of format 'fp8' must be one of"),
        (dict(format="int4", granularity="group", group_size=48), ValueError, r"group_size must be one of \(32, 64, 128\); got 48"),
        (dict(format="mxfp4", group_size=64), ValueError, r"group_size of mxfp4 must be 32; got 64"),
        (dict(format="fp8", zero_point=True), ValueError, r"zero_point applies to int8 and int4"),
        (dict(format="int8", activations="fp8"), ValueError, r"activations='fp8' needs format 'fp8'"),
        (dict(format="fp8", activations="int8"), ValueError, r"activations must be one of"),
        (dict(format="fp8", block_size=100), ValueError, r"block_size must be a power of two >= 16; got 100"),
        (dict(format="int8", group_size=32.0), TypeError, r"group_size must be an int; got float"),
    ],
)
def test_bad_quantization_schemes(fields, error, message):
    with pytest.raises(error, match=message):
        jax_moe.Quantization(**fields)


def test_quantized_scale_shape_must_match_the_weight(args):
    weights = quantized(args, jax_moe.Quantization("fp8", "block", block_size=16))
    q = weights["w_down"]
    weights["w_down"] = jax_moe.QuantizedArray(q.values, q.scales[:, :1], None, q.scheme, q.shape)
    with pytest.raises(ValueError, match=r"w_down.scales must have shape \[4, 2, 1\] for a \[4, 24, 16\] weight "
                                         r"quantized fp8 block 16; got \[4, 1, 1\]"):
        call(args, **weights)


def test_quantized_values_dtype_must_match_the_scheme(args):
    weights = quantized(args, jax_moe.Quantization("int8"))
    q = weights["w_up"]
    weights["w_up"] = jax_moe.QuantizedArray(q.values.astype(jnp.uint8), q.scales, None, q.scheme, q.shape)
    with pytest.raises(TypeError, match=r"w_up.values must be int8 for int8 channel; got uint8"):
        call(args, **weights)


def test_quantized_k_must_be_a_multiple_of_the_group(args):
    scheme = jax_moe.Quantization("int4", "group", group_size=32)
    with pytest.raises(ValueError, match=r"K=16 must be a multiple of the group size 32 of int4 group 32"):
        jax_moe.quantize(args["w_gate"], scheme)
    q = jax_moe.quantize(jnp.zeros((E, 32, F)), scheme)
    fake = jax_moe.QuantizedArray(q.values[:, :8], q.scales[:, :1], None, scheme, (E, H, F))
    with pytest.raises(ValueError, match=r"w_gate: K=16 must be a multiple of the group size 32"):
        call(args, w_gate=fake, **quantized(args, jax_moe.Quantization("int4"), "w_up", "w_down"))


def test_mixed_quantization_schemes_are_refused(args):
    weights = quantized(args, jax_moe.Quantization("fp8"))
    weights["w_down"] = jax_moe.quantize(args["w_down"], jax_moe.Quantization("int8"))
    with pytest.raises(ValueError, match=r"must all be float or all share one quantization; got w_gate: fp8 "
                                         r"channel, w_up: fp8 channel, w_down: int8 channel"):
        call(args, **weights)
    with pytest.raises(ValueError, match=r"w_up: float"):
        call(args, **quantized(args, jax_moe.Quantization("fp8"), "w_gate", "w_down"))


def test_quantize_takes_a_scheme_and_float_expert_weights(args):
    with pytest.raises(TypeError, match="scheme must be a jax_moe.Quantization; got str"):
        jax_moe.quantize(args["w_gate"], "fp8")
    with pytest.raises(ValueError, match=r"quantize takes float \[E, K, N\] weights; got float32 shape \[16, 24\]"):
        jax_moe.quantize(args["w_gate"][0], jax_moe.Quantization("fp8"))
    with pytest.raises(TypeError, match="dequantize takes a jax_moe.QuantizedArray; got ArrayImpl"):
        jax_moe.dequantize(args["w_gate"])


def test_quantized_weights_on_several_devices_are_refused(args):
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
    x = jax.device_put(args["hidden_states"][:4], jax.NamedSharding(mesh, jax.P("data")))
    weights = quantized(args, jax_moe.Quantization("fp8"))
    with pytest.raises(ValueError, match="quantized expert weights take arguments on one device"):
        call({**args, "hidden_states": x, "router_logits": args["router_logits"][:4]}, backend="reference", **weights)
