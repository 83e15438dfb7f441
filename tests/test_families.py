"""Model families end to end on the CPU: tiny Hugging Face checkpoints with each family's exact key
names are written to safetensors, loaded into ``FusedMoE``, and must give the output of that
family's block re-derived in float64 numpy (``numpy_families``). Plus the routing and expert
variants on their own, forward and backward, on the interpreter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import jax_moe
from jax_moe import backend_interpret, pipeline
from jax_moe.options import Routing
from flax_layers import FusedMoE
from flax_layers import checkpoints
from flax_layers import linen as moe_linen

import numpy_families
import numpy_moe

TINY_CONFIGS = {
    "mixtral": dict(hidden_size=32, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2),
    # A shared expert 2.5x the routed width: split into 3 shared experts, the last zero-padded.
    "qwen2_moe": dict(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=False, shared_expert_intermediate_size=40),
    "qwen3_moe": dict(hidden_size=32, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                      norm_topk_prob=True),
    "deepseek_v3": dict(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                        n_shared_experts=1, scoring_func="sigmoid", topk_method="noaux_tc"),
    "gpt_oss": dict(hidden_size=32, intermediate_size=16, num_local_experts=8, num_experts_per_tok=4,
                    swiglu_limit=7.0),
}
NUM_TOKENS = 24
# Tokens whose routing a float32 rounding could flip are set aside (expected: none or one).
DECISIVE_MARGIN = 1e-5


def _write_checkpoint(tmp_path, family, rng, layer=1):
    config = TINY_CONFIGS[family]
    prefix = checkpoints.block_prefix(family, layer)
    tensors = numpy_families.random_checkpoint(family, config, prefix, rng)
    other_layer = {checkpoints.block_prefix(family, layer + 1) + "gate.weight": np.ones((2, 2), np.float32)}
    path = str(tmp_path / f"{family}.safetensors")
    save_file(tensors | other_layer, path)
    return config, prefix, tensors, path


def _compare(out, ref, margin, tolerance):
    decisive = margin > DECISIVE_MARGIN
    assert decisive.mean() >= 0.9, f"only {decisive.sum()} of {len(margin)} tokens routed decisively"
    assert numpy_moe.rel_error(np.asarray(out)[decisive], ref[decisive]) <= tolerance


@pytest.mark.parametrize("family", checkpoints.FAMILIES)
def test_checkpoint_block_matches_the_family(tmp_path, rng, family):
    config, prefix, tensors, path = _write_checkpoint(tmp_path, family, rng)
    loaded = checkpoints.read_safetensors([path], prefix)
    assert sorted(loaded) == sorted(tensors)
    x = rng.standard_normal((NUM_TOKENS, config["hidden_size"])).astype(np.float32)
    ref, margin = numpy_families.BLOCKS[family](x, tensors, prefix, config)

    kwargs = checkpoints.layer_kwargs(family, config)
    layer = FusedMoE(**kwargs, backend="interpret", rngs=nnx.Rngs(0))
    checkpoints.load_block(layer, family, loaded, config, prefix)
    _compare(layer(jnp.asarray(x)), ref, margin, 1e-5)

    variables = checkpoints.linen_variables(family, loaded, config, prefix)
    out = moe_linen.FusedMoE(**kwargs, backend="reference").apply(variables, jnp.asarray(x))
    _compare(out, ref, margin, 1e-5)


def test_gpt_oss_clamps_bind_in_the_test_data(rng):
    """Guards the test above: its gpt-oss data must reach the clamped region."""
    config = TINY_CONFIGS["gpt_oss"]
    tensors = numpy_families.random_checkpoint("gpt_oss", config, "", rng)
    x = rng.standard_normal((NUM_TOKENS, config["hidden_size"]))
    pre = np.einsum("th,ehf->etf", x, tensors["experts.gate_up_proj"]) + tensors["experts.gate_up_proj_bias"][:, None]
    assert (pre[..., ::2] > 7).mean() > 0.01 and (np.abs(pre[..., 1::2]) > 7).mean() > 0.01


def test_bf16_checkpoint_loads_in_bf16(tmp_path, rng):
    from safetensors.flax import save_file as save_jax

    config = TINY_CONFIGS["qwen3_moe"]
    prefix = checkpoints.block_prefix("qwen3_moe", 0)
    tensors = numpy_families.random_checkpoint("qwen3_moe", config, prefix, rng)
    save_jax({k: jnp.asarray(v, jnp.bfloat16) for k, v in tensors.items()}, str(tmp_path / "b.safetensors"))
    loaded = checkpoints.read_safetensors(str(tmp_path / "b.safetensors"), prefix)
    assert all(v.dtype == jnp.bfloat16 for v in loaded.values())
    layer = FusedMoE(**checkpoints.layer_kwargs("qwen3_moe", config), param_dtype=jnp.bfloat16,
                     backend="interpret", rngs=nnx.Rngs(0))
    checkpoints.load_block(layer, "qwen3_moe", loaded, config, prefix)
    assert layer.wi_0.dtype == jnp.bfloat16
    x = rng.standard_normal((NUM_TOKENS, config["hidden_size"])).astype(np.float32)
    rounded = {k: np.asarray(v.astype(jnp.float32)) for k, v in loaded.items()}
    ref, margin = numpy_families.BLOCKS["qwen3_moe"](np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)), rounded, prefix, config)
    _compare(layer(jnp.asarray(x, jnp.bfloat16)), ref, margin, 1e-2)


def test_checkpoint_errors_name_the_problem(rng):
    config = TINY_CONFIGS["gpt_oss"]
    tensors = numpy_families.random_checkpoint("gpt_oss", config, "", rng)
    quantized = {k: v for k, v in tensors.items() if "gate_up_proj" not in k}
    quantized["experts.gate_up_proj_blocks"] = np.zeros(1, np.uint8)
    with pytest.raises(ValueError, match="the tensors are quantized: pass the checkpoint.s config.json with its quantization_config"):
        checkpoints.convert_block("gpt_oss", quantized, config)
    with pytest.raises(ValueError, match="family must be one of"):
        checkpoints.layer_kwargs("llama", config)
    smaller = FusedMoE(**(checkpoints.layer_kwargs("gpt_oss", config) | dict(intermediate_size=8)),
                       backend="reference", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"wi_0: the layer holds \(8, 32, 8\), the checkpoint gives \(8, 32, 16\)"):
        checkpoints.load_block(smaller, "gpt_oss", tensors, config)


# --------------------------------------------------------------------------------------------
# The variants on their own, interpreter against the reference
# --------------------------------------------------------------------------------------------

E, H, F, T = 16, 24, 20, 21


def _experts(key, num_experts=E, num_shared=0, dtype=jnp.float32):
    keys = jax.random.split(key, 8)
    normal = lambda k, shape, scale: (jax.random.normal(k, shape) * scale).astype(dtype)
    params = dict(
        w_gate=normal(keys[0], (num_experts, H, F), 2.0 / H**0.5),
        w_up=normal(keys[1], (num_experts, H, F), 2.0 / H**0.5),
        w_down=normal(keys[2], (num_experts, F, H), F**-0.5),
    )
    if num_shared:
        params |= dict(
            shared_w_gate=normal(keys[3], (num_shared, H, F), H**-0.5),
            shared_w_up=normal(keys[4], (num_shared, H, F), H**-0.5),
            shared_w_down=normal(keys[5], (num_shared, F, H), F**-0.5),
        )
    return params


def _biases(key, num_experts=E):
    k1, k2, k3 = jax.random.split(key, 3)
    return dict(
        gate_bias=jax.random.normal(k1, (num_experts, F)),
        up_bias=jax.random.normal(k2, (num_experts, F)),
        down_bias=0.5 * jax.random.normal(k3, (num_experts, H)),
    )


ROUTINGS = {
    "deepseek": dict(top_k=4, scoring="sigmoid", num_groups=4, top_groups=2, routed_scaling_factor=2.5),
    "sigmoid-plain": dict(top_k=3, scoring="sigmoid", renormalize=False),
    "softmax-groups": dict(top_k=2, num_groups=8, top_groups=3),
    "softmax-bias-scaled": dict(top_k=5, routed_scaling_factor=0.5),
}


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("name", list(ROUTINGS))
def test_route_variants_match_numpy(rng, name, with_bias):
    options = ROUTINGS[name]
    logits = rng.standard_normal((67, E)).astype(np.float32) * 2
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32) if with_bias else None
    weights, ids = jax_moe.route(jnp.asarray(logits), selection_bias=None if bias is None else jnp.asarray(bias),
                                 backend="interpret", **options)
    ref_weights, ref_ids, margin = numpy_families.family_routing(logits, bias, **options)
    decisive = margin > DECISIVE_MARGIN
    assert decisive.mean() >= 0.9
    np.testing.assert_array_equal(np.asarray(ids)[decisive], ref_ids[decisive])
    np.testing.assert_allclose(np.asarray(weights)[decisive], ref_weights[decisive], rtol=1e-5, atol=1e-7)
    ref_weights_jax, ref_ids_jax = jax_moe.route(jnp.asarray(logits), selection_bias=None if bias is None else jnp.asarray(bias),
                                                 backend="reference", **options)
    np.testing.assert_array_equal(np.asarray(ref_ids_jax)[decisive], ref_ids[decisive])


CASES = {
    "gpt-oss": dict(top_k=4, activation="clamped_swiglu", bias=True),
    "deepseek": dict(top_k=4, scoring="sigmoid", num_groups=4, top_groups=2, routed_scaling_factor=2.5,
                     selection_bias=True, num_shared=2),
    "qwen2": dict(top_k=3, renormalize=False, num_shared=3, shared_gate=True),
    "everything": dict(top_k=2, activation=jax_moe.Activation("clamped_swiglu", alpha=1.3, limit=2.5),
                       bias=True, num_shared=1, shared_gate=True, scoring="sigmoid", selection_bias=True),
}


def _case(key, name):
    options = dict(CASES[name])
    k_x, k_logits, k_w, k_b, k_bias, k_gate = jax.random.split(key, 6)
    bias, num_shared = options.pop("bias", False), options.pop("num_shared", 0)
    args = dict(
        hidden_states=jax.random.normal(k_x, (T, H)),
        router_logits=2 * jax.random.normal(k_logits, (T, E)),
    ) | _experts(k_w, num_shared=num_shared)
    if bias:
        args |= _biases(k_b)
    if options.pop("selection_bias", False):
        args["selection_bias"] = 0.3 * jax.random.normal(k_bias, (E,))
    if options.pop("shared_gate", False):
        args["shared_gate"] = jax.random.normal(k_gate, (H,)) * H**-0.5
    return args, options


@pytest.mark.parametrize("name", list(CASES))
def test_variants_forward_match_reference(key, name):
    args, options = _case(key, name)
    out = jax.jit(lambda a: jax_moe.fused_moe(**a, **options, backend="interpret"))(args)
    ref = jax_moe.fused_moe(**args, **options, backend="reference")
    assert numpy_moe.rel_error(out, np.asarray(ref, np.float64)) <= 1e-5


@pytest.mark.parametrize("name", list(CASES))
def test_variants_gradients_match_reference(key, name):
    args, options = _case(key, name)
    cotangent = jax.random.normal(jax.random.fold_in(key, 1), (T, H))
    differentiable = {k: v for k, v in args.items() if k != "selection_bias"}
    fixed = {k: v for k, v in args.items() if k == "selection_bias"}

    def grads(backend):
        loss = lambda d: jnp.sum(jax_moe.fused_moe(**d, **fixed, **options, backend=backend) * cotangent)
        return jax.jit(jax.grad(loss))(differentiable)

    got, want = grads("interpret"), grads("reference")
    for name_ in differentiable:
        ref = np.asarray(want[name_], np.float64)
        assert np.linalg.norm(ref) > 0, name_
        assert numpy_moe.rel_error(got[name_], ref) <= 1e-4, name_


def test_routing_kernel_appends_the_shared_experts(key):
    """Ungated shared experts join each token's choices in the routing kernel (slots k .., ids
    E + s, weight 1), every slot written; fused_moe still returns the routed choices alone."""
    args, options = _case(key, "deepseek")
    top_k, num_shared = options["top_k"], args["shared_w_gate"].shape[0]
    routing = Routing(top_k, "sigmoid", True, 4, 2, 2.5)
    weights, ids = pipeline.top_k_routing(
        args["router_logits"], args["selection_bias"], routing=routing, launch=backend_interpret.launch,
        num_shared=num_shared,
    )
    routed_weights, routed_ids = jax_moe.route(
        args["router_logits"], selection_bias=args["selection_bias"], backend="interpret", **options
    )
    assert weights.shape == ids.shape == (T, top_k + num_shared)
    np.testing.assert_array_equal(ids[:, :top_k], routed_ids)
    np.testing.assert_array_equal(weights[:, :top_k], routed_weights)
    np.testing.assert_array_equal(ids[:, top_k:], np.broadcast_to(E + np.arange(num_shared), (T, num_shared)))
    np.testing.assert_array_equal(weights[:, top_k:], np.ones((T, num_shared), np.float32))

    out, returned_weights, returned_ids = jax_moe.fused_moe(**args, **options, backend="interpret", return_routing=True)
    np.testing.assert_array_equal(returned_ids, routed_ids)
    np.testing.assert_array_equal(returned_weights, routed_weights)
    ref = jax_moe.fused_moe(**args, **options, backend="reference")
    assert numpy_moe.rel_error(out, np.asarray(ref, np.float64)) <= 1e-5
