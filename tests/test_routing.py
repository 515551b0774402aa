"""Exact tests of the routing math (SPEC 1.3): hand-computed cases, properties, losses, bad input."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe.config import RouterConfig
from vmoe.moe.routing import (
    compute_capacity,
    gshard_loss,
    importance_loss,
    load_loss,
    top_experts_per_item,
    z_loss,
)

# Six tokens, three experts, k = 2, capacity 2. Gates are multiples of 1/16 (exact in binary), so
# sums and ties are exact. Per token: (top-1 expert, gate), (top-2 expert, gate), top-1, top-1 + top-2:
#   t0 [8, 5, 3]/16   e0 8/16, e1 5/16    max 8   sum 13
#   t1 [9, 1, 6]/16   e0 9/16, e2 6/16    max 9   sum 15
#   t2 [3,12, 1]/16   e1 12/16, e0 3/16   max 12  sum 15
#   t3 [6, 3, 7]/16   e2 7/16, e0 6/16    max 7   sum 13
#   t4 [1, 3,12]/16   e2 12/16, e1 3/16   max 12  sum 15
#   t5 [10,4, 2]/16   e0 10/16, e1 4/16   max 10  sum 14
GATES16 = [[8, 5, 3], [9, 1, 6], [3, 12, 1], [6, 3, 7], [1, 3, 12], [10, 4, 2]]
EXPERTS = [[0, 1], [0, 2], [1, 0], [2, 0], [2, 1], [0, 1]]


def _gates(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(GATES16, dtype=dtype) / 16


def _check(r, slots: list[list[int]], kept: list[list[bool]]) -> None:
    assert r.expert_index.tolist() == EXPERTS
    assert r.slot.tolist() == slots
    assert r.kept.tolist() == kept
    top = torch.tensor([[GATES16[s][e] for e in EXPERTS[s]] for s in range(6)], dtype=torch.float64) / 16
    expected_w = torch.where(torch.tensor(kept), top, torch.zeros_like(top))
    assert torch.equal(r.weights, expected_w)


def test_vanilla_hand_computed():
    # First choices in array order: t0->e0 slot 0, t1->e0 slot 1, t2->e1 slot 0, t3->e2 slot 0,
    # t4->e2 slot 1, t5->e0 slot 2 (dropped: capacity 2).
    # Second choices: t0->e1 slot 1, t1->e2 slot 2 (dropped), t2->e0 slot 3, t3->e0 slot 4,
    # t4->e1 slot 2, t5->e1 slot 3 (all dropped). t5 is dropped entirely.
    r = top_experts_per_item(_gates(), 2, 2)
    _check(
        r,
        slots=[[0, 1], [1, 2], [0, 3], [0, 4], [1, 2], [2, 3]],
        kept=[[True, True], [True, False], [True, False], [True, False], [True, False], [False, False]],
    )


def test_bpr_max_hand_computed():
    # Priority = top-1 gate: t2 (12), t4 (12, tie: array order keeps t2 first), t5 (10), t1 (9),
    # t0 (8), t3 (7).
    # First choices in that order: t2->e1 s0, t4->e2 s0, t5->e0 s0, t1->e0 s1, t0->e0 s2 (drop), t3->e2 s1.
    # Second choices: t2->e0 s3 (drop), t4->e1 s1, t5->e1 s2 (drop), t1->e2 s2 (drop), t0->e1 s3 (drop),
    # t3->e0 s4 (drop). Now t0 (not t5) is dropped entirely.
    r = top_experts_per_item(_gates(), 2, 2, batch_priority=True, priority="max")
    _check(
        r,
        slots=[[2, 3], [1, 2], [0, 3], [1, 4], [0, 1], [0, 2]],
        kept=[[False, False], [True, False], [True, False], [True, False], [True, True], [True, False]],
    )


def test_bpr_sum_hand_computed_differs_from_max():
    # Priority = top-1 + top-2: t1 (15), t2 (15), t4 (15) (ties: array order), t5 (14), t0 (13), t3 (13).
    # First: t1->e0 s0, t2->e1 s0, t4->e2 s0, t5->e0 s1, t0->e0 s2 (drop), t3->e2 s1.
    # Second: t1->e2 s2 (drop), t2->e0 s3 (drop), t4->e1 s1, t5->e1 s2 (drop), t0->e1 s3 (drop), t3->e0 s4.
    r = top_experts_per_item(_gates(), 2, 2, batch_priority=True, priority="sum")
    _check(
        r,
        slots=[[2, 3], [0, 2], [0, 3], [1, 4], [0, 1], [1, 2]],
        kept=[[False, False], [True, False], [True, False], [True, False], [True, True], [True, False]],
    )
    r_max = top_experts_per_item(_gates(), 2, 2, batch_priority=True, priority="max")
    assert not torch.equal(r.slot, r_max.slot)  # t1 and t5 swap places


def test_ties_keep_array_order():
    # Every token has the same gates: BPR must fill in array order, exactly as vanilla.
    gates = torch.tensor([[0.5, 0.25, 0.25]] * 7, dtype=torch.float64)
    gates[:, 1] += 0.0625  # top-2 is e1 for everyone, no tie between experts
    gates[:, 2] -= 0.0625
    vanilla = top_experts_per_item(gates, 2, 3)
    for priority in ("max", "sum"):
        bpr = top_experts_per_item(gates, 2, 3, batch_priority=True, priority=priority)
        assert torch.equal(bpr.slot, vanilla.slot)
    assert vanilla.slot[:, 0].tolist() == list(range(7))  # 7 first choices of e0 in array order
    assert vanilla.kept[:, 0].tolist() == [True] * 3 + [False] * 4


def test_expert_ties_go_to_the_lower_expert_id():
    # As jax.lax.top_k in the official code (torch.topk on the CPU would pick the higher ids).
    gates = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.125, 0.375, 0.125, 0.375], [0.0, 0.5, 0.0, 0.5]])
    r = top_experts_per_item(gates, 3, 4)
    assert r.expert_index.tolist() == [[0, 1, 2], [1, 3, 0], [1, 3, 0]]
    for k in (1, 2, 5, 6):  # repeated max (k <= 4) and stable sort (k > 4) agree
        g = torch.zeros(2, 6)
        g[1, 4:] = 1.0
        assert top_experts_per_item(g, k, 4).expert_index.tolist() == [list(range(k)), [4, 5, *range(4)][:k]]


def test_dense_combine_and_dispatch_values():
    r = top_experts_per_item(_gates(), 2, 2)
    comb = r.dense_combine()
    assert comb.shape == (6, 3, 2) and comb.dtype == torch.float64
    # Kept (token, expert, slot) -> weight, from the vanilla case above.
    expected = torch.zeros(6, 3, 2, dtype=torch.float64)
    expected[0, 0, 0] = 8 / 16
    expected[0, 1, 1] = 5 / 16
    expected[1, 0, 1] = 9 / 16
    expected[2, 1, 0] = 12 / 16
    expected[3, 2, 0] = 7 / 16
    expected[4, 2, 1] = 12 / 16
    assert torch.equal(comb, expected)
    assert torch.equal(r.dense_dispatch(), (expected > 0).double())
    # Grouped input gives per-group results.
    rg = top_experts_per_item(torch.stack([_gates(), _gates().flip(0)]), 2, 2)
    assert torch.equal(rg.dense_combine()[0], expected)


def test_weights_never_renormalised_and_keep_dtype():
    r = top_experts_per_item(_gates(torch.float64), 2, 3)
    assert r.weights.dtype == torch.float64
    assert r.weights[0].tolist() == [8 / 16, 5 / 16]  # sums to 13/16 < 1, not rescaled to 1
    assert r.weights.sum(-1).max() < 1
    for dtype in (torch.float32, torch.bfloat16):
        assert top_experts_per_item(_gates(dtype), 2, 3).weights.dtype == dtype
        assert top_experts_per_item(_gates(dtype), 2, 3, batch_priority=True).weights.dtype == dtype


# ------------------------------------------------------------------------------------- capacity


def test_compute_capacity_rounding():
    # V-MoE-Ti group: S = 8 * 65 = 520, E = 8, k = 2, C = 1.05: 520*2/8 = 130, * 1.05 = 136.5,
    # ceil -> 137, up to a multiple of 4 -> 140.
    assert compute_capacity(520, 8, 2, 1.05) == 140
    assert compute_capacity(520, 8, 2, 1.05, multiple_of=0) == 137
    assert compute_capacity(520, 8, 2, 1.05, multiple_of=1) == 137
    # S=16, E=8, k=2, C=1.1: 4 * 1.1 = 4.4 -> 5; multiples of 4 -> 8, of 3 -> 6.
    assert compute_capacity(16, 8, 2, 1.1) == 8
    assert compute_capacity(16, 8, 2, 1.1, multiple_of=3) == 6
    assert compute_capacity(16, 8, 2, 1.0) == 4  # already a multiple: unchanged
    # "round": S=10, E=3, k=2, C=1: 6.67 -> 7 (ceil 7 too); C=0.93: 6.2 -> round 6, ceil 7.
    assert compute_capacity(10, 3, 2, 0.93, rounding="round", multiple_of=0) == 6
    assert compute_capacity(10, 3, 2, 0.93, multiple_of=0) == 7
    # Tiny but positive raw capacity: ceil gives 1 (no error).
    assert compute_capacity(4, 8, 1, 0.5, multiple_of=0) == 1


def test_compute_capacity_official_order():
    # The official code evaluates (S * k / E) * C. In float64:
    # (25*2/3)*0.9 = 16.666666666666668*0.9 = 15.000000000000002 -> ceil 16 (S*k*C/E would be 15.0 -> 15);
    # (25*2/5)*1.1 = 10.0*1.1 = 11.0 -> 11 (S*k*C/E = 55.00000000000001/5 = 11.000000000000002 -> 12).
    assert (25 * 2 / 3) * 0.9 > 15 and 25 * 2 * 0.9 / 3 == 15
    assert compute_capacity(25, 3, 2, 0.9, multiple_of=0) == 16
    assert compute_capacity(25, 5, 2, 1.1, multiple_of=0) == 11


def test_compute_capacity_errors():
    # round(4 * 1 / 8 * 0.5) = round(0.25) = 0 < 1.
    with pytest.raises(ValueError, match="capacity 0 < 1"):
        compute_capacity(4, 8, 1, 0.5, rounding="round")
    for bad in (0, 0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="capacity_factor"):
            compute_capacity(16, 8, 2, bad)
    with pytest.raises(ValueError, match=r"k=3"):
        compute_capacity(16, 2, 3, 1.0)
    with pytest.raises(ValueError, match="group_size"):
        compute_capacity(0, 2, 1, 1.0)


# ------------------------------------------------------------------------------------------ losses


def test_importance_loss_population_std():
    # imp = column sums = [0.6, 0.9, 0.5] = [18, 27, 15]/30; mean 20/30; deviations [-2, 7, -5]/30;
    # population var = (4 + 49 + 25)/900/3 = 26/900; cv^2 = (26/900)/(4/9) = 0.065.
    # (Unbiased std would give 39/400 = 0.0975.)
    gates = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    assert importance_loss(gates).item() == pytest.approx(0.065, rel=1e-12)
    # Per group: (G, S, E) -> (G,); a perfectly balanced group gives 0.
    both = torch.stack([gates, torch.full((2, 3), 1 / 3, dtype=torch.float64)])
    torch.testing.assert_close(importance_loss(both), torch.tensor([0.065, 0.0], dtype=torch.float64))


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_load_loss_hand_computed():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]], dtype=torch.float64)
    noisy = torch.tensor([[1.1, -0.2, -0.8], [0.3, 0.4, 0.0]], dtype=torch.float64)
    sigma, k = 0.5, 2
    # thr = 2nd largest noisy logit: t0 -0.2, t1 0.3. p[s, e] = 1 - Phi((thr_s - logit[s, e]) / sigma):
    # t0: z = (-0.2-1)/.5 = -2.4, (-0.2-0)/.5 = -0.4, (-0.2+1)/.5 = 1.6
    # t1: z = (0.3-0.5)/.5 = -0.4, (0.3-0.2)/.5 = 0.2, (0.3-0.1)/.5 = 0.4
    p = [[1 - _phi(z) for z in (-2.4, -0.4, 1.6)], [1 - _phi(z) for z in (-0.4, 0.2, 0.4)]]
    assert p[0][0] == pytest.approx(0.99180, abs=1e-5)  # 1 - Phi(-2.4)
    assert p[0][2] == pytest.approx(0.05480, abs=1e-5)  # 1 - Phi(1.6)
    load = [(p[0][e] + p[1][e]) / 2 for e in range(3)]
    expected = (statistics.pstdev(load) / statistics.fmean(load)) ** 2
    assert load_loss(logits, noisy, sigma, k).item() == pytest.approx(expected, rel=1e-12)
    # k = 1: thr = the largest noisy logit: t0 1.1, t1 0.4.
    p1 = [
        [1 - _phi((1.1 - v) / sigma) for v in (1.0, 0.0, -1.0)],
        [1 - _phi((0.4 - v) / sigma) for v in (0.5, 0.2, 0.1)],
    ]
    load1 = [(p1[0][e] + p1[1][e]) / 2 for e in range(3)]
    expected1 = (statistics.pstdev(load1) / statistics.fmean(load1)) ** 2
    assert load_loss(logits, noisy, sigma, 1).item() == pytest.approx(expected1, rel=1e-12)
    with pytest.raises(ValueError, match="noise_std"):
        load_loss(logits, noisy, 0.0, k)


def test_gshard_and_z_loss_hand_computed():
    gates = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]], dtype=torch.float64)
    # mean_s gates = [0.3, 0.45, 0.25]; argmax: t0 -> e0, t1 -> e1: mean one-hot [0.5, 0.5, 0];
    # mean_e(product) = (0.15 + 0.225 + 0)/3 = 0.125; times E^2 = 9 -> 1.125.
    assert gshard_loss(gates).item() == pytest.approx(1.125, rel=1e-12)
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4 = 2 ln 2; mean of squares = 2.5 (ln 2)^2.
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], dtype=torch.float64)
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-12)


# ------------------------------------------------------------------------------------- properties


def _reference_slots(gates: torch.Tensor, k: int, bpr: bool, priority: str) -> tuple[list, list]:
    """Plain-Python routing of one group: (experts per token, slots per token), fill order per rank."""
    S, E = gates.shape
    # Top-k per token, descending, ties to the lower expert id (as jax.lax.top_k).
    top_e = [sorted(range(E), key=lambda e: (-float(gates[s, e]), e))[:k] for s in range(S)]
    if bpr:
        top_w = [[float(gates[s, e]) for e in top_e[s]] for s in range(S)]
        # (the sum in torch's order: with k = E every sum is 1 up to rounding, and rounding decides)
        tw = torch.tensor(top_w, dtype=gates.dtype)
        score = (tw[:, 0] if priority == "max" else tw.sum(-1)).tolist()
        order = sorted(range(S), key=lambda s: (-score[s], s))
    else:
        order = list(range(S))
    count = [0] * E
    slots = [[0] * k for _ in range(S)]
    for j in range(k):
        for s in order:
            e = top_e[s][j]
            slots[s][j] = count[e]
            count[e] += 1
    return top_e, order, slots


@settings(max_examples=80, deadline=None)
@given(
    G=st.integers(1, 3),
    S=st.integers(1, 40),
    E=st.integers(1, 9),
    data=st.data(),
    bpr=st.booleans(),
    priority=st.sampled_from(["max", "sum"]),
    seed=st.integers(0, 2**31 - 1),
    coarse=st.booleans(),
)
def test_routing_properties(G, S, E, data, bpr, priority, seed, coarse):
    k = data.draw(st.integers(1, E), label="k")
    capacity = data.draw(st.integers(1, S * k + 2), label="capacity")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(G, S, E, generator=gen, dtype=torch.float64)
    if coarse:  # many exact ties in the priority score
        logits = (logits * 2).round()
    gates = torch.softmax(logits, -1)
    r = top_experts_per_item(gates, k, capacity, batch_priority=bpr, priority=priority)
    assert r.slot.shape == r.kept.shape == r.weights.shape == (G, S, k)
    assert torch.equal(r.kept, r.slot < capacity)
    top_w = torch.gather(gates, -1, r.expert_index)
    assert torch.equal(r.weights, torch.where(r.kept, top_w, torch.zeros_like(top_w)))
    for g in range(G):
        e_idx, slot, kept = r.expert_index[g].tolist(), r.slot[g].tolist(), r.kept[g].tolist()
        ref_e, order, ref_slots = _reference_slots(gates[g], k, bpr, priority)
        assert e_idx == ref_e
        assert slot == ref_slots
        pos = {s: i for i, s in enumerate(order)}
        for e in range(E):
            assigned = [(s, j) for s in range(S) for j in range(k) if e_idx[s][j] == e]
            kept_slots = sorted(slot[s][j] for s, j in assigned if kept[s][j])
            # No expert over capacity; unique, dense slots 0..n-1 per expert and group.
            assert len(kept_slots) <= capacity
            assert kept_slots == list(range(len(kept_slots)))
            assert len({slot[s][j] for s, j in assigned}) == len(assigned)
            # k-major: every choice-j slot of e is before every choice-(j+1) slot of e.
            for j in range(k - 1):
                a = [slot[s][jj] for s, jj in assigned if jj == j]
                b = [slot[s][jj] for s, jj in assigned if jj == j + 1]
                if a and b:
                    assert max(a) < min(b)
            # Per choice rank: every kept token precedes every dropped one in fill order.
            for j in range(k):
                kp = [pos[s] for s, jj in assigned if jj == j and kept[s][j]]
                dp = [pos[s] for s, jj in assigned if jj == j and not kept[s][j]]
                if kp and dp:
                    assert max(kp) < min(dp)


# -------------------------------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    g = _gates()
    with pytest.raises(ValueError, match=r"\(6,\)"):
        top_experts_per_item(g[:, 0], 1, 2)
    with pytest.raises(ValueError, match=r"\(1, 1, 6, 3\)"):
        top_experts_per_item(g.view(1, 1, 6, 3), 1, 2)
    with pytest.raises(ValueError, match="got 4"):
        top_experts_per_item(g, 4, 2)  # k > E = 3
    with pytest.raises(ValueError, match="got 0"):
        top_experts_per_item(g, 0, 2)
    with pytest.raises(ValueError, match="capacity must be an integer >= 1, got 0"):
        top_experts_per_item(g, 2, 0)
    with pytest.raises(ValueError, match=r"capacity must be an integer >= 1, got 2\.5"):
        top_experts_per_item(g, 2, 2.5)
    with pytest.raises(ValueError, match="'mean'"):
        top_experts_per_item(g, 2, 2, batch_priority=True, priority="mean")
    with pytest.raises(ValueError, match="k=3"):
        RouterConfig(num_experts=2, num_selected=3)
    for bad in (0, 0.0, -0.5):
        with pytest.raises(ValueError, match=f"capacity_factor.*got {bad!r}"):
            RouterConfig(capacity_factor=bad)
    with pytest.raises(ValueError, match="priority"):
        RouterConfig(priority="mean")


def test_capacity_rounding_warns_once_per_setting():
    from vmoe.moe.router import CapacityRoundingWarning, _warned, effective_capacity

    cfg = RouterConfig(num_experts=4, num_selected=1, capacity_factor=0.25)
    _warned.discard((34, 4, 1, 0.25))
    # S=34, k=1, E=4, C=0.25: ceil(8.5 * 0.25) = 3 -> multiple of 4 = 4, an effective C of 0.47
    with pytest.warns(CapacityRoundingWarning, match="effective C of 0.471"):
        assert effective_capacity(34, cfg) == 4
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert effective_capacity(34, cfg) == 4  # the same setting warns only once
        assert effective_capacity(40, RouterConfig(num_experts=4, num_selected=2, capacity_factor=1.0)) == 20
