"""Layer shapes of real MoE models and random inputs for them, shared by tests, demo and benchmarks."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MoeShape:
    """The routed-expert part of one MoE layer."""

    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    renormalize: bool = True

    def with_experts(self, num_experts: int) -> MoeShape:
        """The same layer with fewer experts (to fit a test in memory); top_k is capped to match."""
        return dataclasses.replace(
            self,
            name=f"{self.name}[E={num_experts}]",
            num_experts=num_experts,
            top_k=min(self.top_k, num_experts),
        )

    def weight_bytes(self, dtype) -> int:
        return 3 * self.num_experts * self.hidden * self.intermediate * jnp.dtype(dtype).itemsize


MIXTRAL_8X7B = MoeShape("mixtral-8x7b", num_experts=8, top_k=2, hidden=4096, intermediate=14336)
DEEPSEEK_V3 = MoeShape("deepseek-v3", num_experts=256, top_k=8, hidden=7168, intermediate=2048)
QWEN3_30B_A3B = MoeShape("qwen3-30b-a3b", num_experts=128, top_k=8, hidden=2048, intermediate=768)
GPT_OSS_120B = MoeShape("gpt-oss-120b", num_experts=128, top_k=4, hidden=2880, intermediate=2880)
MODELS = (MIXTRAL_8X7B, DEEPSEEK_V3, QWEN3_30B_A3B, GPT_OSS_120B)


@dataclasses.dataclass(frozen=True)
class MoeInputs:
    hidden_states: jax.Array  # [T, H]
    router_logits: jax.Array  # [T, E] float32
    w_gate: jax.Array  # [E, H, F]
    w_up: jax.Array  # [E, H, F]
    w_down: jax.Array  # [E, F, H]

    def as_args(self):
        return (self.hidden_states, self.router_logits, self.w_gate, self.w_up, self.w_down)


def random_inputs(shape: MoeShape, num_tokens: int, dtype, key: jax.Array) -> MoeInputs:
    """Standard-normal activations and logits; weights scaled by 1/sqrt(fan-in) so outputs stay O(1).

    Drawn on the default device (a DeepSeek-sized layer is too big to draw on the host). Never
    zeros: zeros hide unwritten outputs and wrong indexing.
    """
    e, h, f = shape.num_experts, shape.hidden, shape.intermediate
    keys = jax.random.split(key, 5)

    def normal(k, size, scale=1.0):
        return (jax.random.normal(k, size, jnp.float32) * scale).astype(dtype)

    return MoeInputs(
        hidden_states=normal(keys[0], (num_tokens, h)),
        router_logits=normal(keys[1], (num_tokens, e)).astype(jnp.float32),
        w_gate=normal(keys[2], (e, h, f), h**-0.5),
        w_up=normal(keys[3], (e, h, f), h**-0.5),
        w_down=normal(keys[4], (e, f, h), f**-0.5),
    )


def zipf_router_logits(key: jax.Array, num_tokens: int, num_experts: int, s: float = 1.2) -> jax.Array:
    """Router logits whose top-k picks experts with Zipf popularity (expert e chosen ~ 1/(e+1)^s).

    Gumbel-top-k: adding Gumbel noise to log-probabilities and taking the top k draws k experts
    without replacement, each in proportion to its probability.
    """
    log_p = -s * jnp.log(jnp.arange(1, num_experts + 1, dtype=jnp.float32))
    return log_p + jax.random.gumbel(key, (num_tokens, num_experts), jnp.float32)
