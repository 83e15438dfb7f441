"""Layer shapes of real MoE models and random inputs for them, shared by tests, demo and benchmarks."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jax_moe import tile_configs
from jax_moe.options import GPT_OSS_SWIGLU, SILU, Activation, Routing


@dataclasses.dataclass(frozen=True)
class MoeShape:
    """One MoE layer: its routed experts, its routing and activation (jax_moe's typed options) and,
    for the families that have them, a selection bias, expert biases and shared experts."""

    name: str
    num_experts: int
    routing: Routing
    hidden: int
    intermediate: int
    activation: Activation = SILU
    selection_bias: bool = False
    expert_bias: bool = False
    shared_intermediate: int = 0  # total width of the shared expert(s), split into F-wide ones
    shared_gate: bool = False

    @property
    def top_k(self) -> int:
        return self.routing.top_k

    @property
    def num_shared(self) -> int:
        return -(-self.shared_intermediate // self.intermediate)

    @property
    def slots(self) -> int:
        """Expert rows per token in the kernels: the routed top-k plus the shared experts."""
        return self.top_k + self.num_shared

    def static_options(self) -> dict:
        """The keyword arguments of ``jax_moe.fused_moe`` that are not arrays."""
        return dict(routing=self.routing, activation=self.activation)

    def tile_key(self, dtype) -> str:
        """The name of this layer's entry in a tuned tile table (``tile_configs.shape_key``)."""
        return tile_configs.shape_key(
            self.num_experts, self.hidden, self.intermediate, self.top_k, jnp.dtype(dtype).name, self.num_shared
        )

    def with_experts(self, num_experts: int) -> MoeShape:
        """The same layer with fewer experts (to fit a test in memory); top_k and the groups are
        capped to match."""
        routing = self.routing
        groups = routing.num_groups if num_experts % routing.num_groups == 0 and num_experts >= routing.num_groups else 1
        top_groups = None if groups == 1 or routing.top_groups is None else min(routing.top_groups, groups)
        eligible = (top_groups or groups) * (num_experts // groups)
        return dataclasses.replace(
            self,
            name=f"{self.name}[E={num_experts}]",
            num_experts=num_experts,
            routing=dataclasses.replace(
                routing, top_k=min(routing.top_k, eligible), num_groups=groups, top_groups=top_groups
            ),
        )

    def weight_bytes(self, dtype) -> int:
        experts = self.num_experts + self.num_shared
        return 3 * experts * self.hidden * self.intermediate * jnp.dtype(dtype).itemsize


MIXTRAL_8X7B = MoeShape("mixtral-8x7b", num_experts=8, routing=Routing(2), hidden=4096, intermediate=14336)
DEEPSEEK_V3 = MoeShape(
    "deepseek-v3", num_experts=256, hidden=7168, intermediate=2048,
    routing=Routing(8, scoring="sigmoid", num_groups=8, top_groups=4, routed_scaling_factor=2.5),
    selection_bias=True, shared_intermediate=2048,
)
QWEN3_30B_A3B = MoeShape("qwen3-30b-a3b", num_experts=128, routing=Routing(8), hidden=2048, intermediate=768)
GPT_OSS_120B = MoeShape(
    "gpt-oss-120b", num_experts=128, routing=Routing(4), hidden=2880, intermediate=2880, expert_bias=True,
    activation=GPT_OSS_SWIGLU,
)
QWEN2_57B_A14B = MoeShape(
    "qwen2-57b-a14b", num_experts=64, routing=Routing(8, renormalize=False), hidden=3584, intermediate=2560,
    shared_intermediate=20480, shared_gate=True,
)
MODELS = (MIXTRAL_8X7B, DEEPSEEK_V3, QWEN3_30B_A3B, GPT_OSS_120B, QWEN2_57B_A14B)


# DeepSeek-V3 learns its selection bias to balance the load its router's logits make. Random
# logits are balanced already, so the bias that keeps them so is near zero: at std 0.1, next to
# sigmoid scores that crowd near 1, the bias chose the experts (T = 4096: 49 of 256 never chosen,
# one chosen 10x its share). At 1e-3 the loads match the unbiased ones'.
SELECTION_BIAS_STD = 1e-3


@dataclasses.dataclass(frozen=True)
class MoeInputs:
    hidden_states: jax.Array  # [T, H]
    router_logits: jax.Array  # [T, E] float32
    w_gate: jax.Array  # [E, H, F]
    w_up: jax.Array  # [E, H, F]
    w_down: jax.Array  # [E, F, H]
    extras: dict = dataclasses.field(default_factory=dict)  # the family's other fused_moe arrays

    def as_args(self):
        return (self.hidden_states, self.router_logits, self.w_gate, self.w_up, self.w_down)


# Arrays of more elements are drawn one leading slice at a time (see _normal_by_slices).
MAX_WHOLE_DRAW = 1 << 28


def random_inputs(shape: MoeShape, num_tokens: int, dtype, key: jax.Array) -> MoeInputs:
    """Standard-normal activations and logits; weights scaled by 1/sqrt(fan-in) so outputs stay O(1).

    ``extras`` holds what the family adds (selection bias, expert biases, shared experts and their
    gate), keyed by ``jax_moe.fused_moe``'s argument names. Drawn on the default device (a
    DeepSeek-sized layer is too big to draw on the host). Never zeros: zeros hide unwritten
    outputs and wrong indexing.
    """
    e, h, f, s = shape.num_experts, shape.hidden, shape.intermediate, shape.num_shared
    keys = iter(jax.random.split(key, 13))

    def normal(size, scale=1.0, as_dtype=dtype):
        if math.prod(size) > MAX_WHOLE_DRAW:
            return _normal_by_slices(next(keys), tuple(size), float(scale), jnp.dtype(as_dtype))
        return (jax.random.normal(next(keys), size, jnp.float32) * scale).astype(as_dtype)

    extras = {}
    if shape.selection_bias:
        extras["selection_bias"] = normal((e,), SELECTION_BIAS_STD, jnp.float32)
    if shape.expert_bias:
        extras |= dict(gate_bias=normal((e, f), 0.5), up_bias=normal((e, f), 0.5), down_bias=normal((e, h), 0.1))
    if s:
        extras |= dict(
            shared_w_gate=normal((s, h, f), h**-0.5),
            shared_w_up=normal((s, h, f), h**-0.5),
            shared_w_down=normal((s, f, h), (s * f) ** -0.5),
        )
    if shape.shared_gate:
        extras["shared_gate"] = normal((h,), h**-0.5)
    # gpt-oss's clamps (limit 7) should bind now and then: larger gate/up pre-activations.
    gain = 4.0 if shape.activation.name == "clamped_swiglu" else 1.0
    return MoeInputs(
        hidden_states=normal((num_tokens, h)),
        router_logits=normal((num_tokens, e), as_dtype=jnp.float32),
        w_gate=normal((e, h, f), gain * h**-0.5),
        w_up=normal((e, h, f), gain * h**-0.5),
        w_down=normal((e, f, h), f**-0.5),
        extras=extras,
    )


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _normal_by_slices(key, size, scale, dtype):
    """``normal`` one leading slice (one expert's matrix) at a time: the fp32 draw of a whole
    DeepSeek-V3 weight matrix needs 14 GiB of scratch, which a GPU's memory pool holding other
    arrays may not have in one piece."""
    draw = lambda k: (jax.random.normal(k, size[1:], jnp.float32) * scale).astype(dtype)
    return jax.lax.map(draw, jax.random.split(key, size[0]))


def zipf_router_logits(key: jax.Array, num_tokens: int, num_experts: int, s: float = 1.2) -> jax.Array:
    """Router logits whose top-k picks experts with Zipf popularity (expert e chosen ~ 1/(e+1)^s).

    Gumbel-top-k: adding Gumbel noise to log-probabilities and taking the top k draws k experts
    without replacement, each in proportion to its probability.
    """
    log_p = -s * jnp.log(jnp.arange(1, num_experts + 1, dtype=jnp.float32))
    return log_p + jax.random.gumbel(key, (num_tokens, num_experts), jnp.float32)


def input_sets(
    shape: MoeShape, weights: MoeInputs, num_tokens: int, key: jax.Array, *, count: int = 3,
    routing: str = "uniform", with_cotangent: bool = False,
) -> list[tuple]:
    """``count`` argument tuples ``(x, logits, w_gate, w_up, w_down[, cotangent], extras)`` for
    timing: fresh activations (in the weights' dtype) and router logits per tuple (standard normal,
    or with ``routing="zipf"`` Zipf(1.2)-popular experts), ``weights``' arrays in every one. Cycling
    over several keeps a call's activations out of L2 when the next call starts."""
    if routing not in ("uniform", "zipf"):
        raise ValueError(f'routing must be "uniform" or "zipf"; got {routing!r}')
    sets = []
    for k in jax.random.split(key, count):
        x_key, logits_key, cotangent_key = jax.random.split(k, 3)
        if routing == "zipf":
            logits = zipf_router_logits(logits_key, num_tokens, shape.num_experts)
        else:
            logits = jax.random.normal(logits_key, (num_tokens, shape.num_experts))
        x = jax.random.normal(x_key, (num_tokens, shape.hidden), weights.w_gate.dtype)
        cotangent = (jax.random.normal(cotangent_key, (num_tokens, shape.hidden)),) if with_cotangent else ()
        sets.append((x, logits, weights.w_gate, weights.w_up, weights.w_down, *cotangent, weights.extras))
    return sets
