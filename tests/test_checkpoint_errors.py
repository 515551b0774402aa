"""Checkpoints that do not fit their model, and evaluation arguments: clear errors, not tracebacks."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

import vmoe
from vmoe.cli import main
from vmoe.data import make_synthetic
from vmoe.eval.evaluate import evaluate, sweep
from vmoe.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    load_optimizer_state,
    save_checkpoint,
)
from vmoe.train.config import apply_overrides
from vmoe.train.loop import param_groups, train
from vmoe.train.recipes import get_recipe

TINY = dict(
    num_layers=2,
    hidden_size=32,
    mlp_dim=64,
    num_heads=2,
    patch_size=4,
    num_experts=4,
    num_selected=2,
    group_size=4,
    image_size=8,
    in_chans=3,
    num_classes=3,
)


def tiny_model(**overrides):
    torch.manual_seed(0)
    return vmoe.create_model("vmoe_ti", **{**TINY, **overrides})


def optimizer_state(model) -> dict:
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    logits, _ = model(torch.randn(2, 3, 8, 8))
    logits.sum().backward()
    opt.step()
    return opt.state_dict()


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


# ------------------------------------------------------------------------------------- weights


def test_weights_of_the_wrong_shape_are_a_checkpoint_error(tmp_path, capsys):
    model = tiny_model()
    cfg = model.cfg.to_dict()
    cfg["num_classes"] = 5  # the config no longer fits the 3-class head in model.safetensors
    ckpt = save_checkpoint(tmp_path / "run", 1, model.state_dict(), model_config=cfg)
    file = ckpt / "model.safetensors"
    with pytest.raises(CheckpointError) as ei:
        vmoe.load(ckpt)
    msg = str(ei.value)
    assert msg.startswith(f"{file}: weights do not fit the model config"), msg
    assert "head.weight expected (5, 32), found (3, 32)" in msg
    assert "head.bias expected (5,), found (3,)" in msg
    # the CLI turns it into one line and exit code 2
    rc, err = run_cli(["eval", "--checkpoint", ckpt, "--data", "synthetic", "--no-progress"], capsys)
    assert rc == 2 and err.startswith("vmoe: error: ") and str(file) in err and "head.weight" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_many_mismatches_are_summarised(tmp_path):
    model = tiny_model()
    cfg = model.cfg.to_dict()
    cfg["hidden_size"] = 48
    ckpt = save_checkpoint(tmp_path / "run", 1, model.state_dict(), model_config=cfg)
    with pytest.raises(CheckpointError, match=r"shape mismatch: .*expected .*, found .*\(and \d+ more\)"):
        vmoe.load(ckpt)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    model = tiny_model()
    sd = model.state_dict()
    sd["extra.weight"] = sd.pop("head.weight")
    ckpt = save_checkpoint(tmp_path / "run", 1, sd, model_config=model.cfg.to_dict())
    with pytest.raises(CheckpointError, match=r"missing \['head\.weight'\].*unexpected \['extra\.weight'\]"):
        vmoe.load(ckpt)
    fresh = tiny_model()
    with pytest.raises(CheckpointError, match=re.escape("somewhere.safetensors: weights do not fit")):
        load_model_weights(fresh, sd, Path("somewhere.safetensors"))


def test_fitting_weights_still_load(tmp_path):
    model = tiny_model()
    ckpt = save_checkpoint(
        tmp_path / "run",
        1,
        model.state_dict(),
        model_config=model.cfg.to_dict(),
        train_state={"optimizer": optimizer_state(model), "step": 1},
    )
    loaded = vmoe.load(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ck = load_checkpoint(ckpt)
    opt = torch.optim.AdamW(param_groups(loaded, 0.1), lr=1e-3)
    load_optimizer_state(opt, ck["train_state"]["optimizer"], ckpt / "train_state.pt")


# ---------------------------------------------------------------------------------- train state


def test_optimizer_state_from_another_model_names_the_file(tmp_path):
    model, path = tiny_model(), tmp_path / "train_state.pt"
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    other = optimizer_state(tiny_model(num_layers=3))  # more parameters per group
    with pytest.raises(CheckpointError) as ei:
        load_optimizer_state(opt, other, path)
    assert str(ei.value).startswith(f"{path}: optimizer state does not fit the model"), str(ei.value)
    load_optimizer_state(opt, optimizer_state(model), path)  # a fitting one loads
    assert len(opt.state) > 0


def test_optimizer_state_of_other_shapes_names_the_parameter(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    other = optimizer_state(tiny_model(mlp_dim=48))  # same parameter counts, other shapes: torch accepts it
    with pytest.raises(
        CheckpointError, match=r"train_state\.pt: .*exp_avg of parameter \d+ expected \(.*\), found \("
    ):
        load_optimizer_state(opt, other, tmp_path / "train_state.pt")


def test_cli_resume_with_swapped_train_state_is_one_line(tmp_path, capsys):
    tiny = get_recipe("tiny")
    train(apply_overrides(tiny, ["steps=2"]), tmp_path / "a", progress=False)
    train(apply_overrides(tiny, ["steps=2", "model.num_layers=3"]), tmp_path / "b", progress=False)
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    shutil.copy(b / "train_state.pt", a / "train_state.pt")
    (a / "SHA256SUMS").unlink()  # as a checkpoint written before checksums (else: checksum mismatch)
    capsys.readouterr()
    argv = ["train", "--recipe", "tiny", "--out", tmp_path / "a", "--resume", "--set", "steps=3"]
    rc, err = run_cli([*argv, "--no-progress"], capsys)
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith("vmoe: error:")]
    assert errors == [err.splitlines()[-1]] and "Traceback" not in err, err  # one line, no traceback
    assert errors[0].startswith(f"vmoe: error: {a / 'train_state.pt'}: optimizer state does not fit"), err


def test_damaged_or_replaced_files_fail_their_checksum(tmp_path, capsys):
    # One flipped byte inside the weights' data (the safetensors header stays valid, so the file would
    # load with a wrong value), or a train_state.pt copied in from another run: errors naming the file.
    tiny = get_recipe("tiny")
    train(apply_overrides(tiny, ["steps=2"]), tmp_path / "a", progress=False)
    ckpt = latest_checkpoint(tmp_path / "a")
    assert load_checkpoint(ckpt)["step"] == 2  # intact: loads
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: checksum mismatch")):
        load_checkpoint(ckpt)
    rc, err = run_cli(["eval", "--checkpoint", tmp_path / "a"], capsys)
    assert rc == 2 and err.splitlines()[-1].startswith(f"vmoe: error: {weights}: checksum mismatch"), err
    data[-5] ^= 0x01
    weights.write_bytes(bytes(data))
    state = ckpt / "train_state.pt"
    torch.save({"step": 2, "optimizer": {}}, state)
    with pytest.raises(CheckpointError, match=re.escape(f"{state}: checksum mismatch")):
        load_checkpoint(ckpt)
    # Evaluation reads the weights only: the training state is neither read nor checked.
    assert load_checkpoint(ckpt, train_state=False)["train_state"] is None
    assert vmoe.load(tmp_path / "a").training is False
    (ckpt / "SHA256SUMS").unlink()  # checkpoints written before checksums still load
    assert load_checkpoint(ckpt)["train_state"]["step"] == 2


# ------------------------------------------------------------------------------------ evaluate


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, "8"])
def test_evaluate_rejects_a_non_positive_batch_size(bad):
    _, test_set, info = make_synthetic(16, 8, 8, 3, 3, seed=0)
    model = tiny_model()
    for fn in (evaluate, sweep):
        with pytest.raises(ValueError, match=re.escape(f"batch_size must be an integer >= 1, got {bad!r}")):
            fn(model, test_set, info, batch_size=bad)
    res = evaluate(model, test_set, info, batch_size=3)
    assert res["num_images"] == 8 and 0.0 <= res["accuracy"] <= 1.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_evaluate_and_analyze_reject_a_bad_image_count(bad, tmp_path):
    from vmoe.eval.analyze import analyze

    _, test_set, info = make_synthetic(16, 8, 8, 3, 3, seed=0)
    model = tiny_model()
    with pytest.raises(
        ValueError, match=re.escape(f"max_images must be an integer >= 1 (or None: all), got {bad!r}")
    ):
        evaluate(model, test_set, info, max_images=bad)
    with pytest.raises(ValueError, match=re.escape(f"max_images must be an integer >= 1, got {bad!r}")):
        analyze(model, test_set, info, tmp_path, max_images=bad)
    assert evaluate(model, test_set, info, max_images=5)["num_images"] == 5
