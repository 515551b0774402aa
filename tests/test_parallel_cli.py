"""`torchrun -m vmoe train --expert-parallel N` equals the single-process run (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vmoe
from vmoe.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _vmoe(args: list[str], *, nproc: int = 1) -> subprocess.CompletedProcess:
    """Run ``vmoe ARGS`` in one process, or under torchrun with ``nproc`` processes (gloo, loopback)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "vmoe", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "vmoe",
            *args,
        ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _losses(run: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def _accuracy(run: Path) -> float:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "accuracy" in r][-1]["accuracy"]


TRAIN = [
    "train",
    "--recipe",
    "tiny",
    "--steps",
    "3",
    "--log-every",
    "1",
    "--no-progress",
    "--set",
    "max_test=48",
    "eval_batch_size=16",
    "model.dropout=0.1",
    "mixup=0.2",  # partners within routing groups: the same on 2 ranks
]


def test_torchrun_expert_parallel_matches_single_process(tmp_path):
    _vmoe([*TRAIN, "--out", str(tmp_path / "one")])
    res = _vmoe([*TRAIN, "--expert-parallel", "2", "--out", str(tmp_path / "two")], nproc=2)
    assert "not a multiple of group_size" not in res.stderr  # 8 images per rank, groups of 4
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]  # rank 0 alone writes metrics.jsonl
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-5), s
    assert _accuracy(tmp_path / "two") == pytest.approx(_accuracy(tmp_path / "one"), abs=1e-6)
    # The 2-process checkpoint holds all experts and loads in one process.
    sa = load_checkpoint(tmp_path / "one")["state_dict"]
    sb = load_checkpoint(tmp_path / "two")["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        if "attn" in k and "bias" in k:
            continue  # key bias has an exactly-zero gradient; AdamW amplifies its rounding noise
        torch.testing.assert_close(sb[k], sa[k], atol=1e-4, rtol=1e-4, msg=k)
    model = vmoe.load(tmp_path / "two")
    assert model.moe_layers()[0][1].experts.w1.shape[0] == model.cfg.moe.router.num_experts


def test_checkpoint_from_two_processes_resumes_in_one(tmp_path):
    """A run checkpointed by a 2-process expert-parallel job continues in one process unchanged."""
    import shutil

    args = [
        "train",
        "--recipe",
        "tiny",
        "--steps",
        "5",
        "--log-every",
        "1",
        "--no-progress",
        "--checkpoint-every",
        "3",
        "--set",
        "max_test=32",
        "eval_batch_size=16",
    ]
    _vmoe([*args, "--out", str(tmp_path / "one")])
    run = tmp_path / "mixed"
    _vmoe([*args, "--expert-parallel", "2", "--out", str(run)], nproc=2)
    # Keep only the step-3 checkpoint written by the 2-process job, then resume in one process.
    shutil.rmtree(run / "checkpoints" / "step_00000005")
    res = _vmoe([*args, "--out", str(run), "--resume"])
    assert "resuming from" in res.stderr and "step 3" in res.stderr
    a, b = _losses(tmp_path / "one"), _losses(run)
    assert sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        assert b[s] == pytest.approx(a[s], abs=1e-5), s


def test_torchrun_warns_when_ranks_split_routing_groups(tmp_path):
    args = ["train", "--recipe", "tiny", "--steps", "1", "--batch-size", "12", "--no-progress"]
    res = _vmoe([*args, "--set", "max_test=16", "--out", str(tmp_path / "run")], nproc=2)
    assert "warning: 6 images per rank is not a multiple of group_size 4" in res.stderr


def test_vmoe_train_destroys_the_process_group_and_train_keeps_it(tmp_path):
    # Left to the interpreter's exit, gloo's threads could abort a finished rank ("terminate called
    # without an active exception", seen once in CI): `vmoe train` destroys the process group after a
    # finished run. The library's train() leaves it up, so that a script can train several times.
    head = (
        "import sys, torch.distributed as dist\n"
        "from vmoe.cli import main\n"
        "from vmoe.train.config import apply_overrides\n"
        "from vmoe.train.loop import train\n"
        "from vmoe.train.recipes import get_recipe\n"
        "cfg = apply_overrides(get_recipe('tiny'), ['steps=1', 'batch_size=8', 'max_test=16'])\n"
    )
    cases = {
        "cli": "argv = ['train', '--recipe', 'tiny', '--out', sys.argv[1], '--no-progress']\n"
        "assert main(argv + ['--set', 'steps=1', 'batch_size=8', 'max_test=16']) == 0\n",
        "library": "train(cfg, sys.argv[1], progress=False)\ntrain(cfg, sys.argv[1] + '_2', progress=False)\n",
    }
    for name, body in cases.items():
        script = tmp_path / f"{name}.py"
        script.write_text(head + body + "sys.stdout.write(f'initialised {dist.is_initialized()}\\n')\n")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += [
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            str(script),
            str(tmp_path / name),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stdout.count(f"initialised {name == 'library'}") == 2, (name, res.stdout)


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc to find one worker")
def test_signal_to_one_rank_stops_all_at_one_step_with_a_checkpoint(tmp_path, wait_for_metrics):
    """SIGTERM to rank 1 alone: every rank stops at the same step and the checkpoint is written (no hang);
    the run then resumes in one process without naming the layout."""
    import signal

    from vmoe.train.checkpoint import latest_checkpoint

    run = tmp_path / "run"
    args = ["train", "--recipe", "tiny", "--steps", "400", "--log-every", "1", "--no-progress"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
    ]
    cmd += [
        "--master_port",
        str(_free_port()),
        "-m",
        "vmoe",
        *args,
        "--expert-parallel",
        "2",
        "--out",
        str(run),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_metrics(run, 3)
        workers = {_rank_of(c): c for c in _children(proc.pid)}
        os.kill(workers[1], signal.SIGTERM)
        _, err = proc.communicate(timeout=120)  # a hang fails here
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = latest_checkpoint(run)
    assert ckpt is not None, err[-3000:]
    stopped = int(ckpt.name.split("_")[1])
    assert 3 <= stopped < 400
    assert max(_losses(run)) == stopped  # rank 0 logged up to the step all ranks stopped at
    res = _vmoe(["train", "--out", str(run), "--resume", "--steps", str(stopped + 2), "--no-progress"])
    assert "resuming from" in res.stderr
    assert sorted(_losses(run)) == list(range(1, stopped + 3))
