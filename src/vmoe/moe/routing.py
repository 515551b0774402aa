"""Pure routing math of V-MoE (Riquelme et al. 2021, arXiv 2106.05974, Sec. 2 and App. A).

Shape legend used in this package:
    G  routing groups          S  tokens per group        E  experts
    K  experts chosen per token (k)                         C  capacity (buffer slots per expert per group)
    D  model dim               M  expert hidden dim         N  tokens in the batch (= G * S)

Everything here is a function of tensors; nothing has parameters. The router module and the
MoE layer are built from these functions, and the tests check them against hand-computed cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "Routing",
    "compute_capacity",
    "cv_squared",
    "gshard_loss",
    "importance_loss",
    "load_loss",
    "top_experts_per_item",
    "top_k",
    "z_loss",
]

Priority = Literal["max", "sum"]
_Z_MAX = 12.0


def compute_capacity(
    group_size: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: float,
    *,
    multiple_of: int = 4,
    rounding: Literal["ceil", "round"] = "ceil",
) -> int:
    """Buffer slots per expert per group: ``ceil(S * k * C / E)``, then up to a multiple.

    As the official implementation, the product is evaluated as ``(S * k / E) * C``; the
    result must be at least 1 *before* rounding up to ``multiple_of`` (0 disables that).

    Args:
        group_size: S, tokens per routing group.
        num_experts: E.
        num_selected: k, experts chosen per token.
        capacity_factor: C > 0 (1.05 pre-training, 1.5 fine-tuning; < 1 drops tokens).
        multiple_of: round the capacity up to a multiple of this (4 in V-MoE; 0 or 1 = none).
        rounding: ``"ceil"`` (V-MoE) or ``"round"``.
    Raises:
        ValueError: an argument out of range, or a capacity below 1.
    """
    sizes = (("group_size", group_size), ("num_experts", num_experts), ("num_selected", num_selected))
    for name, value in sizes:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if num_selected > num_experts:
        raise ValueError(f"num_selected (k={num_selected}) must be <= num_experts (E={num_experts})")
    if (
        not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    if not isinstance(multiple_of, int) or multiple_of < 0:
        raise ValueError(f"multiple_of must be an integer >= 0, got {multiple_of!r}")
    if rounding not in ("ceil", "round"):
        raise ValueError(f"rounding must be 'ceil' or 'round', got {rounding!r}")
    proportional = group_size * num_selected / num_experts
    raw = proportional * capacity_factor
    capacity = math.ceil(raw) if rounding == "ceil" else round(raw)
    if capacity < 1:
        raise ValueError(
            f"capacity {capacity} < 1 for group_size={group_size}, num_experts={num_experts}, "
            f"num_selected={num_selected}, capacity_factor={capacity_factor}: raise the capacity factor "
            "or the group size"
        )
    if multiple_of > 1:
        capacity += (-capacity) % multiple_of
    return capacity


@dataclass
class Routing:
    """Which expert buffer slot every (token, choice) goes to.

    Attributes (leading ``...`` is (G,) or empty):
        expert_index: (..., S, K) int64, the k-th choice of each token (descending gate).
        slot: (..., S, K) int64, position in that expert's buffer, numbered from 0 in fill order
            (every first choice before any second choice; within a rank, array order or BPR
            priority order). Values >= ``capacity`` mean dropped.
        kept: (..., S, K) bool, ``slot < capacity``.
        weights: (..., S, K), the gate values of kept assignments (never renormalised), 0 where
            dropped; dtype of the gates.
        num_experts: E.
        capacity: C.
    """

    expert_index: torch.Tensor
    slot: torch.Tensor
    kept: torch.Tensor
    weights: torch.Tensor
    num_experts: int
    capacity: int

    @property
    def num_selected(self) -> int:
        return self.expert_index.shape[-1]

    def dense_combine(self) -> torch.Tensor:
        """(..., S, E, C): the weight at [s, e, slot] of every kept assignment, 0 elsewhere."""
        return self._dense(self.weights)

    def dense_dispatch(self) -> torch.Tensor:
        """(..., S, E, C) in the gates' dtype: 1 at [s, e, slot] of every kept assignment."""
        return self._dense(self.kept.to(self.weights.dtype))

    def _dense(self, values: torch.Tensor) -> torch.Tensor:
        dtype = values.dtype
        onehot_e = F.one_hot(self.expert_index, self.num_experts).to(dtype)  # (..., S, K, E)
        slot = torch.where(self.kept, self.slot, torch.zeros_like(self.slot))
        values = torch.where(self.kept, values, torch.zeros_like(values))  # dropped: no value, no gradient
        onehot_c = F.one_hot(slot, self.capacity).to(dtype)  # (..., S, K, C)
        return torch.einsum("...ske,...skc,...sk->...sec", onehot_e, onehot_c, values)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of the last axis, descending; ties go to the lower index.

    As ``jax.lax.top_k`` in the official code (``torch.topk`` leaves the order of ties unspecified:
    on the CPU it prefers the *higher* index). Small ``k`` uses repeated ``max`` (first maximum),
    otherwise a stable descending sort; both give the same result. Values are differentiable.

    Returns:
        values (..., k) and int64 indices (..., k).
    """
    if k > 4:
        values, index = torch.sort(x, dim=-1, descending=True, stable=True)
        return values[..., :k], index[..., :k]
    with torch.no_grad():
        work = x.detach()
        idx = []
        for j in range(k):
            i = work.argmax(dim=-1, keepdim=True)  # first maximum
            idx.append(i)
            if j + 1 < k:
                work = work.scatter(-1, i, float("-inf"))
        index = torch.cat(idx, dim=-1) if k > 1 else idx[0]
    return torch.gather(x, -1, index), index


def _rank_within_expert(seq: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(G, L) expert ids -> (G, L): how many earlier entries of the row have the same id.

    Sort-based (no (G, L, E) one-hot cumsum): sorting the unique keys ``id * L + position``
    groups each expert's entries in sequence order; an entry's rank is its place in the sorted
    row minus where its expert's run starts.
    """
    G, L = seq.shape
    pos = torch.arange(L, device=seq.device, dtype=torch.int64)
    sorted_key, perm = torch.sort(seq * L + pos, dim=1)
    sorted_e = torch.div(sorted_key, L, rounding_mode="floor")
    experts = torch.arange(num_experts, device=seq.device, dtype=torch.int64).expand(G, num_experts)
    starts = torch.searchsorted(sorted_e, experts.contiguous())  # (G, E) where each expert's run starts
    rank_sorted = pos.expand(G, L) - torch.gather(starts, 1, sorted_e)
    return torch.empty_like(seq).scatter_(1, perm, rank_sorted)


def top_experts_per_item(
    gates: torch.Tensor,
    num_selected: int,
    capacity: int,
    *,
    batch_priority: bool = False,
    priority: Priority = "max",
) -> Routing:
    """Top-k routing with capacity buffers, vanilla or Batch Prioritized (BPR).

    1. Each token picks its ``k`` largest gates (descending; on a tie the lower expert id first).
    2. Buffers are filled k-major: all first choices, then all second choices, ...
    3. Within a choice rank, tokens go in array order (vanilla) or, with ``batch_priority``,
       in descending order of their priority score (``"max"``: the top-1 gate, as in the
       paper; ``"sum"``: the sum of the top-k gates). Ties keep array order.
    4. An assignment landing past ``capacity`` is dropped (weight 0).

    Args:
        gates: (S, E) or (G, S, E), already softmaxed. No host synchronisation happens here.
        num_selected: k, 1 <= k <= E.
        capacity: slots per expert per group, >= 1.
    Returns:
        a :class:`Routing` with the leading shape of ``gates`` minus its last axis, plus K.
    """
    if gates.dim() not in (2, 3):
        raise ValueError(f"gates must have shape (S, E) or (G, S, E), got {tuple(gates.shape)}")
    num_experts = gates.shape[-1]
    if not 1 <= num_selected <= num_experts:
        raise ValueError(f"num_selected must be in [1, num_experts={num_experts}], got {num_selected}")
    if not isinstance(capacity, (int, torch.SymInt)) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
    if priority not in ("max", "sum"):
        raise ValueError(f"priority must be 'max' or 'sum', got {priority!r}")
    squeeze = gates.dim() == 2
    g = gates.unsqueeze(0) if squeeze else gates  # (G, S, E)
    G, S, E = g.shape

    top_w, top_e = top_k(g, num_selected)  # (G, S, K), descending, ties to the lower expert id
    if batch_priority:
        score = top_w[..., 0] if priority == "max" else top_w.sum(dim=-1)  # (G, S)
        order = torch.sort(score.detach(), dim=-1, descending=True, stable=True).indices  # (G, S)
        e_fill = torch.gather(top_e, 1, order.unsqueeze(-1).expand(-1, -1, num_selected))
    else:
        order = None
        e_fill = top_e
    # k-major fill sequence: (G, K*S) expert ids, then the running count per expert.
    seq = e_fill.transpose(1, 2).reshape(G, num_selected * S)
    slot_seq = _rank_within_expert(seq, E)  # (G, K*S)
    slot_fill = slot_seq.view(G, num_selected, S).transpose(1, 2)  # (G, S, K) in fill order
    if order is not None:
        slot = torch.empty_like(slot_fill)
        slot.scatter_(1, order.unsqueeze(-1).expand(-1, -1, num_selected), slot_fill)
    else:
        slot = slot_fill.contiguous()
    kept = slot < capacity
    weights = top_w * kept.to(top_w.dtype)
    routing = Routing(top_e, slot, kept, weights, num_experts=E, capacity=capacity)
    if squeeze:
        routing = Routing(top_e[0], slot[0], kept[0], weights[0], num_experts=E, capacity=capacity)
    return routing


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last axis: ``(std / mean)^2``, population std."""
    return (values.std(dim=-1, correction=0) / values.mean(dim=-1)) ** 2


def importance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Importance loss per group: ``cv(sum_s gates[s, e])^2``.

    Args:
        gates: (..., S, E) softmax of the *clean* router logits.
    Returns:
        (...) one value per group.
    """
    return cv_squared(gates.sum(dim=-2))


def load_loss(
    logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, num_selected: int
) -> torch.Tensor:
    """Load loss per group (paper App. A): a smooth estimate of how many tokens each expert gets.

    ``thr_s`` is the k-th largest noisy logit of token s; the probability that expert e is
    still selected when its noise is re-drawn is ``p[s, e] = 1 - Phi((thr_s - logits[s, e]) / sigma)``;
    ``load_e = mean_s p[s, e]``; the loss is ``cv(load)^2``.

    Args:
        logits: (..., S, E) clean router logits.
        noisy_logits: (..., S, E) the logits plus the noise actually used for routing.
        noise_std: sigma, the std of that noise (``noise_std / E`` in V-MoE), > 0.
        num_selected: k.
    Returns:
        (...) one value per group.
    """
    if noise_std <= 0:
        raise ValueError(f"noise_std must be > 0 for the load loss, got {noise_std}")
    threshold = top_k(noisy_logits, num_selected)[0][..., -1:]  # (..., S, 1)
    # p = 1 - Phi((thr - logit) / sigma) = Phi((logit - thr) / sigma). z is clamped to +-_Z_MAX: beyond
    # it Phi and its density underflow to denormals (slow on CPUs) and change nothing measurable
    # (Phi(-12) = 1.8e-33; the density there is 2e-32).
    z = ((logits - threshold) / noise_std).clamp(-_Z_MAX, _Z_MAX)
    p = torch.special.ndtr(z)
    return cv_squared(p.mean(dim=-2))


def gshard_loss(gates: torch.Tensor) -> torch.Tensor:
    """GShard balancing loss per group: ``E^2 * mean_e(mean_s gates * mean_s onehot(argmax gates))``.

    Args:
        gates: (..., S, E) softmaxed gates.
    Returns:
        (...) one value per group.
    """
    num_experts = gates.shape[-1]
    mean_gates = gates.mean(dim=-2)
    top1 = F.one_hot(gates.argmax(dim=-1), num_experts).to(gates.dtype).mean(dim=-2)
    return (mean_gates * top1).mean(dim=-1) * num_experts**2


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss per group (ST-MoE): ``mean_s logsumexp(logits[s])^2``; (..., S, E) -> (...)."""
    return (torch.logsumexp(logits, dim=-1) ** 2).mean(dim=-1)
