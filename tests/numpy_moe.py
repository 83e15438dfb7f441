"""Float64 numpy re-derivation of the MoE layer: the yardstick every backend is measured against."""

import numpy as np


def as_f64(a) -> np.ndarray:
    return np.asarray(np.asarray(a).astype(np.float32), dtype=np.float64)


def softmax_top_k(router_logits, top_k: int, renormalize: bool):
    logits = as_f64(router_logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    # Stable sort of the negated logits: largest first, ties to the lower expert index.
    ids = np.argsort(-logits, axis=-1, kind="stable")[..., :top_k]
    weights = np.take_along_axis(probs, ids, axis=-1)
    if renormalize:
        weights /= weights.sum(axis=-1, keepdims=True)
    return weights, ids


def experts(hidden_states, weights, ids, w_gate, w_up, w_down) -> np.ndarray:
    """sum_k weight_k * down_k(silu(x @ gate_k) * (x @ up_k)), one expert at a time."""
    hidden = hidden_states.shape[-1]
    x = as_f64(hidden_states).reshape(-1, hidden)
    top_k = np.shape(ids)[-1]
    ids = np.asarray(ids).reshape(-1, top_k)
    weights = as_f64(weights).reshape(-1, top_k)
    out = np.zeros_like(x)
    for expert in np.unique(ids[ids >= 0]):  # -1: a dropped pair
        tokens, slots = np.nonzero(ids == expert)
        xe = x[tokens]
        gate = xe @ as_f64(w_gate[expert])
        up = xe @ as_f64(w_up[expert])
        act = gate / (1.0 + np.exp(-gate)) * up
        np.add.at(out, tokens, weights[tokens, slots][:, None] * (act @ as_f64(w_down[expert])))
    return out.reshape(np.shape(hidden_states))


def drop_over_capacity(weights, ids, num_experts: int, capacity_factor: float):
    """Each expert keeps its first ceil(factor * T * k / E) pairs, counting every token's first
    choice before any second choice, each slot in token order; the rest get id -1, weight 0."""
    ids = np.array(ids).reshape(-1, np.shape(ids)[-1])
    weights = as_f64(weights).reshape(ids.shape).copy()
    num_tokens, top_k = ids.shape
    capacity = int(np.ceil(capacity_factor * num_tokens * top_k / num_experts))
    taken = np.zeros(num_experts, int)
    for slot in range(top_k):
        for token in range(num_tokens):
            expert = ids[token, slot]
            if taken[expert] < capacity:
                taken[expert] += 1
            else:
                ids[token, slot], weights[token, slot] = -1, 0.0
    return weights, ids


def fused_moe(hidden_states, router_logits, w_gate, w_up, w_down, top_k: int, renormalize: bool = True):
    weights, ids = softmax_top_k(router_logits, top_k, renormalize)
    return experts(hidden_states, weights, ids, w_gate, w_up, w_down)


def rel_error(out, ref) -> float:
    """||out - ref|| / ||ref||, NaN-poisoned: any NaN or inf in out fails every tolerance."""
    out = as_f64(out)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


TOLERANCE = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 1e-2}
