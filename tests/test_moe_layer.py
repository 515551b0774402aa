"""The MoE layer end to end: per-token reference, backends agree, router noise/dtype/losses, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe import rng
from vmoe.config import MoEConfig, RouterConfig
from vmoe.moe import Experts, MoEMlp, TopKRouter, importance_loss, routing_chunks
from vmoe.moe.dispatch import EinsumDispatcher, IndexDispatcher
from vmoe.moe.routing import Routing

pytestmark = pytest.mark.filterwarnings("ignore:capacity rounding")

AUX_KEYS = {
    "aux_loss",
    "importance_loss",
    "load_loss",
    "dropped_fraction",
    "expert_load",
    "assignments_per_image",
    "selected_per_image",
    "tokens_per_image",
    "capacity",
}


def _layer(
    E=4, k=2, C=1.0, group_size=2, bpr=False, priority="max", dispatch="index", D=8, M=12, seed=0, **router
) -> MoEMlp:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        router=RouterConfig(
            num_experts=E, num_selected=k, capacity_factor=C, batch_priority=bpr, priority=priority, **router
        ),
        group_size=group_size,
        dispatch=dispatch,
        expert_init="independent",
    )
    layer = MoEMlp(D, M, cfg).double()
    with torch.no_grad():  # biases visible in the output (init is ~1e-6)
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
    return layer


def _reference(layer: MoEMlp, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-token loop: y[t] = sum over kept assignments of gate * expert_e(x[t])."""
    r = layer.last_routing
    assert r is not None
    B, T, _ = x.shape
    ex = layer.experts
    y = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            for j in range(r["expert_index"].shape[-1]):
                if not r["kept"][b, t, j]:
                    continue
                e = int(r["expert_index"][b, t, j])
                h = F.gelu(x[b, t] @ ex.w1[e] + ex.b1[e], approximate="tanh")
                y[b, t] += r["gates"][b, t, e] * (h @ ex.w2[e] + ex.b2[e])
    return y


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 5),
    T=st.integers(1, 6),
    group_size=st.integers(1, 4),
    E=st.integers(1, 5),
    data=st.data(),
    C=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    bpr=st.booleans(),
    priority=st.sampled_from(["max", "sum"]),
    dispatch=st.sampled_from(["index", "einsum"]),
    training=st.booleans(),
)
def test_layer_matches_per_token_reference(B, T, group_size, E, data, C, bpr, priority, dispatch, training):
    k = data.draw(st.integers(1, E), label="k")
    layer = _layer(
        E=E,
        k=k,
        C=C,
        group_size=group_size,
        bpr=bpr,
        priority=priority,
        dispatch=dispatch,
        capacity_multiple_of=data.draw(st.sampled_from([0, 4]), label="mult"),
    )
    layer.train(training)
    layer.record_routing = True
    x = torch.randn(B, T, 8, dtype=torch.float64)
    y, aux = layer(x)
    assert y.dtype == torch.float64 and y.shape == x.shape
    torch.testing.assert_close(y, _reference(layer, x), rtol=1e-10, atol=1e-12)
    assert set(aux) == AUX_KEYS
    kept = layer.last_routing["kept"]
    assert aux["assignments_per_image"].tolist() == kept.sum((1, 2)).double().tolist()
    assert aux["tokens_per_image"].tolist() == kept.any(-1).sum(-1).double().tolist()
    assert aux["dropped_fraction"].item() == pytest.approx(1 - kept.double().mean().item())
    assert not (y.view(-1, 8)[~kept.any(-1).view(-1)]).any()  # fully dropped tokens get exactly 0


def _grads(layer: MoEMlp, x: torch.Tensor, gy: torch.Tensor):
    xi = x.clone().requires_grad_(True)
    y, aux = layer(xi)
    loss = (y * gy).sum() + aux["aux_loss"]
    grads = torch.autograd.grad(loss, [xi, *layer.parameters()])
    return y, aux, grads


@pytest.mark.parametrize("B,group_size", [(7, 3), (2, 4), (6, 2)])  # partial last group; B < group; even
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_einsum_and_index_backends_agree(B, group_size, bpr, training):
    T, E = 5, 4
    idx = _layer(E=E, C=0.75, group_size=group_size, bpr=bpr)  # C < 1: drops happen
    ein = _layer(E=E, C=0.75, group_size=group_size, bpr=bpr, dispatch="einsum")
    ein.load_state_dict(idx.state_dict())
    idx.train(training)
    ein.train(training)
    x = torch.randn(B, T, 8, dtype=torch.float64)
    gy = torch.randn_like(x)
    with rng.positional_rng(seed=3):  # identical router noise in both
        y_i, aux_i, g_i = _grads(idx, x, gy)
        y_e, aux_e, g_e = _grads(ein, x, gy)
    torch.testing.assert_close(y_i, y_e, rtol=1e-12, atol=1e-12)
    assert aux_i["dropped_fraction"] > 0
    for key in ("aux_loss", "importance_loss", "load_loss", "dropped_fraction", "assignments_per_image"):
        torch.testing.assert_close(aux_i[key], aux_e[key], rtol=1e-12, atol=1e-12)
    for a, b in zip(g_i, g_e):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Identical buffers and kept set (same routing plans, both backends).
    with torch.no_grad():
        xf = x.reshape(B * T, 8)
        outs = [
            idx.router(xf[f * T : (f + g * n) * T].view(g, n * T, 8), first_image=f, tokens_per_image=T)
            for f, g, n in routing_chunks(B, group_size)
        ]
    routings = [o.routing for o in outs]
    di, de = IndexDispatcher(routings), EinsumDispatcher(routings)
    assert torch.equal(di.buffer_tokens(), de.buffer_tokens())
    bi, be = di.dispatch(xf), de.dispatch(xf)
    assert bi.shape == be.shape == (E, di.rows_per_expert, 8)
    torch.testing.assert_close(bi, be, rtol=0, atol=0)
    yb = torch.randn_like(bi)
    torch.testing.assert_close(di.combine(yb), de.combine(yb), rtol=1e-12, atol=1e-12)
    # Buffer rows hold exactly the kept assignments.
    kept = sum(int(r.kept.sum()) for r in routings)
    assert int((di.buffer_tokens() >= 0).sum()) == kept
    # Both ways of zeroing empty rows (pad: the default off the CPU), with autograd, equal the einsum.
    _check_dispatch_autograd(routings, xf)


def _packed_buffer_rows(d: IndexDispatcher, full: IndexDispatcher) -> torch.Tensor:
    """(F,) the buffer row of each of a packed dispatcher's rows (matched by (expert, token), which is
    unique), after checking that the rows follow ``d.slabs``: slab by slab, each expert's rows in its
    buffer order, and that they are exactly the filled buffer rows."""
    N = full.num_tokens
    tok, exp = full.row_tokens(), full.row_experts()
    filled = (tok >= 0).nonzero()[:, 0]
    key_full = exp[filled] * N + tok[filled]
    key = d.row_experts() * N + d.row_tokens()
    assert (d.row_tokens() >= 0).all() and sorted(key.tolist()) == sorted(key_full.tolist())
    where = {k: int(r) for k, r in zip(key_full.tolist(), filled)}
    source = torch.tensor([where[k] for k in key.tolist()], dtype=torch.int64)
    want_experts = [j for s in d.slabs for j in s.members() for _ in range(s.rows)]
    assert d.row_experts().tolist() == want_experts
    for e in range(full.num_experts):  # each expert's rows in buffer order
        mine = source[d.row_experts() == e]
        assert bool((mine[1:] > mine[:-1]).all())
    return source


def _check_dispatch_autograd(routings, xf: torch.Tensor) -> None:
    results = []
    for make in (
        lambda rs: IndexDispatcher(rs, pad=True),
        lambda rs: IndexDispatcher(rs, pad=False),
        EinsumDispatcher,
        lambda rs: IndexDispatcher(rs, packed=True),  # filled rows only: same outputs and gradients
        lambda rs: IndexDispatcher(rs, packed=True, slab_width=2),  # ... in pairs of experts
        lambda rs: IndexDispatcher(rs, packed=True, slab_width=3),
        lambda rs: IndexDispatcher(rs, packed=True, slab_width=2, slab_by_count=True),  # nearest counts
    ):
        xi = xf.clone().requires_grad_(True)
        w = torch.cat([r.weights.reshape(-1, r.num_selected) for r in routings]).clone().requires_grad_(True)
        chunks, start = [], 0  # the same plans, with differentiable combine weights
        for r in routings:
            n = r.weights.numel() // r.num_selected
            wr = w[start : start + n].view_as(r.weights)
            start += n
            chunks.append(Routing(r.expert_index, r.slot, r.kept, wr, r.num_experts, r.capacity))
        d = make(chunks)
        buf = d.dispatch(xi)
        y = torch.tanh(buf) * 2 + 1  # nonzero in empty rows: combine must ignore them
        out = d.combine(y)
        gout = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        if getattr(d, "packed", False):  # (F, D): the filled buffer rows, laid out in d.slabs
            full = IndexDispatcher(chunks)
            assert d.counts == full.buffer_tokens().ge(0).sum(1).tolist()
            source = _packed_buffer_rows(d, full)
            buf = torch.zeros_like(full.dispatch(xi)).view(-1, buf.shape[1]).index_copy(0, source, buf)
            buf = buf.view(full.num_experts, full.rows_per_expert, -1)
        results.append((buf.detach(), out.detach(), *torch.autograd.grad(out, [xi, w], gout)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["loop", "packed", "grouped_mm"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_experts_impls_equal_batched(impl, dropout):
    # Every experts implementation = the batched one ("bmm") on (E, R, D) buffers, including positional
    # dropout masks, all gradients and inference. grouped_mm has no float64.
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    dtype, tol = (torch.float32, 1e-5) if impl == "grouped_mm" else (torch.float64, 1e-12)
    torch.manual_seed(0)
    ex = Experts(3, 8, 16, dropout=dropout, init="independent").to(dtype)
    buf = torch.randn(3, 5, 8, dtype=dtype)
    rows = torch.arange(15).view(3, 5)
    res = []
    for name in (impl, "bmm"):
        ex.impl = name
        b = buf.clone().requires_grad_(True)
        with rng.positional_rng(seed=1):
            y = ex(b, rows)
        res.append((y, *torch.autograd.grad(y.square().sum(), [b, *ex.parameters()])))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    ex.eval()  # inference (no autograd graph) through the same implementations
    with torch.inference_mode():
        ex.impl = impl
        y_inf = ex(buf, rows)
        ex.impl = "bmm"
        torch.testing.assert_close(y_inf, ex(buf, rows), rtol=tol, atol=tol)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("width", [1, 2, "by_count"])
def test_experts_forward_rows_equal_batched_on_filled_rows(dropout, width):
    # The packed path: forward_rows over the filled rows only (an expert without rows included; in
    # slabs of `width` experts) equals the batched buffers on those rows, with the same dropout masks
    # and gradients.
    from vmoe.moe import expert_slabs

    torch.manual_seed(0)
    ex = Experts(4, 8, 16, dropout=dropout, init="independent").double()
    buf = torch.randn(4, 5, 8, dtype=torch.float64)
    filled = torch.tensor(
        [[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool
    )
    counts = filled.sum(1).tolist()
    slabs = expert_slabs(counts, 2, by_count=True) if width == "by_count" else expert_slabs(counts, width)
    assert width != "by_count" or slabs[0].stride == 3  # experts 0 and 3 (3 and 5 rows) paired
    per_expert = [r.nonzero()[:, 0].add(5 * e).tolist() for e, r in enumerate(filled)]
    index = []  # buffer row of each packed row, slab by slab
    for s in slabs:
        for j in s.members():
            index += per_expert[j][: s.rows]
            per_expert[j] = per_expert[j][s.rows :]
    index = torch.tensor(index)
    rows = torch.arange(20).view(4, 5)
    b = buf.clone().requires_grad_(True)
    ex.impl = "bmm"
    with rng.positional_rng(seed=1):
        y_buf = ex(b, rows).reshape(20, 8)[index]
    want = (y_buf, *torch.autograd.grad(y_buf.square().sum(), [b, *ex.parameters()]))
    b = buf.clone().requires_grad_(True)
    with rng.positional_rng(seed=1):
        y_rows = ex.forward_rows(b.reshape(20, 8)[index], counts, rows.reshape(-1)[index], slabs)
    got = (y_rows, *torch.autograd.grad(y_rows.square().sum(), [b, *ex.parameters()]))
    assert y_rows.shape == (int(filled.sum()), 8)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="counts summing to 5"):
        ex.forward_rows(buf.reshape(20, 8), [2, 0, 3, 0])


def test_expert_slabs_hand_computed():
    from vmoe.moe import expert_slabs

    counts = [3, 5, 0, 2, 4]
    # (first expert, width, rows each, stride)
    assert expert_slabs(counts) == [(0, 1, 3, 1), (1, 1, 5, 1), (3, 1, 2, 1), (4, 1, 4, 1)]  # expert-major
    # pairs (0, 1) (2, 3) (4): the smaller count of each pair batched, then the rest of the larger
    assert expert_slabs(counts, 2) == [(0, 2, 3, 1), (1, 1, 2, 1), (3, 1, 2, 1), (4, 1, 4, 1)]
    assert expert_slabs(counts, 3) == [(0, 1, 3, 1), (1, 1, 5, 1), (3, 2, 2, 1), (4, 1, 2, 1)]
    # by count: 2 (0 rows) with 3 (2), 0 (3) with 4 (4), 1 (5) alone; pairs in order of their first expert
    slabs = expert_slabs(counts, 2, by_count=True)
    assert slabs == [(0, 2, 3, 4), (4, 1, 1, 1), (1, 1, 5, 1), (3, 1, 2, 1)]
    assert list(slabs[0].members()) == [0, 4] and slabs[0].experts == slice(0, 5, 4)
    assert expert_slabs([4, 4, 4, 4], 2) == [(0, 2, 4, 1), (2, 2, 4, 1)]  # equal counts: expert-major rows
    assert expert_slabs([0, 0], 2) == []
    with pytest.raises(ValueError, match="slab width must be >= 1, got 0"):
        expert_slabs(counts, 0)
    with pytest.raises(ValueError, match="by_count pairs experts: it needs width 2, got 3"):
        expert_slabs(counts, 3, by_count=True)


def test_forward_rows_rejects_bad_slabs():
    ex = Experts(3, 4, 6)
    x = torch.zeros(5, 4)
    with pytest.raises(
        ValueError, match=r"slabs hold \[2, 2, 0\] rows per expert, expected the counts \[2, 0, 3\]"
    ):
        ex.forward_rows(x, [2, 0, 3], slabs=[(0, 2, 2)])
    with pytest.raises(ValueError, match=r"bad slab \(2, 2, 1, 1\) for 3 experts"):
        ex.forward_rows(x, [2, 0, 3], slabs=[(0, 1, 2), (2, 2, 1)])
    with pytest.raises(ValueError, match=r"bad slab \(0, 2, 1, 1\)"):  # expert 0's later rows with 1's first
        ex.forward_rows(torch.zeros(4, 4), [2, 1, 1], slabs=[(0, 1, 1), (0, 2, 1), (2, 1, 1)])
    with pytest.raises(ValueError, match=r"bad slab \(0, 2, 1, 0\)"):
        ex.forward_rows(torch.zeros(2, 4), [1, 1, 0], slabs=[(0, 2, 1, 0)])
    # A strided pair (experts 0 and 2) is fine.
    assert ex.forward_rows(torch.zeros(4, 4), [2, 0, 2], slabs=[(0, 2, 2, 2)]).shape == (4, 4)


def test_experts_impl_validation():
    ex = Experts(2, 4, 6)
    with pytest.raises(ValueError, match=r"unknown experts impl 'fast'.*bmm"):
        ex.impl = "fast"
    assert ex.resolved_impl(torch.zeros(2, 3, 4)) == "packed"  # auto on the CPU
    ex.impl = "grouped_mm"
    if hasattr(torch, "_grouped_mm"):
        with pytest.raises(ValueError, match="multiples of 8, got 4 and 6"):
            ex(torch.zeros(2, 3, 4))


def test_auto_packs_mostly_empty_buffers_off_the_cpu(monkeypatch):
    """Off the CPU, auto runs batched over the buffers unless at most half of their rows can be
    filled (dropless routing: E/k times the rows); then it packs, with the same result."""
    import vmoe.moe.dispatch
    import vmoe.moe.experts

    for mod in (vmoe.moe.dispatch, vmoe.moe.experts):
        monkeypatch.setattr(mod, "prefer_static_shapes", lambda device: True)
    ex = Experts(2, 4, 6)
    x = torch.zeros(2, 3, 4)
    assert [ex.resolved_impl(x, f) for f in (1.0, 0.9, 0.5, 0.25)] == ["bmm", "bmm", "packed", "packed"]
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert ex.resolved_impl(x, 0.25) == "bmm"  # static shapes under compile
    ex.impl = "bmm"
    assert ex.resolved_impl(x, 0.25) == "bmm"  # an explicit choice stands

    packed_calls = []
    forward_rows = Experts.forward_rows
    monkeypatch.setattr(
        Experts, "forward_rows", lambda self, *a, **k: packed_calls.append(1) or forward_rows(self, *a, **k)
    )
    x = torch.randn(4, 9, 8, dtype=torch.float64)
    for C, packs in ((1.05, False), (None, True), (4.0, True)):
        layer = _layer(E=8, C=C, group_size=2)
        layer.eval()
        packed_calls.clear()
        y, _ = layer(x)
        assert bool(packed_calls) == packs, C
        layer.experts.impl = "bmm"
        torch.testing.assert_close(y, layer(x)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
@pytest.mark.parametrize("width", [1, 2, 3, "by_count"])
def test_grouped_mlp_matches_per_expert_autograd(act, width):
    # The hand-written forward/backward over packed slabs (an expert without rows; with width > 1,
    # batched slabs and experts whose rows span two slabs) against plain autograd on per-expert
    # slices, and torch.autograd.gradcheck in float64.
    from vmoe.layers import activation
    from vmoe.moe.experts import _GroupedMlp, expert_slabs

    torch.manual_seed(0)
    E, D, M, counts = 6, 4, 5, [2, 4, 1, 3, 3, 0]
    slabs = expert_slabs(counts, 2, by_count=True) if width == "by_count" else expert_slabs(counts, width)
    assert width == 1 or any(s.width > 1 for s in slabs)
    assert width != "by_count" or any(s.stride > 1 for s in slabs)
    w1, b1, w2, b2 = (
        torch.randn(*s, dtype=torch.float64, requires_grad=True)
        for s in ((E, D, M), (E, M), (E, M, D), (E, D))
    )
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    y = _GroupedMlp.apply(x, w1, b1, w2, b2, slabs, act)
    parts, start = [], 0
    for s in slabs:  # runs of one expert's rows, in slab order
        m = s.rows
        for j in s.members():
            xe = x[start : start + m]
            start += m
            parts.append(activation(xe @ w1[j] + b1[j], act) @ w2[j] + b2[j])
    ref = torch.cat(parts)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    inputs = [x, w1, b1, w2, b2]
    got = torch.autograd.grad(y, inputs, g)
    assert not got[1][5].any() and not got[3][5].any()  # the expert without rows
    for a, b in zip(got, torch.autograd.grad(ref, inputs, g, retain_graph=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: _GroupedMlp.apply(*t, slabs, act), tuple(inputs))
    # Only some inputs needing gradients (e.g. frozen experts): the others come back as None.
    w1.requires_grad_(False)
    x2 = x.detach()
    gw2 = torch.autograd.grad(_GroupedMlp.apply(x2, w1, b1, w2, b2, slabs, act), [w2], g)[0]
    torch.testing.assert_close(gw2, torch.autograd.grad(ref, [w2], g)[0], rtol=1e-12, atol=1e-12)


def test_epilogue_rows_walks_slabs_like_the_grouped_mlp():
    # The CUDA inference branch (bias + GELU in the cuBLASLt epilogue) runs only on a GPU; its walk over
    # the width-1 slabs (an expert without rows, rows written in place) is checked here on the CPU.
    # torch._addmm_activation's GELU is erf on the CPU and tanh on CUDA (as cuBLASLt's epilogue), so the
    # reference here is exact GELU; test_cuda_epilogue_rows_matches_the_slab_path checks the CUDA side.
    from vmoe.moe.experts import _epilogue_rows, _GroupedMlp, expert_slabs

    torch.manual_seed(0)
    E, D, M, counts = 5, 6, 7, [3, 0, 5, 2, 1]
    slabs = expert_slabs(counts, 1)
    x = torch.randn(sum(counts), D, dtype=torch.float64)
    w1, b1, w2, b2 = (torch.randn(*s, dtype=torch.float64) for s in ((E, D, M), (E, M), (E, M, D), (E, D)))
    out = torch.full_like(x, float("nan"))
    _epilogue_rows(x, w1, b1, w2, b2, slabs, out)
    ref = _GroupedMlp.apply(x, w1, b1, w2, b2, slabs, "gelu", True)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
def test_augmented_mlp_matches_baddbmm_autograd(act):
    # "bmm" in the layer: buffers of tokens with a ones column (empty slots: all zeros), the first bias
    # riding in the first batched matmul. Against baddbmm under autograd on the plain buffers: outputs
    # of filled slots, every gradient (the combine gives empty slots a zero output gradient), subsets of
    # inputs needing gradients, inference, and gradcheck.
    from vmoe.layers import activation
    from vmoe.moe.experts import GROUPED_PAD, _AugmentedMlp

    torch.manual_seed(0)
    E, R, D, M = 3, 5, 4, 6
    filled = torch.ones(E, R, 1, dtype=torch.float64)
    filled[1, 3:] = 0
    filled[2] = 0  # an expert without tokens
    x = torch.randn(E, R, D, dtype=torch.float64) * filled
    xa = torch.cat([x, filled, torch.zeros(E, R, GROUPED_PAD - 1, dtype=torch.float64)], -1)
    params = [torch.randn(*s, dtype=torch.float64) for s in ((E, D, M), (E, M), (E, M, D), (E, D))]
    g = torch.randn(E, R, D, dtype=torch.float64) * filled
    for need in ((True,) * 5, (True, False, False, False, False), (False, False, False, True, True)):
        inputs = [t.clone().requires_grad_(n) for t, n in zip([xa, *params], need)]
        xr = x.clone().requires_grad_(need[0])
        w1, b1, w2, b2 = inputs[1:]
        y = _AugmentedMlp.apply(*inputs, act)
        ref = torch.baddbmm(b2.unsqueeze(1), activation(torch.baddbmm(b1.unsqueeze(1), xr, w1), act), w2)
        torch.testing.assert_close(y * filled, ref * filled, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(y, [t for t in inputs if t.requires_grad], g)
        want = torch.autograd.grad(ref, [t for t in [xr, *inputs[1:]] if t.requires_grad], g)
        if need[0]:  # the input's gradient: D columns like the plain buffers', zeros in the pad
            assert not got[0][..., D + 1 :].any()
            got = (got[0][..., :D], *got[1:])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        y_inf = _AugmentedMlp.apply(xa, *params, act, True)
    torch.testing.assert_close(y_inf, _AugmentedMlp.apply(xa, *params, act), rtol=0, atol=0)
    full = torch.cat(
        [torch.randn(E, R, D, dtype=torch.float64), torch.ones(E, R, 1, dtype=torch.float64)], -1
    )
    full = torch.cat([full, torch.zeros(E, R, GROUPED_PAD - 1, dtype=torch.float64)], -1)  # ReLU: no h == 0
    gc_inputs = tuple(t.clone().requires_grad_(True) for t in (full, *params))
    assert torch.autograd.gradcheck(lambda *t: _AugmentedMlp.apply(*t, act), gc_inputs)


def test_layer_bmm_runs_augmented_buffers(monkeypatch):
    # With bias_in_matmul (off by default) the layer's "bmm" path feeds the experts augmented buffers
    # (forward_augmented), and equals the plain batched experts (baddbmm biases) over the same buffers;
    # with expert dropout too.
    assert _layer(E=4).experts.bias_in_matmul is False
    calls = []
    real = Experts.forward_augmented

    def spy(self, buffers, rows=None):
        calls.append(tuple(buffers.shape))
        return real(self, buffers, rows)

    monkeypatch.setattr(Experts, "forward_augmented", spy)
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    gy = torch.randn_like(x)
    for p in (0.0, 0.3):
        layer = _layer(E=4, C=0.75, group_size=2)
        layer.experts.impl, layer.experts.p, layer.experts.bias_in_matmul = "bmm", p, True
        plain = _layer(E=4, C=0.75, group_size=2)
        plain.load_state_dict(layer.state_dict())
        plain.experts.impl, plain.experts.p = "bmm", p  # baddbmm biases
        through_comm = _layer(E=4, C=0.75, group_size=2)
        through_comm.load_state_dict(layer.state_dict())
        through_comm.experts.impl, through_comm.experts.p = "bmm", p
        through_comm.experts.bias_in_matmul = True  # never with expert_comm: buffers move as (E, R, D)
        through_comm.expert_comm = _IdentityComm()
        res = []
        for lay in (layer, plain, through_comm):
            calls.clear()
            with rng.positional_rng(seed=5):
                res.append(_grads(lay, x, gy))
            assert bool(calls) == (lay is layer) and all(c[2] == 8 + 8 for c in calls)
        for other in res[1:]:
            torch.testing.assert_close(res[0][0], other[0], rtol=1e-12, atol=1e-12)
            for a, b in zip(res[0][2], other[2], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"forward_augmented expects \(4, R, 16\) buffers, got \(4, 3, 8\)"):
        layer.experts.forward_augmented(torch.zeros(4, 3, 8, dtype=torch.float64))


class _IdentityComm:
    """An ExpertComm of one rank: buffers stay here, but the layer takes its expert-parallel path."""

    def dispatch(self, buffers, rows):
        return buffers, rows

    def combine(self, outputs):
        return outputs


def test_grouped_mm_warns_off_bf16_on_cuda():
    from vmoe.moe.experts import _warn_slow_grouped_mm

    with pytest.warns(UserWarning, match="float32 on CUDA runs torch._grouped_mm's slow fallback"):
        _warn_slow_grouped_mm(torch.device("cuda"), torch.float32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_slow_grouped_mm(torch.device("cuda"), torch.bfloat16)
        _warn_slow_grouped_mm(torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("impl", ["packed", "loop", "bmm"])
@pytest.mark.parametrize("width", [1, 2, 3])
def test_layer_experts_impls_agree(impl, width, monkeypatch):
    # Every impl, with packed rows in slabs of 1-3 experts (the CPU picks 2 with >= 2 threads).
    monkeypatch.setattr(Experts, "slab_width", lambda self, device: width)
    layer = _layer(E=5, C=0.75, group_size=2)
    ref = _layer(E=5, C=0.75, group_size=2, dispatch="einsum")
    ref.load_state_dict(layer.state_dict())
    layer.experts.impl = impl
    ref.experts.impl = "bmm" if impl != "bmm" else "packed"
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    gy = torch.randn_like(x)
    with rng.positional_rng(seed=2):  # same router noise for both
        ga, gb = _grads(layer, x, gy)[2], _grads(ref, x, gy)[2]
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Without gradients, packed rows of width 2 pair the experts of nearest counts instead.
    by_count = []
    init = IndexDispatcher.__init__
    monkeypatch.setattr(
        IndexDispatcher,
        "__init__",
        lambda self, *a, **k: by_count.append(k.get("slab_by_count", False)) or init(self, *a, **k),
    )
    layer.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)
    assert any(by_count) == (impl == "packed" and width == 2)


@pytest.mark.parametrize("width", [1, 2])
def test_layer_packed_rows_with_dropout_match_buffers(width, monkeypatch):
    # Packed dispatch (filled rows only, in slabs of `width` experts) and capacity buffers give the same
    # outputs and gradients in training with expert dropout: the masks are functions of each
    # assignment's global id.
    monkeypatch.setattr(Experts, "slab_width", lambda self, device: width)
    layer = _layer(E=4, C=0.75, group_size=2)
    layer.experts.p = 0.3
    ref = _layer(E=4, C=0.75, group_size=2)
    ref.experts.p = 0.3
    ref.load_state_dict(layer.state_dict())
    layer.experts.impl, ref.experts.impl = "packed", "bmm"
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    gy = torch.randn_like(x)
    res = []
    for lay in (layer, ref):
        with rng.positional_rng(seed=3):
            res.append(_grads(lay, x, gy))
    assert (res[0][0] != 0).any()
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_static_packed_dispatcher_front_packs_the_filled_rows():
    # static=True: the packed dispatcher's rows first, in a fixed min(E*R, N*K) rows (to a multiple of 8), zeros after, with
    # the per-expert counts as device offsets; combine reads only the filled rows.
    for C in (0.75, 1.5, None):
        layer = _layer(E=4, C=C, group_size=2).eval()
        x = torch.randn(5, 6, 8, dtype=torch.float64)
        routings = [
            layer.router(x.reshape(-1, 8)[a * 6 : (a + g * n) * 6].view(g, n * 6, 8), first_image=a).routing
            for a, g, n in routing_chunks(5, 2)
        ]
        packed = IndexDispatcher(routings, packed=True)
        for pad in (False, True):
            static = IndexDispatcher(routings, static=True, pad=pad)
            E, R, NK = 4, packed.rows_per_expert, 30 * 2
            assert static.total_rows == -(-min(E * R, NK) // 8) * 8 and static.counts is None  # multiple of 8
            assert static.offsets.dtype == torch.int32
            assert static.offsets.tolist() == torch.tensor(packed.counts).cumsum(0).tolist()
            filled = sum(packed.counts)
            xf = x.reshape(30, 8)
            a, b = packed.dispatch(xf), static.dispatch(xf)
            assert torch.equal(b[:filled], a) and not b[filled:].any()
            assert torch.equal(static.row_tokens()[:filled], packed.row_tokens())
            assert (static.row_tokens()[filled:] == -1).all()
            assert torch.equal(static.row_experts()[:filled], packed.row_experts())
            y = torch.randn(static.total_rows, 8, dtype=torch.float64)
            y[filled:] = float("nan")  # rows that belong to no token are never read
            torch.testing.assert_close(static.combine(y), packed.combine(y[:filled]), rtol=0, atol=0)


@pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason=f"torch {torch.__version__} has no torch._grouped_mm"
)
@pytest.mark.parametrize("C", [0.75, 1.05, None])
@pytest.mark.parametrize("bpr", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_layer_grouped_mm_rows_equal_batched(C, bpr, p, monkeypatch):
    # experts_impl="grouped_mm": front-packed rows (no host sync), b1 riding in the first kernel, b2 added
    # by row. Equals the batched experts over the buffers in outputs, every gradient (router, experts,
    # input) and inference, with dropout, a partial routing group, capacity and dropless routing; what the
    # kernels leave in the rows past the last offset (poisoned with NaN here) is never read.
    import vmoe.moe.experts

    real = torch._grouped_mm

    def poisoned(a, b, offs):
        out = real(a, b, offs=offs)
        if out.dim() == 2:  # rows, not the (E, ., .) weight gradients
            out[int(offs[-1]) :] = float("nan")
        return out

    monkeypatch.setattr(vmoe.moe.experts, "_grouped_mm_op", lambda: poisoned)
    layer = _layer(E=8, C=C, bpr=bpr, group_size=2, D=16, M=32).float()
    layer.experts.p = p
    ref = _layer(E=8, C=C, bpr=bpr, group_size=2, D=16, M=32).float()
    ref.experts.p = p
    ref.load_state_dict(layer.state_dict())
    layer.experts.impl, ref.experts.impl = "grouped_mm", "bmm"
    x = torch.randn(5, 9, 16)
    gy = torch.randn_like(x)
    res = []
    for lay in (layer, ref):
        with rng.positional_rng(seed=4):
            res.append(_grads(lay, x, gy))
    assert torch.isfinite(res[0][0]).all()
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(res[0][2], res[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    layer.eval(), ref.eval()
    with torch.inference_mode():
        torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    # Frozen experts (only the router and the input need gradients) and a frozen second layer.
    for frozen in (("w1", "b1", "w2", "b2"), ("w2", "b2")):
        for lay in (layer, ref):
            lay.train()
            for name in frozen:
                getattr(lay.experts, name).requires_grad_(False)
        xi = [x.clone().requires_grad_(True) for _ in range(2)]
        got = []
        for lay, xx in zip((layer, ref), xi):
            with rng.positional_rng(seed=5):
                y, aux = lay(xx)
            params = [q for q in lay.parameters() if q.requires_grad]
            got.append(torch.autograd.grad((y * gy).sum() + aux["aux_loss"], [xx, *params]))
        assert len(got[0]) == len(got[1])
        for a, b in zip(*got):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason=f"torch {torch.__version__} has no torch._grouped_mm"
)
def test_compiled_grouped_mm_layer_trains_like_eager():
    # torch.compile (inductor) of the grouped_mm layer, forward and backward in bf16: its row operands stay
    # 16-byte aligned whatever layout the compiler picks (a row count not a multiple of 8 used to fail), and
    # the capacity-rounding warning, first raised inside the compiled region, does not break tracing. With
    # torch 2.11 this also caught all-zero expert gradients (an in-place add to the Function's output).
    import vmoe.moe.router

    vmoe.moe.router._warned.clear()
    layer = _layer(E=8, C=1.05, group_size=2, D=16, M=32).float().eval()  # eval: no router noise
    layer.experts.impl = "grouped_mm"
    x = torch.randn(3, 9, 16)
    grads = []
    for fn in (torch.compile(layer), layer):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = fn(xi)
        (y.float().square().sum() + aux["aux_loss"]).backward()
        grads.append([xi.grad, *(p.grad.clone() for p in layer.parameters())])
        layer.zero_grad()
    for a, b in zip(*grads):  # bf16: equal up to rounding, relative to each gradient's size
        assert float((a - b).norm() / b.norm()) < 2e-2


@pytest.mark.parametrize("impl", ["packed", "bmm"])
def test_dropless_equals_per_token_reference(impl):
    # capacity_factor=None: nothing is dropped, and y[t] = sum_k gate_k * expert_{e_k}(x[t]). The packed
    # path materialises only the k*N filled rows of the E x S-per-group buffers.
    from vmoe.layers import activation

    layer = _layer(E=4, k=2, C=None, group_size=2).eval()
    layer.experts.impl = impl
    x = torch.randn(5, 6, 8, dtype=torch.float64)
    layer.record_routing = True
    y, aux = layer(x)
    assert float(aux["dropped_fraction"]) == 0.0
    r, ex = layer.last_routing, layer.experts
    assert bool(r["kept"].all())
    xf, want = x.reshape(-1, 8), torch.zeros(30, 8, dtype=torch.float64)
    e_idx, gates = r["expert_index"].reshape(30, 2), r["gates"].reshape(30, -1)
    for t in range(30):
        for e in e_idx[t].tolist():
            h = activation(xf[t] @ ex.w1[e] + ex.b1[e], ex.act)
            want[t] += gates[t, e] * (h @ ex.w2[e] + ex.b2[e])
    torch.testing.assert_close(y.reshape(30, 8), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["packed", "bmm", "loop"])
def test_fast_path_never_builds_an_s_by_e_by_c_tensor(impl):
    # Issue 6: nothing of size S x E x capacity on the fast path, forward or backward; the largest
    # tensor any op produces is O(rows x M). The einsum reference does build one (the check can fail).
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Largest(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    B, T, D, M, E = 4, 50, 4, 8, 8
    sizes = {}
    for dispatch in ("index", "einsum"):
        layer = _layer(E=E, C=1.0, group_size=2, D=D, M=M, dispatch=dispatch)
        layer.experts.impl = impl
        x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
        with Largest() as mode:
            y, aux = layer(x)
            (y.square().sum() + aux["aux_loss"]).backward()
        sizes[dispatch] = mode.numel
    G, S = B // 2, 2 * T
    C = aux["capacity"]  # per group, of the last (einsum) layer: the same routing
    one_hot = G * S * E * int(C)
    assert sizes["einsum"] >= one_hot
    assert sizes["index"] <= max(B * T * M, E * G * int(C) * M), (sizes, one_hot)
    assert sizes["index"] * 4 < one_hot


# Ops whose CUDA kernels wait for the GPU (data-dependent output sizes, or a value read back to the host).
_SYNCING_OPS = (
    "aten._local_scalar_dense",  # .item(), .tolist(), bool(t), int(t)
    "aten.nonzero",
    "aten.argwhere",
    "aten.masked_select",
    "aten._unique",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.bincount",
    "aten.histc",
    "aten.equal",
    "aten.is_nonzero",
    "aten.repeat_interleave.Tensor",  # without output_size
)


def test_router_losses_are_issued_after_the_expert_matmuls():
    """On a GPU a kernel runs when the CPU has issued it: the router's auxiliary losses (~25 small
    ops) are issued after the experts' matmuls, so they queue behind them rather than delay them.
    The losses and the routing are still those of the router's own forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Order(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    layer = _layer(E=4, C=1.0, group_size=2).float()
    layer.experts.impl = "bmm"
    layer.train()
    x = torch.randn(4, 6, 8)
    with Order() as mode:
        _, aux = layer(x)
    first_matmul = min(i for i, op in enumerate(mode.ops) if op in ("bmm", "baddbmm"))
    loss_ops = [i for i, op in enumerate(mode.ops) if op in ("std", "erf", "special_ndtr")]
    assert loss_ops and min(loss_ops) > first_matmul, mode.ops
    with rng.positional_rng(seed=3):  # the same noise for the router alone and in the layer
        out = layer.router(x.reshape(2, 12, 8), tokens_per_image=6)
    with rng.positional_rng(seed=3):
        _, aux = layer(x)
    torch.testing.assert_close(aux["aux_loss"], out.aux_loss.mean())
    torch.testing.assert_close(aux["importance_loss"], out.metrics["importance_loss"].mean())
    torch.testing.assert_close(aux["load_loss"], out.metrics["load_loss"].mean())
    assert float(aux["load_loss"]) > 0  # noise was on


@pytest.mark.parametrize("impl", ["bmm", "loop", "grouped_mm"])
def test_static_shape_path_never_waits_for_the_device(impl, monkeypatch):
    """Off the CPU (and under compile) routing, dispatch, experts and combine run without a host sync.

    Emulated on the CPU: the layer is forced into its static-shape mode, and every op of a training
    step (vanilla and BPR routing, capacity and dropless, expert dropout) and of inference is checked
    against the ops that synchronise on CUDA, including boolean-mask indexing. The GPU test below
    checks the same with CUDA's own sync detector.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    import vmoe.moe.dispatch
    import vmoe.moe.experts

    for mod in (vmoe.moe.dispatch, vmoe.moe.experts):
        monkeypatch.setattr(mod, "prefer_static_shapes", lambda device: True)

    class Syncs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.found: list[str] = []
            self.seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen += 1
            name = str(func)
            bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in tree_leaves(args[1:])
            )
            if name.startswith(_SYNCING_OPS) or bool_index:
                self.found.append(name)
            return func(*args, **(kwargs or {}))

    for bpr in (False, True):
        for C in (1.05, None):
            layer = _layer(E=8, C=C, bpr=bpr, group_size=2, D=16, M=32).float()  # grouped_mm: no float64
            layer.experts.impl = impl
            layer.experts.p = 0.1
            layer.experts.bias_in_matmul = True  # bmm's other form: buffers with a ones column
            x = torch.randn(5, 9, 16, requires_grad=True)
            with Syncs() as mode:
                layer.train()
                y, aux = layer(x)
                (y.square().sum() + aux["aux_loss"]).backward()
                layer.eval()
                with torch.inference_mode():
                    layer(x.detach())
            assert mode.seen > 50  # the mode saw the step
            assert not mode.found, (bpr, C, mode.found)
    # The packed (CPU) mode does sync, and the check sees it.
    monkeypatch.undo()
    layer = _layer(E=8, group_size=2, D=16, M=32)
    with Syncs() as mode:
        layer(torch.randn(5, 9, 16, dtype=torch.float64))
    assert mode.found


# --------------------------------------------------------------------------------------------- router


def _router(E=4, k=2, D=6, **kw) -> TopKRouter:
    torch.manual_seed(0)
    return TopKRouter(D, RouterConfig(num_experts=E, num_selected=k, **kw))


def test_router_noise_only_in_training():
    router = _router()
    x = torch.randn(2, 10, 6)
    router.eval()
    a, b = router(x), router(x)
    clean = torch.softmax(router.logits(x), -1)
    assert torch.equal(a.gates, clean) and torch.equal(b.gates, clean)
    assert torch.equal(a.metrics["load_loss"], torch.zeros(2))
    router.train()
    c = router(x)
    assert not torch.allclose(c.gates, clean)
    assert (c.metrics["load_loss"] > 0).all()


@pytest.mark.parametrize("E,noise_std", [(4, 1.0), (8, 2.0)])
def test_router_noise_std_is_noise_std_over_E(E, noise_std):
    router = _router(E=E, k=1, noise_std=noise_std, capacity_factor=None)
    with torch.no_grad():
        router.weight.zero_()  # logits are 0: the gates are softmax(noise)
    router.train()
    torch.manual_seed(1)
    out = router(torch.randn(1, 40_000, 6))
    logg = out.gates.double().log()[0]  # = noise - logsumexp(noise)
    diff = logg[:, 1:] - logg[:, :1]  # noise_e - noise_0, variance 2 sigma^2
    sigma = (diff.var(dim=0).mean() / 2).sqrt().item()
    assert sigma == pytest.approx(noise_std / E, rel=0.02)
    assert abs(diff.mean().item()) < 0.02 * noise_std / E * 5


def test_router_logits_fp32_under_cpu_autocast():
    router = _router()
    x = torch.randn(2, 5, 6)
    ref = x @ router.weight.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.logits(x)
        logits_bf16_in = router.logits(x.bfloat16())
        out = router(x)
        plain = F.linear(x, router.weight)
    assert plain.dtype == torch.bfloat16  # autocast is really on
    assert logits.dtype == torch.float32 and logits_bf16_in.dtype == torch.float32
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-6)
    assert out.gates.dtype == torch.float32 and out.routing.weights.dtype == torch.float32
    # The whole layer under autocast: gates (combine weights) stay fp32.
    layer = _layer().float()
    layer.record_routing = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(torch.randn(4, 3, 8))
    assert layer.last_routing["gates"].dtype == torch.float32


def test_router_aux_loss_weights():
    router = _router(E=4)
    x = torch.randn(3, 12, 6)
    router.train()
    out = router(x)
    imp = importance_loss(torch.softmax(router.logits(x), -1))  # clean gates
    torch.testing.assert_close(out.metrics["importance_loss"], imp)
    assert (out.metrics["load_loss"] > 0).all()
    torch.testing.assert_close(out.aux_loss, 0.005 * imp + 0.005 * out.metrics["load_loss"])
    router.eval()
    out = router(x)
    torch.testing.assert_close(out.aux_loss, 0.005 * imp)
    # The layer's aux_loss is the mean over groups.
    layer = _layer(group_size=1)
    layer.eval()
    xl = torch.randn(3, 4, 8, dtype=torch.float64)
    _, aux = layer(xl)
    per_group = importance_loss(torch.softmax(layer.router.logits(xl), -1))  # (3,) one image each
    torch.testing.assert_close(aux["aux_loss"], 0.005 * per_group.mean())


def test_router_positional_noise_reproducible():
    router = _router()
    router.train()
    x = torch.randn(4, 10, 6)
    with rng.positional_rng(seed=11):
        a = router(x).gates
    with rng.positional_rng(seed=11):
        b = router(x).gates
    with rng.positional_rng(seed=12):
        c = router(x).gates
    assert torch.equal(a, b) and not torch.equal(a, c)
    with rng.positional_rng(seed=11, image_offset=5):
        d = router(x).gates
    assert not torch.equal(a, d)
    # Half the batch with image_offset reproduces the full batch's noise rows (layer, groups of 2 images).
    layer = _layer(group_size=2).float()
    layer.train()
    layer.record_routing = True
    xb = torch.randn(4, 5, 8)
    with rng.positional_rng(seed=5):
        layer(xb)
    full = layer.last_routing["gates"]
    with rng.positional_rng(seed=5, image_offset=2):
        layer(xb[2:])
    half = layer.last_routing["gates"]
    torch.testing.assert_close(half, full[2:], rtol=0, atol=0)
    with rng.positional_rng(seed=5, image_offset=0):
        layer(xb[2:])
    assert not torch.equal(layer.last_routing["gates"], full[2:])


# ------------------------------------------------------------------------------------------ bad input


def test_layer_bad_input():
    layer = _layer()
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        layer(torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 8\)"):
        layer(torch.randn(1, 2, 3, 8, dtype=torch.float64))
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"group_size.*got {bad}"):
            MoEConfig(group_size=bad)
        with pytest.raises(ValueError, match=f"group_size.*got {bad}"):
            routing_chunks(4, bad)
    with pytest.raises(ValueError, match=r"\(10, 6\)"):
        _router()(torch.randn(10, 6))
    with pytest.raises(ValueError, match="'gather'"):
        MoEConfig(dispatch="gather")
    with pytest.raises(ValueError, match="batch of >= 1 image, got 0"):
        layer(torch.randn(0, 5, 8, dtype=torch.float64))
    # Both dispatchers check the shape of the expert outputs they combine.
    layer.eval()
    layer(torch.randn(3, 5, 8, dtype=torch.float64))
    routings = [layer.router(torch.randn(1, 15, 8, dtype=torch.float64)).routing]
    for d in (IndexDispatcher(routings), EinsumDispatcher(routings)):
        E, R = d.num_experts, d.rows_per_expert
        d.combine(torch.randn(E, R, 8, dtype=torch.float64))
        for shape in ((E, R + 5, 8), (E + 1, R, 8), (E * R, 8)):
            with pytest.raises(ValueError, match=f"combine expects \\({E}, {R}, D\\)"):
                d.combine(torch.randn(*shape, dtype=torch.float64))


def test_routing_chunks():
    assert routing_chunks(7, 3) == [(0, 2, 3), (6, 1, 1)]
    assert routing_chunks(2, 8) == [(0, 1, 2)]
    assert routing_chunks(8, 4) == [(0, 2, 4)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_backends_agree_and_match_cpu():
    idx = _layer(E=8, C=0.75, group_size=2).float()
    ein = _layer(E=8, C=0.75, group_size=2, dispatch="einsum").float()
    ein.load_state_dict(idx.state_dict())
    x = torch.randn(5, 7, 8)
    gy = torch.randn_like(x)
    idx.eval()
    ein.eval()
    y_cpu, _, g_cpu = _grads(idx, x, gy)
    idx.cuda()
    ein.cuda()
    y_i, _, g_i = _grads(idx, x.cuda(), gy.cuda())
    y_e, _, g_e = _grads(ein, x.cuda(), gy.cuda())
    torch.testing.assert_close(y_i, y_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_i.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
    for a, b, c in zip(g_i, g_e, g_cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.cpu(), c, rtol=1e-4, atol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_amp, _ = idx(x.cuda())
    assert y_amp.dtype == torch.bfloat16
    torch.testing.assert_close(y_amp.float(), y_i, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_epilogue_rows_matches_the_slab_path(dtype):
    """On CUDA, inference over width-1 slabs runs bias + GELU in cuBLASLt's epilogue (tanh-GELU in
    torch's source, epilogue and fallback alike): equal to the generic slab path over the same slabs
    up to the epilogue's own precision, which torch's tests allow 1e-4 in float32 (wrong rows, weights
    or biases would be O(1) off)."""
    from vmoe.moe.experts import _GroupedMlp, expert_slabs

    torch.manual_seed(0)
    E, D, M, counts = 5, 64, 128, [30, 0, 50, 17, 9]
    slabs = expert_slabs(counts, 1)
    x = torch.randn(sum(counts), D, device="cuda", dtype=dtype)
    ws = [torch.randn(*s, device="cuda", dtype=dtype) / 8 for s in ((E, D, M), (E, M), (E, M, D), (E, D))]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = _GroupedMlp.apply(x, *ws, slabs, "gelu_tanh", True)  # takes the epilogue branch
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    x64, ws64 = x.cpu().double(), [w.cpu().double() for w in ws]  # the generic branch, on the CPU
    ref = _GroupedMlp.apply(x64, *ws64, slabs, "gelu_tanh", True)
    err = float((got.cpu().double() - ref).norm() / ref.norm())
    assert err < (1e-3 if dtype == torch.float32 else 1e-2), err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["auto", "grouped_mm"])
def test_cuda_compiled_layer_trains_like_eager(impl):
    """torch.compile of a bf16 training step on CUDA gives eager's output and gradients. Backend
    ``aot_eager``: dynamo and AOTAutograd trace the hand-written autograd Functions exactly as for
    inductor (where torch 2.11 once lost every expert gradient), without minutes of kernel compiling."""
    if impl == "grouped_mm" and not (
        hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0)
    ):
        pytest.skip("torch._grouped_mm's CUDA path needs sm90 and torch >= 2.8")
    layer = _layer(E=8, C=1.05, group_size=2, D=64, M=128).float().cuda().eval()  # eval: no router noise
    layer.experts.impl = impl
    x = torch.randn(4, 33, 64, device="cuda")
    results = []
    for fn in (torch.compile(layer, backend="aot_eager"), layer):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, aux = fn(xi)
        (y.float().square().sum() + aux["aux_loss"]).backward()
        results.append([y.detach().float(), xi.grad, *(p.grad.clone() for p in layer.parameters())])
        layer.zero_grad()
    for a, b in zip(*results):  # bf16: equal up to rounding, relative to each tensor's size
        assert float(b.norm()) > 0
        assert float((a - b).norm() / b.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("bpr", [False, True])
def test_cuda_training_step_never_syncs(bpr):
    """CUDA's own detector (``set_sync_debug_mode("error")``) sees no host sync in a bf16 training
    step of the layer (router, dispatch, experts, combine, aux loss), with capacity and dropless
    (``auto`` packs dropless buffers, with one sync: it is checked with capacity only)."""
    cases = [("auto", 1.05)] + [(impl, C) for impl in ("bmm", "loop") for C in (1.05, None)]
    if hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability() >= (9, 0):
        cases += [("grouped_mm", 1.05), ("grouped_mm", None)]
    for impl, C in cases:
        layer = _layer(E=8, C=C, bpr=bpr, group_size=2, D=64, M=128).float().cuda()
        layer.experts.impl = impl
        x = torch.randn(4, 33, 64, device="cuda", requires_grad=True)

        def step(layer: MoEMlp = layer, x: torch.Tensor = x) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y, aux = layer(x)
            (y.float().square().sum() + aux["aux_loss"]).backward()

        step()  # warm-up: one-time initialisation (handles, workspaces) may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert layer.experts.w1.grad is not None and torch.isfinite(layer.experts.w1.grad).all()


def test_benchmark_script_small(tmp_path):
    # The benchmark's logic (correctness check incl. bf16 autocast, every row, JSON schema) at tiny shapes.
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "moe_layer.py"
    spec = importlib.util.spec_from_file_location("bench_moe_layer", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "r.json"
        mod.main(
            [
                *(
                    "--small",
                    "--amp",
                    "bf16",
                    "--repeats",
                    "1",
                    "--warmup",
                    "1",
                    "--json",
                    str(out),
                    "--no-peers",
                ),
                *("--impls", "bogus"),  # an extra row that cannot run is reported and left out, not fatal
            ]
        )
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["config"]["dtype"] == "bf16 autocast"
    names = {r["name"] for r in res["results"]}
    assert {"floor", "vmoe", "vmoe_einsum", "vmoe_bpr", "loop", "floor_fwd", "vmoe_fwd"} <= names
    assert all(r["ms"] > 0 and r["ratio_to_floor"] > 0 for r in res["results"])
    assert res["config"]["checks"]["E8"]["max_rel_err"] <= 1e-2
    assert "experts_impl must be one of" in res["config"]["checks"]["E8_bogus"]["failed"]
    assert "vmoe_bogus" not in names


def test_row_dots_chunked_float32_for_half_precision():
    # The combine's weight gradient: float32 products and sums for bf16 rows, computed a chunk at a time
    # (no float32 copy of the whole buffer), equal to the unchunked float32 result bit for bit.
    from vmoe.moe.dispatch import _row_dots

    a, b = torch.randn(1000, 24).bfloat16(), torch.randn(1000, 24).bfloat16()
    want = torch.linalg.vecdot(a.float(), b.float())
    got = _row_dots(a, b, chunk=300)  # 4 chunks, the last one partial
    assert got.dtype == torch.float32 and torch.equal(got, want)
    torch.testing.assert_close(_row_dots(a.double(), b.double()), want.double(), rtol=1e-6, atol=1e-6)


def test_packed_experts_backward_takes_saved_rows_in_any_layout():
    # _GroupedMlp views its rows by strides; a saved-tensor hook may hand x back with other strides
    # (here column-major): the gradients must not change.
    from vmoe.moe import expert_slabs

    torch.manual_seed(0)
    ex = Experts(4, 8, 16, init="independent").double()
    counts = [3, 5, 0, 4]
    x = torch.randn(sum(counts), 8, dtype=torch.float64, requires_grad=True)
    slabs = expert_slabs(counts, 2)

    def grads() -> tuple[torch.Tensor, ...]:
        y = ex.forward_rows(x, counts, None, slabs)
        return torch.autograd.grad(y.square().sum(), [x, *ex.parameters()])

    want = grads()
    relayout = (lambda t: t, lambda t: t.t().contiguous().t() if t.dim() == 2 else t)
    with torch.autograd.graph.saved_tensors_hooks(*relayout):
        got = grads()
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
