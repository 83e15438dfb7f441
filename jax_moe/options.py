"""The typed options of an MoE layer: how tokens are routed (``Routing``), the gated activation
(``Activation``) and the expert parameters (``ExpertWeights``).

These are the one home of every option. The functions of ``jax_moe`` take them directly
(``routing=``, ``experts=``, ``activation=``); their flat keywords (``top_k=2``, ``gate_bias=...``)
are sugar that ``gather`` turns into them. ``Routing`` and ``Activation`` are frozen, hashable
dataclasses fixed at trace time: they select kernel variants through constexprs and key the caches
of compiled custom-VJP rules. ``ExpertWeights`` is a pytree of arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import numpy as np

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "clamped_swiglu")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


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
    * weights: the chosen experts' (unbiased) scores, divided by their sum when ``renormalize``
      (Mixtral, Qwen3, DeepSeek-V3, gpt-oss; Qwen2-MoE keeps the raw scores), times
      ``routed_scaling_factor`` (DeepSeek-V3: 2.5).
    * ``capacity_factor``: None (default) drops nothing. A number caps each expert at
      ``expert_capacity(T, E) = ceil(capacity_factor * T * top_k / E)`` of the pairs of T tokens,
      T counting the tokens one device routes in the call (under a mesh, each device's own
      tokens). The pairs past an expert's capacity are dropped in a fixed order, every token's
      first choice before any second choice and then by token: a dropped pair has id -1 and
      weight 0 in the routing returned, and contributes nothing to the output.

    gpt-oss takes a softmax over its k best logits: that is ``scoring="softmax"`` with
    ``renormalize=True``, the Mixtral routing.

    Everything that does not depend on the number of experts is checked here, at construction;
    ``check_experts`` checks the rest against a layer.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_groups: int = 1
    top_groups: int | None = None  # None: every group
    routed_scaling_factor: float = 1.0
    capacity_factor: float | None = None  # None: no pair dropped

    def __post_init__(self):
        if not _is_int(self.top_k):
            raise TypeError(f"top_k must be a Python int; got {type(self.top_k).__name__} {self.top_k!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1; got {self.top_k}")
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}; got {self.scoring!r}")
        if not isinstance(self.renormalize, (bool, np.bool_)):
            raise TypeError(f"renormalize must be a bool; got {type(self.renormalize).__name__}")
        if not _is_int(self.num_groups):
            raise TypeError(f"num_groups must be an int; got {type(self.num_groups).__name__} {self.num_groups!r}")
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be a positive int; got {self.num_groups!r}")
        kept = self.kept_groups
        if not _is_int(kept):
            raise TypeError(f"top_groups must be an int or None; got {type(kept).__name__} {kept!r}")
        if not 1 <= kept <= self.num_groups:
            raise ValueError(f"top_groups must be an int in [1, num_groups={self.num_groups}]; got {kept!r}")
        factor = self.routed_scaling_factor
        if not _is_real(factor):
            raise TypeError(f"routed_scaling_factor must be a Python number; got {type(factor).__name__} {factor!r}")
        if not math.isfinite(factor):
            raise ValueError(f"routed_scaling_factor must be finite; got {factor!r}")
        capacity = self.capacity_factor
        if capacity is not None:
            if not _is_real(capacity):
                raise TypeError(f"capacity_factor must be a Python number or None; got {type(capacity).__name__} {capacity!r}")
            if not (math.isfinite(capacity) and capacity > 0):
                raise ValueError(f"capacity_factor must be positive and finite; got {capacity!r}")

    @property
    def kept_groups(self) -> int:
        return self.num_groups if self.top_groups is None else self.top_groups

    def expert_capacity(self, num_tokens: int, num_experts: int) -> int | None:
        """The most pairs of ``num_tokens`` tokens one expert computes; None without a capacity."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / num_experts)

    def check_experts(self, num_experts: int) -> None:
        """Raises ValueError unless this routing can choose among ``num_experts`` experts."""
        if self.top_k > num_experts:
            raise ValueError(f"top_k must lie in [1, {num_experts}] (the number of experts); got {self.top_k}")
        if num_experts % self.num_groups:
            raise ValueError(f"num_groups ({self.num_groups}) must divide the number of experts E={num_experts}")
        eligible = self.kept_groups * (num_experts // self.num_groups)
        if self.top_k > eligible:
            raise ValueError(
                f"top_k={self.top_k} exceeds the {eligible} experts of the top_groups={self.kept_groups} kept groups"
            )


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

    def __post_init__(self):
        if self.name not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {self.name!r}")
        for field in ("alpha", "limit"):
            value = getattr(self, field)
            if not _is_real(value) or math.isnan(value):
                raise TypeError(f"the activation's {field} must be a real number; got {value!r}")
        if self.name == "clamped_swiglu" and not self.limit > 0:
            raise ValueError(f"the clamped_swiglu limit must be positive; got {self.limit}")

    @classmethod
    def of(cls, activation: str | Activation) -> Activation:
        """An ``Activation`` from itself or its name ("silu"; "clamped_swiglu" gets gpt-oss's
        alpha 1.702 and limit 7)."""
        if isinstance(activation, str):
            return {"silu": SILU, "clamped_swiglu": GPT_OSS_SWIGLU}.get(activation) or cls(activation)
        if not isinstance(activation, Activation):
            raise TypeError(f"activation must be a name or a jax_moe.Activation; got {type(activation).__name__}")
        return activation


SILU = Activation()
GPT_OSS_SWIGLU = Activation("clamped_swiglu", alpha=1.702, limit=7.0)


class ExpertWeights(NamedTuple):
    """The expert parameters of one layer (a pytree; optional parts are ``None``).

    * ``w_gate``, ``w_up`` [E, H, F] and ``w_down`` [E, F, H]: the routed experts (x @ w layouts).
    * ``gate_bias``, ``up_bias`` [E, F] and ``down_bias`` [E, H]: their biases, all or none (gpt-oss).
    * ``shared_w_gate``, ``shared_w_up`` [S, H, F] and ``shared_w_down`` [S, F, H]: S shared
      experts that every token uses (DeepSeek-V3, Qwen2-MoE), numbered ``E .. E + S - 1`` after the
      routed ones; they run in the same kernel launches. A shared expert wider than F is several
      (``jax_moe.split_shared_expert``).
    * ``shared_gate`` [H]: scales the shared experts' output by ``sigmoid(x @ shared_gate)``
      (Qwen2-MoE); without it their weight is 1.
    """

    w_gate: Any
    w_up: Any
    w_down: Any
    gate_bias: Any = None
    up_bias: Any = None
    down_bias: Any = None
    shared_w_gate: Any = None
    shared_w_up: Any = None
    shared_w_down: Any = None
    shared_gate: Any = None

    @property
    def num_routed(self) -> int:
        return self.w_gate.shape[0]

    @property
    def num_shared(self) -> int:
        return 0 if self.shared_w_gate is None else self.shared_w_gate.shape[0]

    @property
    def has_bias(self) -> bool:
        return self.gate_bias is not None


ROUTING_KEYWORDS = tuple(f.name for f in dataclasses.fields(Routing))
EXPERT_KEYWORDS = ExpertWeights._fields[3:]


def gather(caller: str, *, w_gate=None, w_up=None, w_down=None, experts: ExpertWeights | None = None,
           routing: Routing | None = None, keywords: dict, takes_routing: bool = True,
           takes_experts: bool = True) -> tuple[ExpertWeights | None, Routing | None]:
    """The typed options of a call from its typed and flat arguments: the one place where flat
    keywords (``top_k=2``, ``gate_bias=...``) become a ``Routing`` and ``ExpertWeights``.

    ``caller`` names the function in errors; ``takes_routing``/``takes_experts`` say which of the
    two it accepts. Raises TypeError for unknown keywords and for an option given both ways.
    """
    allowed = (ROUTING_KEYWORDS if takes_routing else ()) + (EXPERT_KEYWORDS if takes_experts else ())
    unknown = sorted(set(keywords) - set(allowed))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; its flat options are {list(allowed)}")
    flat_routing = {k: v for k, v in keywords.items() if k in ROUTING_KEYWORDS}
    flat_experts = {k: v for k, v in keywords.items() if k in EXPERT_KEYWORDS}
    if takes_routing:
        if routing is not None:
            if flat_routing:
                raise TypeError(f"{caller}(): pass routing=Routing(...) or its fields {sorted(flat_routing)}, not both")
            if not isinstance(routing, Routing):
                raise TypeError(f"routing must be a jax_moe.Routing; got {type(routing).__name__}")
        elif "top_k" not in flat_routing:
            raise TypeError(f"{caller}() needs routing=jax_moe.Routing(...) or top_k=")
        else:
            routing = Routing(**flat_routing)
    if takes_experts:
        arrays = {"w_gate": w_gate, "w_up": w_up, "w_down": w_down}
        if experts is not None:
            given = sorted(name for name, a in arrays.items() if a is not None) + sorted(flat_experts)
            if given:
                raise TypeError(f"{caller}(): pass experts=ExpertWeights(...) or the arrays {given}, not both")
            if not isinstance(experts, ExpertWeights):
                raise TypeError(f"experts must be a jax_moe.ExpertWeights; got {type(experts).__name__}")
        else:
            missing = [name for name, a in arrays.items() if a is None]
            if missing:
                raise TypeError(f"{caller}() needs experts=ExpertWeights(...) or w_gate, w_up and w_down; missing {missing}")
            experts = ExpertWeights(w_gate, w_up, w_down, **flat_experts)
    return experts, routing
