"""Expert parallelism x data parallelism (vmoe.parallel): multi-process runs equal one process.

The multi-process tests spawn gloo workers on 127.0.0.1; results come back through files in
``tmp_path``. A run trains a small MoE model for 3 AdamW steps with router noise and expert
dropout under ``vmoe.rng.positional_rng``, each rank feeding its contiguous slice of the global
batch, and records gathered outputs, aux losses, gradients, parameters and optimizer state.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import vmoe
from vmoe import parallel, rng

GLOBAL_BATCH = 16
NUM_CLASSES = 5
NUM_EXPERTS = 8
STEPS = 4  # step 0 only trains the head (zero-initialised head kernel); 1-3 train everything
RESUME_AT = 2
SEED = 1234
ATOL = 1e-5
MAX_NORM = 1.05  # gradient clipping by global norm (active in some steps, not all)


# ----------------------------------------------------------------------------- model and training


MODEL_OVERRIDES: dict[str, Any] = dict(
    num_classes=NUM_CLASSES,
    image_size=12,
    patch_size=4,
    num_layers=2,
    hidden_size=16,
    mlp_dim=24,
    num_heads=2,
    moe_layers=(0, 1),
    num_experts=NUM_EXPERTS,
    group_size=2,
    capacity_factor=1.0,
    capacity_multiple_of=1,
    noise_std=1.0,
    dropout=0.1,
    moe_dropout=0.1,
    expert_init="independent",
)


def _make_model() -> nn.Module:
    """A tiny ``vmoe_ti``: 2 MoE blocks (E=8, k=2, C=1.0), 9 patches + class token, dropout 0.1."""
    return vmoe.create_model("vmoe_ti", **MODEL_OVERRIDES)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 12, 12, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (GLOBAL_BATCH,), generator=g)
    return images, labels


def _gather_world(t: torch.Tensor, layout: parallel.Layout) -> torch.Tensor:
    if not layout.distributed:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(layout.world_size)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def _clone(d: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in d.items()
    }


def _build(layout: parallel.Layout, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)  # differs per rank: parallelize must broadcast rank 0's weights
    model = parallel.parallelize(_make_model(), layout)
    model.train()
    # eps=1e-5 (not 1e-8): the attention key bias has an exactly-zero gradient (softmax is
    # invariant to it), so its computed gradient is roundoff (~1e-9) that differs with the
    # summation order; Adam with eps=1e-8 would turn it into +-lr steps in any two runs that
    # sum differently. (Harmless in training: that bias has no effect on the outputs.) Real
    # gradients here are >= 1e-4, barely affected by the larger eps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-5)
    return model, opt


def _step(model: nn.Module, opt: torch.optim.Optimizer, layout: parallel.Layout, step: int) -> dict[str, Any]:
    images, labels = _batch(step)
    lb, off = layout.local_batch(GLOBAL_BATCH), layout.image_offset(GLOBAL_BATCH)
    with rng.positional_rng(seed=rng.mix_seed(SEED, step), image_offset=off):
        logits, aux = model(images[off : off + lb])
    loss = F.cross_entropy(logits, labels[off : off + lb]) + aux["aux_loss"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    parallel.sync_gradients(model, layout)
    norm = parallel.clip_grad_norm_(model, MAX_NORM, layout)
    grads = parallel.full_tensors(model, {n: p.grad for n, p in model.named_parameters()}, layout)
    out = {
        "logits": _gather_world(logits, layout),
        "aux": parallel.all_reduce_mean(aux["aux_loss"], layout),
        "loss": parallel.all_reduce_mean(loss, layout),
        "grads": _clone(grads),
        "norm": norm.detach().clone(),
    }
    opt.step()
    out["params"] = _clone(parallel.full_state_dict(model, layout))
    return out


def _train(layout: parallel.Layout) -> dict[str, Any]:
    model, opt = _build(layout, seed=1000 + layout.rank)
    steps, snapshot = [], None
    for step in range(STEPS):
        if step == RESUME_AT:
            snapshot = (
                _clone(parallel.full_state_dict(model, layout)),
                copy.deepcopy(parallel.full_optimizer_state_dict(model, opt, layout)),
            )
        steps.append(_step(model, opt, layout, step))
    rec: dict[str, Any] = {
        "steps": steps,
        "opt": copy.deepcopy(parallel.full_optimizer_state_dict(opt, model, layout)),
    }
    # Resume from the full (single-process) checkpoint taken before step RESUME_AT.
    assert snapshot is not None
    model2, opt2 = _build(layout, seed=77 + layout.rank)
    parallel.load_full_state_dict(model2, snapshot[0], layout)
    parallel.load_full_optimizer_state_dict(model2, opt2, snapshot[1], layout)
    for step in range(RESUME_AT, STEPS):
        last = _step(model2, opt2, layout, step)
    rec["resumed"] = last["params"]
    rec["local_experts"] = [m.experts.num_experts for _, m in model.moe_layers()]
    return rec


_REFERENCE: dict[str, Any] = {}


def _reference() -> dict[str, Any]:
    if not _REFERENCE:
        _REFERENCE.update(_train(parallel.single_process("cpu")))
    return _REFERENCE


def _assert_same(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys differ"
        for k in want:
            _assert_same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _compare_run(rec: dict[str, Any], ref: dict[str, Any], name: str) -> None:
    _assert_same(rec["steps"], ref["steps"], f"{name}.steps")
    _assert_same(rec["opt"]["state"], ref["opt"]["state"], f"{name}.opt")
    _assert_same(rec["resumed"], ref["steps"][-1]["params"], f"{name}.resumed")


# ----------------------------------------------------------------------------- process launcher


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn_name: str, rank: int, world: int, port: int, out: str, *args: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        globals()[fn_name](rank, Path(out), *args)
    except BaseException:
        (Path(out) / f"error_{rank}.txt").write_text(traceback.format_exc())
        os._exit(1)
    os._exit(0)  # skip interpreter teardown (process groups of crashed peers can hang it)


def _launch(
    fn_name: str,
    world: int,
    out: Path,
    *args: Any,
    timeout: float = 100.0,
    required: tuple[int, ...] | None = None,
) -> dict[int, int | None]:
    """Run ``fn_name(rank, out, *args)`` in ``world`` spawned processes; returns exit codes.

    Waits for the ranks in ``required`` (default: all) up to ``timeout`` seconds, then kills
    whatever is left. Fails with the workers' tracebacks if a required rank did not exit 0.
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(fn_name, r, world, port, str(out), *args)) for r in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    required = tuple(range(world)) if required is None else required
    for r in required:
        procs[r].join(max(0.0, deadline - time.monotonic()))
    codes: dict[int, int | None] = {}
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join(5)
            codes[r] = None
        else:
            codes[r] = p.exitcode
    errors = "\n".join(f.read_text() for f in sorted(out.glob("error_*.txt")))
    for r in required:
        assert codes[r] == 0, f"rank {r} exit code {codes[r]} (None: killed after {timeout}s)\n{errors}"
    return codes


# ----------------------------------------------------------------------------- workers


def _w_exact(rank: int, out: Path, eps: list[int], extra_checks: bool) -> None:
    for ep in eps:
        layout = parallel.setup(expert_parallel=ep, backend="gloo", timeout_s=60)
        assert (layout.ep_size, layout.dp_size) == (ep, layout.world_size // ep)
        assert layout.ep_rank == rank % ep and layout.dp_rank == rank // ep
        rec = _train(layout)
        torch.save(rec, out / f"ep{ep}_rank{rank}.pt")
    if extra_checks:
        _comm_checks(rank, out, layout)
    parallel.barrier(layout)
    parallel.shutdown(layout)


def _comm_checks(rank: int, out: Path, layout: parallel.Layout) -> None:
    """Direct checks of the all-to-all expert comm and of check_consistent (world of 2)."""
    layout = parallel.setup(expert_parallel=2, backend="gloo", timeout_s=60)
    E, R, D, P = 4, 3, 5, 2
    comm = parallel.AllToAllExpertComm(layout.ep_group, P, E)
    bufs = [torch.randn(E, R, D, generator=torch.Generator().manual_seed(r)) for r in range(P)]
    rows = [torch.arange(E * R).view(E, R) + 1000 * r for r in range(P)]
    x = bufs[rank].clone().requires_grad_(True)
    local, local_rows = comm.dispatch(x, rows[rank])
    El = E // P
    want = torch.cat([bufs[i][rank * El : (rank + 1) * El] for i in range(P)], dim=1)
    want_rows = torch.cat([rows[i][rank * El : (rank + 1) * El] for i in range(P)], dim=1)
    torch.testing.assert_close(local, want, atol=0, rtol=0)
    assert torch.equal(local_rows, want_rows)
    scale = torch.arange(1.0, El + 1).view(El, 1, 1) + 10 * rank  # expert-dependent function
    y = comm.combine(local * scale)
    assert y.shape == (E, R, D)
    full_scale = torch.cat([torch.arange(1.0, El + 1) + 10 * j for j in range(P)]).view(E, 1, 1)
    torch.testing.assert_close(y, bufs[rank] * full_scale, atol=0, rtol=0)
    (y * bufs[rank]).sum().backward()
    torch.testing.assert_close(x.grad, bufs[rank] * full_scale, atol=0, rtol=0)
    # check_consistent: equal dicts pass, different ones raise on every rank, naming the keys.
    parallel.check_consistent({"a": 1, "b": {"c": [1, 2]}}, layout)
    try:
        parallel.check_consistent({"a": 1, "b": {"c": rank, "d": "x"}, "e": rank}, layout)
    except ValueError as e:
        (out / f"consistent_{rank}.txt").write_text(str(e))
    t = parallel.all_reduce_mean(torch.tensor([float(rank), 2.0]), layout)
    torch.testing.assert_close(t, torch.tensor([0.5, 2.0]))
    _eval_checks(layout)
    (out / f"comm_ok_{rank}.txt").write_text("ok")


def _eval_checks(layout: parallel.Layout) -> None:
    """Expert-parallel evaluation equals the one-process one when batches split routing groups
    across ranks and end in a partial group: every image is routed with the same others."""
    from vmoe.data import make_synthetic
    from vmoe.eval.evaluate import evaluate

    _, test_set, info = make_synthetic(4, 19, 12, 3, NUM_CLASSES, seed=3)
    torch.manual_seed(7)
    single = _make_model()
    with torch.no_grad():  # a trained-looking head, so that the logits differ between images
        single.head.weight.normal_(0, 1.0)
    model = parallel.parallelize(copy.deepcopy(single), layout)
    # Batches of 7, 7, 5 images (group_size 2): the old even split put 4 + 3 images on the ranks,
    # cutting a group, and filled the last rank with copies that competed for capacity.
    for capacity in (1.0, 0.5):
        from vmoe import routing_overrides

        with (
            routing_overrides(single, capacity_factor=capacity),
            routing_overrides(model, capacity_factor=capacity),
        ):
            want = evaluate(single, test_set, info, batch_size=7)
            got = evaluate(model, test_set, info, batch_size=7, layout=layout)
        assert want["dropped_fraction"] > 0.05, want
        for key in ("accuracy", "dropped_fraction", "gflops_per_image"):
            assert got[key] == pytest.approx(want[key], abs=1e-9), (capacity, key, got, want)
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-5), (capacity, got, want)


def _w_failure(rank: int, out: Path, mode: str) -> None:
    layout = parallel.setup(expert_parallel=1, backend="gloo", timeout_s=5)
    parallel.all_reduce_mean(torch.ones(1), layout)  # both ranks are up
    if rank == 1:
        if mode == "exit":
            os._exit(3)
        time.sleep(60)  # hang; the launcher kills it
    t0 = time.monotonic()
    try:
        for _ in range(1000):
            parallel.all_reduce_mean(torch.ones(1), layout)
            time.sleep(0.05)
    except Exception as e:
        (out / "failure.txt").write_text(f"{time.monotonic() - t0:.1f}\n{type(e).__name__}: {e}")
        return
    (out / "failure.txt").write_text("no error")


# ----------------------------------------------------------------------------- tests


def test_single_process_layout() -> None:
    lay = parallel.single_process("cpu")
    assert (lay.rank, lay.world_size, lay.ep_size, lay.dp_size) == (0, 1, 1, 1)
    assert lay.is_main and not lay.distributed
    assert lay.local_batch(12) == 12 and lay.image_offset(12) == 0
    lay4 = parallel.Layout(
        rank=3, world_size=4, ep_size=2, dp_size=2, ep_rank=1, dp_rank=1, device=torch.device("cpu")
    )
    assert lay4.local_batch(16) == 4 and lay4.image_offset(16) == 12 and not lay4.is_main
    with pytest.raises(ValueError, match="multiple of the world size"):
        lay4.local_batch(10)


def test_setup_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not parallel.setup(1).distributed
    with pytest.raises(ValueError, match="expert_parallel=2"):
        parallel.setup(2)
    with pytest.raises(ValueError, match="positive integer"):
        parallel.setup(0)


def test_indivisible_experts_raise() -> None:
    with pytest.raises(ValueError, match="divisible"):
        parallel.AllToAllExpertComm(None, 3, 8)
    lay = parallel.Layout(
        rank=0, world_size=3, ep_size=3, dp_size=1, ep_rank=0, dp_rank=0, device=torch.device("cpu")
    )
    with pytest.raises(ValueError, match="not divisible by the expert-parallel size 3"):
        parallel.parallelize(_make_model(), lay)


def test_single_process_api_is_identity() -> None:
    lay = parallel.single_process("cpu")
    model = parallel.parallelize(_make_model(), lay)
    assert model.blocks[0].mlp.expert_comm is None and model.blocks[0].mlp.experts.num_experts == NUM_EXPERTS
    sd = parallel.full_state_dict(model, lay)
    assert sd["blocks.0.mlp.experts.w1"].shape[0] == NUM_EXPERTS
    assert set(parallel.expert_parameter_names(model)) == {
        f"blocks.{i}.mlp.experts.{n}" for i in (0, 1) for n in ("w1", "b1", "w2", "b2")
    }
    other = _make_model()
    parallel.load_full_state_dict(other, sd, lay)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k])
    parallel.check_consistent({"a": 1}, lay)
    with pytest.raises(TypeError, match="JSON"):
        parallel.check_consistent({"a": object()}, lay)
    assert torch.equal(parallel.all_reduce_mean(torch.tensor(2.0), lay), torch.tensor(2.0))
    parallel.sync_gradients(model, lay)
    opt = torch.optim.AdamW(model.parameters())
    assert parallel.full_optimizer_state_dict(model, opt, lay) == opt.state_dict()
    parallel.load_full_optimizer_state_dict(opt, model, opt.state_dict(), lay)  # either order
    with pytest.raises(TypeError, match="expected \\(model, optimizer\\)"):
        parallel.full_optimizer_state_dict(model, model, lay)  # type: ignore[arg-type]
    parallel.barrier(lay)
    parallel.shutdown(lay)


def test_reference_run_is_sane() -> None:
    ref = _reference()
    assert len(ref["steps"]) == STEPS
    for s in ref["steps"]:
        assert torch.isfinite(s["logits"]).all() and s["aux"] > 0
    norms = [float(s["norm"]) for s in ref["steps"]]
    assert min(norms) < MAX_NORM < max(norms), norms
    for s in ref["steps"][1:]:
        assert all(g.abs().sum() > 0 for k, g in s["grads"].items() if "experts" in k)
    # the parameters do move, and AdamW state exists for every parameter
    assert not torch.equal(
        ref["steps"][0]["params"]["blocks.0.mlp.experts.w1"],
        ref["steps"][-1]["params"]["blocks.0.mlp.experts.w1"],
    )
    assert len(ref["opt"]["state"]) == len(list(_make_model().parameters()))


@pytest.mark.distributed
def test_two_processes_match_single_process(tmp_path: Path) -> None:
    """ep=2 dp=1 and ep=1 dp=2 (plus direct all-to-all and check_consistent checks)."""
    _launch("_w_exact", 2, tmp_path, [2, 1], True)
    ref = _reference()
    for ep in (2, 1):
        for rank in range(2):
            rec = torch.load(tmp_path / f"ep{ep}_rank{rank}.pt", weights_only=False)
            assert rec["local_experts"] == [NUM_EXPERTS // ep] * 2
            _compare_run(rec, ref, f"ep{ep}/rank{rank}")
    for rank in range(2):
        assert (tmp_path / f"comm_ok_{rank}.txt").exists()
        msg = (tmp_path / f"consistent_{rank}.txt").read_text()
        assert "['b.c', 'e']" in msg and "rank(s) [1]" in msg, msg


@pytest.mark.distributed
def test_four_processes_match_single_process(tmp_path: Path) -> None:
    """ep=2 dp=2 and ep=4 dp=1."""
    _launch("_w_exact", 4, tmp_path, [2, 4], False)
    ref = _reference()
    for ep in (2, 4):
        for rank in range(4):
            rec = torch.load(tmp_path / f"ep{ep}_rank{rank}.pt", weights_only=False)
            assert rec["local_experts"] == [NUM_EXPERTS // ep] * 2
            _compare_run(rec, ref, f"ep{ep}/rank{rank}")


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_hung_rank_makes_others_raise(tmp_path: Path, mode: str) -> None:
    t0 = time.monotonic()
    _launch("_w_failure", 2, tmp_path, mode, timeout=60, required=(0,))
    text = (tmp_path / "failure.txt").read_text()
    assert text != "no error"
    assert float(text.split("\n")[0]) < 30, text
    assert time.monotonic() - t0 < 60
