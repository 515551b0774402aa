"""End-to-end tests of training, checkpoints, resume, evaluation, sweep, analysis and the CLI (tiny settings)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vmoe
from vmoe.cli import main
from vmoe.train.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from vmoe.train.config import TrainConfig, apply_overrides
from vmoe.train.loop import Trainer, TrainingInterrupted, lr_at, train
from vmoe.train.recipes import get_recipe

TINY = ["steps=6", "log_every=1"]


def tiny_cfg(*extra: str) -> TrainConfig:
    return apply_overrides(get_recipe("tiny"), [*TINY, *extra])


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def test_lr_schedule_warmup_and_decay():
    # warmup 10 of 100 steps to peak 1.0, then cosine to 0: step 0 -> 0.1, step 9 -> 1.0, last -> ~0
    assert lr_at(0, 100, 10, 1.0, 0.0, "cosine") == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0, "cosine") == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0, 0.0, "cosine") == pytest.approx(1.0)
    # half way through the decay (step 55 of 90 decay steps from 10): cos(pi/2) -> 0.5
    assert lr_at(55, 100, 10, 1.0, 0.0, "cosine") == pytest.approx(0.5)
    assert lr_at(55, 100, 10, 1.0, 0.0, "linear") == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.1, "linear") == pytest.approx(0.1)


def test_warmup_scales_with_run_length():
    cfg = get_recipe("default")
    assert cfg.warmup(1000) <= 100
    assert cfg.warmup(20) <= 2
    assert apply_overrides(cfg, ["warmup_fraction=0.5"]).warmup(100) == 10  # capped at 10%


def test_train_writes_run_directory(tmp_path):
    res = train(tiny_cfg(), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 6 and cfg["model"]["num_classes"] == 10
    recs = read_metrics(run)
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    for r in recs:
        if "loss" in r:
            assert math.isfinite(r["loss"]) and r["aux_loss"] > 0 and r["lr"] > 0 and r["images_per_s"] > 0
    evals = [r for r in recs if "accuracy" in r]
    assert evals and 0.0 <= evals[-1]["accuracy"] <= 1.0
    ck = latest_checkpoint(run)
    assert ck is not None and ck.name == "step_00000006"
    for f in (
        "model.safetensors",
        "model_config.json",
        "train_config.json",
        "data_info.json",
        "train_state.pt",
    ):
        assert (ck / f).exists(), f
    assert res.step == 6
    # vmoe.load rebuilds the same model
    model = vmoe.load(run)
    trainer_state = load_checkpoint(run)["state_dict"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer_state[k]), k
    assert not model.training


def test_refuses_to_overwrite_and_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    train(tiny_cfg("steps=2"), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="--resume"):
        Trainer(tiny_cfg("steps=2"), tmp_path / "run", progress=False)
    Trainer(tiny_cfg("steps=2"), tmp_path / "fresh", resume=True, progress=False)
    assert "starting fresh" in capsys.readouterr().err


def test_cli_resume_continues_with_the_runs_own_settings(tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["train", "--out", run, "--no-progress", "--log-every", "1"]
    assert main([*base, "--recipe", "tiny", "--steps", "3", "--set", "lr=0.002"]) == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    # No --recipe: the run's own settings (not the default recipe's), here extended to 5 steps.
    assert main(["train", "--out", run, "--resume", "--steps", "5", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resuming from" in err and "resuming with changed settings: steps 3 -> 5" in err
    now = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert now == {**saved, "steps": 5}
    assert sorted(step_losses(tmp_path / "run")) == [1, 2, 3, 4, 5]
    # A configuration with another model is refused, naming what differs, before anything is written.
    with pytest.raises(SystemExit) as ei:
        raise SystemExit(main([*base, "--resume", "--recipe", "default", "--steps", "6"]))
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "holds a different model" in err and "hidden_size: 32 -> 64" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 5


def test_interrupt_during_final_evaluation_keeps_the_run(tmp_path):
    cfg = tiny_cfg("steps=3")
    t = Trainer(cfg, tmp_path / "run", progress=False)

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    t.evaluate = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"  # saved before evaluating
    res = train(cfg, tmp_path / "run", resume=True, progress=False)  # only evaluates
    assert res.step == 3 and res.accuracy is not None
    recs = read_metrics(tmp_path / "run")
    assert sorted(r["step"] for r in recs if "loss" in r) == [1, 2, 3]
    assert [r["step"] for r in recs if "accuracy" in r] == [3]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_the_final_save_waits_for_it(tmp_path, monkeypatch, signum):
    # The final checkpoint and evaluation run under the same signal handling as the loop: a signal that
    # arrives while the last checkpoint is written lets it (and the evaluation) finish; nothing is lost.
    cfg = tiny_cfg("steps=3", "log_every=10")  # no logging step: the loop's own stop check finds nothing
    t = Trainer(cfg, tmp_path / "run", progress=False)
    save = t.save

    def save_then_signal():
        if t.step == t.total_steps:
            os.kill(os.getpid(), signum)  # delivered at once, in the middle of the final save
        return save()

    monkeypatch.setattr(t, "save", save_then_signal)
    res = t.fit()
    assert res.step == 3 and res.accuracy is not None
    assert latest_checkpoint(tmp_path / "run").name == "step_00000003"
    assert not list((tmp_path / "run" / "checkpoints").glob(".step_*"))


def test_a_save_removes_partial_checkpoints_of_a_killed_process(tmp_path):
    from vmoe.train.checkpoint import save_checkpoint

    stale = tmp_path / "checkpoints" / ".step_00000002.abcd1234"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, model_config={})
    assert not stale.exists() and (tmp_path / "checkpoints" / "step_00000003" / "COMPLETE").exists()


def test_resuming_a_finished_run_reports_its_loss_and_one_final_record(tmp_path):
    cfg = tiny_cfg("steps=3")
    first = train(cfg, tmp_path / "run", progress=False)
    again = train(cfg, tmp_path / "run", resume=True, progress=False)  # nothing left to train
    assert again.step == 3 and again.final_loss == first.final_loss and not math.isnan(again.final_loss)
    assert again.accuracy == first.accuracy
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "accuracy" in r] == [3]


def test_a_bpr_run_saved_by_the_previous_version_resumes(tmp_path):
    # The previous version trained with BPR but saved batch_priority false: a routing choice, not the
    # weights, so resuming it is allowed (and the run continues with BPR, as configured).
    cfg = tiny_cfg("steps=2", "batch_priority=true")
    train(cfg, tmp_path / "run", progress=False)
    mc = latest_checkpoint(tmp_path / "run") / "model_config.json"
    saved = json.loads(mc.read_text())
    saved["moe"]["router"]["batch_priority"] = False
    mc.write_text(json.dumps(saved))
    res = train(apply_overrides(cfg, ["steps=3"]), tmp_path / "run", resume=True, progress=False)
    assert res.step == 3
    assert json.loads((res.checkpoint / "model_config.json").read_text())["moe"]["router"]["batch_priority"]


def test_model_none_values_follow_the_field_types():
    # model.KEY=none is None where that field may be None (dropless), and stays text elsewhere.
    cfg = apply_overrides(get_recipe("tiny"), ["model.capacity_factor=none", "model.moe_layers=none"])
    assert cfg.model_overrides["capacity_factor"] is None and cfg.model_overrides["moe_layers"] == "none"


def test_batch_priority_training_is_saved_in_the_model_config(tmp_path):
    # BPR in training is part of the model the checkpoint describes: vmoe.load routes as trained, so
    # evaluating the checkpoint gives the run's own final accuracy.
    from vmoe.data import load_dataset
    from vmoe.eval.evaluate import evaluate

    cfg = tiny_cfg("steps=3", "batch_priority=true", "model.capacity_factor=0.5", "model.num_selected=1")
    res = train(cfg, tmp_path / "run", progress=False)
    model = vmoe.load(tmp_path / "run")
    assert all(layer.cfg.router.batch_priority for _, layer in model.moe_layers())
    saved = json.loads((res.checkpoint / "model_config.json").read_text())
    assert saved["moe"]["router"]["batch_priority"] is True
    _, test, info = load_dataset(
        cfg.data, image_size=cfg.image_size, max_train=cfg.max_train, max_test=cfg.max_test, progress=False
    )
    ev = evaluate(model, test, info, batch_size=cfg.eval_batch_size)
    assert ev["accuracy"] == pytest.approx(res.accuracy, abs=1e-9)


def test_fresh_start_does_not_keep_records_of_an_attempt_without_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    train(tiny_cfg("steps=2"), run, resume=True, progress=False)  # no checkpoint: starts fresh
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2]
    assert all(r.get("loss") != 9.0 for r in read_metrics(run))


def _tensorboard_scalars(run: Path, tag: str) -> dict[int, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    out: dict[int, list[float]] = {}
    for ev in acc.Scalars(tag):
        out.setdefault(ev.step, []).append(ev.value)
    return out


def test_tensorboard_events_follow_metrics_across_a_crash_and_resume(tmp_path):
    # With tensorboard installed, the run writes the numbers of metrics.jsonl as scalars. A crash after the
    # last checkpoint (here: the later checkpoints removed) replays steps on resume; TensorBoard then shows
    # each step once, as metrics.jsonl does (without purging, steps 4-7 and the final evaluation twice).
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (in the dev extra)")
    import shutil

    run = tmp_path / "run"
    cfg = tiny_cfg("steps=7", "checkpoint_every=3", "keep_checkpoints=5")
    train(cfg, run, progress=False)
    assert sorted(_tensorboard_scalars(run, "loss")) == list(range(1, 8))
    for step in (6, 7):  # as if the process died right after step 7's records, before any later save
        shutil.rmtree(run / "checkpoints" / f"step_{step:08d}")
    train(cfg, run, resume=True, progress=False)
    tb, jl = _tensorboard_scalars(run, "loss"), step_losses(run)
    assert sorted(tb) == sorted(jl) == list(range(1, 8))
    for step, values in tb.items():
        assert len(values) == 1, (step, values)  # the lost attempt's events are purged
        assert values[0] == pytest.approx(jl[step], rel=1e-6)
    assert {s: len(v) for s, v in _tensorboard_scalars(run, "accuracy").items()} == {7: 1}
    # Resuming the finished run evaluates once more: still one final evaluation in both.
    train(cfg, run, resume=True, progress=False)
    assert {s: len(v) for s, v in _tensorboard_scalars(run, "accuracy").items()} == {7: 1}
    assert sum("accuracy" in r for r in read_metrics(run)) == 1


def test_run_length_is_steps_or_epochs():
    tiny = get_recipe("tiny")
    assert tiny.steps is not None
    cfg = apply_overrides(tiny, ["epochs=3"])  # a recipe counting steps, asked for epochs
    assert cfg.steps is None and cfg.epochs == 3
    cfg = apply_overrides(get_recipe("default"), ["steps=7"])
    assert cfg.steps == 7 and cfg.epochs is None
    with pytest.raises(ValueError, match="epochs must be > 0"):
        apply_overrides(tiny, ["epochs=0"])
    with pytest.raises(ValueError, match="steps=none needs epochs="):
        apply_overrides(tiny, ["steps=none"])
    with pytest.raises(ValueError, match="epochs must be > 0 when steps is not set, got None"):
        apply_overrides(tiny, ["steps=none", "epochs=none"])
    both = apply_overrides(tiny, ["steps=4", "epochs=2"])  # both given: steps wins, as documented
    assert both.steps == 4 and both.epochs == 2


def test_model_overrides_that_conflict_with_the_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"model\.num_classes=100 conflicts with the data"):
        Trainer(tiny_cfg("model.num_classes=100"), tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match=r"model\.image_size=32 conflicts.*set image_size="):
        Trainer(tiny_cfg("model.image_size=32"), tmp_path / "b", progress=False)
    size = Trainer(tiny_cfg(), tmp_path / "c", progress=False).model.cfg.image_hw[0]
    Trainer(tiny_cfg(f"model.image_size={size}"), tmp_path / "d", progress=False)  # agreeing is fine


def _interrupt_at(trainer: Trainer, step: int) -> None:
    orig = trainer.train_step

    def wrapped(*a, **kw):
        out = orig(*a, **kw)
        if a[3] + 1 == step:  # the step just completed
            signal.raise_signal(signal.SIGTERM)
        return out

    trainer.train_step = wrapped  # type: ignore[method-assign]


@pytest.mark.parametrize("stop", [1, 4])
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, stop):
    cfg = tiny_cfg("steps=7", "model.dropout=0.1", "mixup=0.2", "checkpoint_every=3")
    train(cfg, tmp_path / "a", progress=False)
    t = Trainer(cfg, tmp_path / "b", progress=False)
    _interrupt_at(t, stop)
    with pytest.raises(TrainingInterrupted) as ei:
        t.fit()
    assert ei.value.step == stop
    assert latest_checkpoint(tmp_path / "b").name == f"step_{stop:08d}"
    train(cfg, tmp_path / "b", resume=True, progress=False)
    a, b = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 8))  # appended, no duplicates
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), s
    sa = load_checkpoint(tmp_path / "a")["state_dict"]
    sb = load_checkpoint(tmp_path / "b")["state_dict"]
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)


def test_sigterm_subprocess_resume(tmp_path, wait_for_metrics):
    """The real signal path: a separate process gets SIGTERM mid-run, checkpoints, exits, resumes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [
        sys.executable,
        "-m",
        "vmoe",
        "train",
        "--recipe",
        "tiny",
        "--steps",
        "40",
        "--log-every",
        "1",
        "--no-progress",
        "--out",
    ]
    ref = subprocess.run([*args, str(tmp_path / "ref")], capture_output=True, text=True, env=env, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*args, str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    wait_for_metrics(run, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"resume with `vmoe train --out {run} --resume`" in err
    stopped = int(latest_checkpoint(run).name.split("_")[1])
    assert 1 <= stopped <= 40
    res = subprocess.run([*args, str(run), "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    a, b = step_losses(tmp_path / "ref"), step_losses(run)
    assert sorted(b) == sorted(a)
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-7), s


def test_grad_accumulation_matches_full_batch(tmp_path):
    a = train(tiny_cfg("steps=3", "model.group_size=4"), tmp_path / "a", progress=False)
    b = train(tiny_cfg("steps=3", "model.group_size=4", "grad_accum=2"), tmp_path / "b", progress=False)
    la, lb = step_losses(tmp_path / "a"), step_losses(tmp_path / "b")
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-4), s
    assert a.step == b.step == 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_cfg("steps=10", "max_test=50", "eval_batch_size=32"), out, progress=False)
    return out


def test_eval_json_partial_batch(trained, tmp_path, capsys):
    js = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(trained), "--json", str(js), "--batch-size", "32"]) == 0
    res = json.loads(js.read_text())
    assert res["num_images"] == 50  # 32 + a partial batch of 18
    assert 0 <= res["accuracy"] <= 1 and res["loss"] > 0 and res["gflops_per_image"] > 0
    # The training run's own test images (synthetic data draws them after its max_train images).
    final = [r for r in read_metrics(trained) if "eval_loss" in r][-1]
    assert res["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert res["accuracy"] == pytest.approx(final["accuracy"])
    assert main(["eval", "--checkpoint", str(trained), "--max-images", "0"]) == 2
    assert "--max-images must be >= 1, got 0" in capsys.readouterr().err
    # the same result with another batch size (all images counted once)
    js2 = tmp_path / "eval2.json"
    main(
        [
            "eval",
            "--checkpoint",
            str(trained / "checkpoints" / "step_00000010"),
            "--json",
            str(js2),
            "--batch-size",
            "16",
        ]
    )
    assert json.loads(js2.read_text())["num_images"] == 50


def test_eval_sweep_json_and_plot(trained, tmp_path):
    js = tmp_path / "sweep.json"
    rc = main(
        [
            "eval",
            "--checkpoint",
            str(trained),
            "--sweep",
            "--capacities",
            "0.25",
            "1.0",
            "--json",
            str(js),
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = json.loads(js.read_text())["results"]
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert {"capacity_factor", "num_selected", "batch_priority", "accuracy", "gflops_per_image"} <= set(r)
    # less capacity -> fewer processed assignments -> less compute
    for k in (1, 2):
        for b in (False, True):
            lo = next(
                r
                for r in rows
                if r["num_selected"] == k and r["batch_priority"] == b and r["capacity_factor"] == 0.25
            )
            hi = next(
                r
                for r in rows
                if r["num_selected"] == k and r["batch_priority"] == b and r["capacity_factor"] == 1.0
            )
            assert lo["gflops_per_image"] < hi["gflops_per_image"]
            assert lo["dropped_fraction"] > hi["dropped_fraction"]
    png = js.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_files(trained, tmp_path):
    out = tmp_path / "an"
    out.mkdir()
    (out / "expert_class_layer99.png").write_bytes(b"from an earlier analysis of a deeper model")
    assert main(["analyze", "--checkpoint", str(trained), "--out", str(out), "--num-samples", "3"]) == 0
    for f in ("routing_examples.png", "expert_load.png", "analysis.md", "analysis.json"):
        assert (out / f).exists(), f
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["layers"]
    for layer in summary["layers"].values():
        assert abs(sum(layer["expert_load"]) - 1.0) < 1e-3
    heatmaps = {p.name for p in out.glob("expert_class_layer*.png")}
    assert heatmaps == {f"expert_class_layer{i}.png" for i in summary["layers"]}  # the stale one is gone


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--model", "vmoe_nope", "--out", "{tmp}/x", "--steps", "1"], "unknown model"),
        (["train", "--recipe", "nope", "--out", "{tmp}/x"], "unknown recipe"),
        (["train", "--out", "{tmp}/x", "--set", "bogus_key=1"], "unknown config key"),
        (["train", "--out", "{tmp}/x", "--set", "batch_size=many"], "expects an integer"),
        (["train", "--out", "{tmp}/x", "--set", "compile=maybe"], "boolean"),
        (["train", "--out", "{tmp}/x", "--set", "max_test=0"], "max_test must be a positive integer, got 0"),
        (["train", "--out", "{tmp}/x", "--data", "{tmp}/missing.npz"], "no such file"),
        (["train", "--out", "{tmp}/x", "--steps", "abc"], "invalid int value"),
        (["eval", "--checkpoint", "{tmp}/nothing"], "no such checkpoint"),
        (["analyze", "--checkpoint", "{tmp}"], "no complete checkpoint"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_cli_errors_one_line_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as ei:
        raise SystemExit(main(argv))
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(latest_checkpoint(trained), bad)
    (bad / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        vmoe.load(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises((CheckpointError, FileNotFoundError)):
        vmoe.load(bad)


def test_npz_data_trains(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, size=(80, 12, 12), dtype=np.uint8)
    y = np.arange(80) % 4
    np.savez(tmp_path / "d.npz", x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    cfg = tiny_cfg(f"data={tmp_path / 'd.npz'}", "steps=2", "image_size=null", "model.patch_size=4")
    res = train(cfg, tmp_path / "run", progress=False)
    model = vmoe.load(tmp_path / "run")
    assert model.cfg.in_chans == 1 and model.cfg.num_classes == 4
    assert res.step == 2


def test_cli_dense_model_drops_recipe_moe_settings(tmp_path):
    out = tmp_path / "dense"
    assert (
        main(
            [
                "train",
                "--model",
                "vit_ti",
                "--recipe",
                "tiny",
                "--steps",
                "1",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    model = vmoe.load(out)
    assert model.moe_layers() == []
    assert model.cfg.hidden_size == 32  # the recipe's size overrides are kept


def test_torch_compile_training_matches_eager(tmp_path):
    """--compile trains the same model (positional noise/dropout stay outside the compiled graphs)."""
    train(tiny_cfg("steps=3", "model.dropout=0.1"), tmp_path / "eager", progress=False)
    train(tiny_cfg("steps=3", "model.dropout=0.1", "compile=true"), tmp_path / "compiled", progress=False)
    a, b = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-5), s


def test_adamw_is_fused_and_steps_like_the_default():
    # vmoe train's AdamW runs torch's fused kernel on the CPU (much faster for MoE models' many
    # expert parameters) and makes the same update as the default implementation, weight-decay
    # groups included.
    import torch

    from vmoe.train.loop import adamw, param_groups

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.99))
    fast = adamw(param_groups(model, 0.1), **kw)
    ref = torch.optim.AdamW(param_groups(twin, 0.1), **kw)
    assert all(g["fused"] for g in fast.param_groups) and not any(g["fused"] for g in ref.param_groups)
    x = torch.randn(8, 6)
    for _ in range(3):
        for m, opt in ((model, fast), (twin, ref)):
            opt.zero_grad()
            m(x).square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[0].weight, torch.nn.Linear(6, 5).weight)  # it did train


def test_resume_keeps_the_running_optimizer_implementation():
    # A state saved by a non-fused AdamW (e.g. an older vmoe) loads into the fused one without turning
    # it off; the saved hyperparameters (lr) and moments are taken; and the reverse direction too.
    import torch

    from vmoe.train.loop import adamw, with_implementation_of

    p = torch.nn.Parameter(torch.randn(4, 3))
    plain = torch.optim.AdamW([p], lr=0.5)
    p.grad = torch.randn(4, 3)
    plain.step()
    saved = plain.state_dict()
    assert saved["param_groups"][0]["fused"] in (None, False)
    q = torch.nn.Parameter(p.detach().clone())
    fused = adamw([{"params": [q]}], lr=1.0)
    fused.load_state_dict(with_implementation_of(fused, saved))
    assert fused.param_groups[0]["fused"] is True and fused.param_groups[0]["lr"] == 0.5
    torch.testing.assert_close(fused.state[q]["exp_avg"], plain.state[p]["exp_avg"])
    q.grad = p.grad.clone()
    fused.step()
    plain.step()
    torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    back = torch.optim.AdamW([p], lr=1.0)
    back.load_state_dict(with_implementation_of(back, fused.state_dict()))
    assert not back.param_groups[0]["fused"]
