"""Static choices that select a model family's routing and expert activation.

Both are frozen (hashable) dataclasses: they are fixed at trace time, select kernel variants through
constexprs, and key the caches of compiled custom-VJP rules.
"""

from __future__ import annotations

import dataclasses

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "clamped_swiglu")


@dataclasses.dataclass(frozen=True)
class Routing:
    """How router logits become each token's ``top_k`` experts and their weights.

    * ``scoring``: ``"softmax"`` over all experts (Mixtral, Qwen2/3-MoE, gpt-oss) or an independent
      ``"sigmoid"`` per expert (DeepSeek-V3).
    * Experts are ranked on their scores, plus the selection bias where one is given (DeepSeek-V3's
      ``e_score_correction_bias``: it changes which experts win, not their weights).
    * ``num_groups > 1``: experts form that many equal groups of consecutive ids; a group scores the
      sum of its two best ranking values, and a token chooses among the experts of its
      ``top_groups`` best groups only (DeepSeek-V3: 8 groups, 4 kept; None keeps all).
    * weights: the chosen experts' (unbiased) scores, divided by their sum when ``renormalize``,
      times ``scaling_factor`` (DeepSeek-V3's ``routed_scaling_factor``).

    gpt-oss takes a softmax over its k best logits: that is ``scoring="softmax"`` with
    ``renormalize=True``, the Mixtral routing.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_groups: int = 1
    top_groups: int | None = None  # None: every group
    scaling_factor: float = 1.0

    @property
    def kept_groups(self) -> int:
        return self.num_groups if self.top_groups is None else self.top_groups


@dataclasses.dataclass(frozen=True)
class Activation:
    """The gated activation between the gate/up and down projections.

    * ``"silu"``: ``silu(gate) * up`` (SwiGLU; Mixtral, Qwen, DeepSeek).
    * ``"clamped_swiglu"`` (gpt-oss): ``g * sigmoid(alpha * g) * (u + 1)`` with
      ``g = min(gate, limit)`` and ``u = clip(up, -limit, limit)``.
    """

    name: str = "silu"
    alpha: float = 1.0
    limit: float = float("inf")


SILU = Activation()
GPT_OSS_SWIGLU = Activation("clamped_swiglu", alpha=1.702, limit=7.0)


def as_activation(activation) -> Activation:
    """An ``Activation`` from itself or its name ("silu"; "clamped_swiglu" gets gpt-oss's alpha
    1.702 and limit 7); raises TypeError/ValueError on anything else."""
    if isinstance(activation, str):
        activation = {"silu": SILU, "clamped_swiglu": GPT_OSS_SWIGLU}.get(activation, Activation(activation))
    if not isinstance(activation, Activation):
        raise TypeError(f"activation must be a name or a jax_moe.Activation; got {type(activation).__name__}")
    if activation.name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation.name!r}")
    if activation.name == "clamped_swiglu" and not activation.limit > 0:
        raise ValueError(f"the clamped_swiglu limit must be positive; got {activation.limit}")
    return activation
