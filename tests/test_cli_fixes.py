"""The command line: repeated --set, eval/analyze argument checks, class names, paths, the demo report."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vmoe import cli
from vmoe.cli import main
from vmoe.train.checkpoint import latest_checkpoint

COLOURS = {"cls0": (255, 0, 0), "cls1": (0, 255, 0), "cls2": (0, 0, 255), "cls9": (255, 255, 0)}


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("vmoe: error: "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


def image_folder(root: Path, classes: list[str], per_class: int = 5) -> Path:
    """``root/<class>/*.png``: solid 8x8 images of each class's colour (with a little noise)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(np.array(COLOURS[c]) + rng.integers(-20, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> Path:
    """A 1-step tiny run on an image folder of 3 classes, given as a path relative to the cwd."""
    base = tmp_path_factory.mktemp("folder_run")
    image_folder(base / "imgs", ["cls0", "cls1", "cls2"])
    cwd = os.getcwd()
    os.chdir(base)
    try:
        rc = main(
            [
                *("train", "--recipe", "tiny", "--data", "imgs", "--out", str(base / "run")),
                *("--set", "steps=1", "batch_size=4", "--no-progress"),
            ]
        )
    finally:
        os.chdir(cwd)
    assert rc == 0
    return base / "run"


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory) -> Path:
    """A 1-step tiny run on the built-in synthetic data."""
    out = tmp_path_factory.mktemp("synthetic_run") / "run"
    assert main(["train", "--recipe", "tiny", "--out", str(out), "--set", "steps=1", "--no-progress"]) == 0
    return out


# ----------------------------------------------------------------------------- 1. repeated --set


def test_repeated_set_accumulates(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = run_cli(
        ["train", "--recipe", "tiny", "--out", out, "--set", "steps=1", "--set", "lr=0.01", "--no-progress"],
        capsys,
    )
    assert rc == 0, err
    saved = json.loads((out / "config.json").read_text())["train"]
    assert saved["steps"] == 1 and saved["lr"] == 0.01
    assert latest_checkpoint(out).name == "step_00000001"
    demo = cli.build_parser().parse_args(["demo", "--set", "steps=1", "--set", "lr=0.01", "max_test=8"])
    assert demo.set == ["steps=1", "lr=0.01", "max_test=8"]


# ----------------------------------------------------------------------------- 2. --capacities / --plot


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--capacities", "-5"], "--capacities only applies with --sweep"),
        (["--capacities", "0.5", "1.0"], "--capacities only applies with --sweep"),
        (["--plot", "{tmp}/p.png"], "--plot only applies with --sweep"),
        (["--sweep", "--capacities", "-5"], "--capacities must be numbers > 0"),
    ],
)
def test_eval_sweep_options_need_sweep(synthetic_run, tmp_path, capsys, extra, needle):
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    rc, err = run_cli(["eval", "--checkpoint", synthetic_run, "--no-progress", *extra], capsys)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "p.png").exists()


def test_eval_sweep_with_capacities_still_works(synthetic_run, tmp_path, capsys):
    js = tmp_path / "s.json"
    plot = tmp_path / "p.png"
    argv = ["eval", "--checkpoint", synthetic_run, "--sweep", "--capacities", "0.5", "1.0"]
    rc, err = run_cli([*argv, "--plot", plot, "--json", js, "--no-progress"], capsys)
    assert rc == 0, err
    rows = json.loads(js.read_text())["results"]
    assert sorted({r["capacity_factor"] for r in rows}) == [0.5, 1.0]
    assert plot.exists()


# ----------------------------------------------------------------------------- 3. classes by name


def test_eval_folder_missing_a_class_maps_labels_by_name(folder_run, tmp_path, capsys):
    data = image_folder(tmp_path / "two", ["cls1", "cls2"])
    _, test, info, _, _ = cli._load_for_eval(str(folder_run), str(data), "cpu", progress=False)
    assert info.classes == ["cls0", "cls1", "cls2"] and info.num_classes == 3
    assert set(test.labels.tolist()) == {1, 2}  # not {0, 1}: cls1 is the model's output 1
    for img, label in zip(test.images, test.labels):  # each image keeps its own class's label
        colour = tuple(int(v) for v in img.reshape(-1, 3).mean(0).round(-1))
        expected = max(COLOURS, key=lambda c: -sum(abs(a - b) for a, b in zip(COLOURS[c], colour)))
        assert info.classes[label] == expected
    rc, err = run_cli(["eval", "--checkpoint", folder_run, "--data", data, "--no-progress"], capsys)
    assert rc == 0, err


def test_eval_folder_with_unknown_class_is_refused(folder_run, tmp_path, capsys):
    data = image_folder(tmp_path / "other", ["cls1", "cls9"])
    rc, err = run_cli(["eval", "--checkpoint", folder_run, "--data", data, "--no-progress"], capsys)
    assert_one_line_error(rc, err, "not trained on", "cls9")
    assert "cls1," not in err.split("not trained on")[1].split("(")[0]


# ----------------------------------------------------------------------------- 4. --model


def test_other_model_drops_recipe_architecture(tmp_path, capsys):
    def config(*argv):
        args = cli.build_parser().parse_args(["train", "--recipe", "tiny", "--out", str(tmp_path), *argv])
        return cli._train_config(args)

    cfg = config("--model", "vit_b16")
    err = capsys.readouterr().err
    assert cfg.model == "vit_b16"
    for key in ("num_layers", "hidden_size", "mlp_dim", "num_heads", "patch_size", "num_experts"):
        assert key not in cfg.model_overrides, key
        assert key in err, (key, err)
    cfg = config("--model", "vit_b16", "--set", "model.num_layers=2", "--patch-size", "8")
    assert cfg.model_overrides == {"num_layers": 2, "patch_size": 8}
    # The dense counterpart of the recipe's model keeps the recipe's sizes, not its MoE settings.
    cfg = config("--model", "vit_ti")
    assert cfg.model_overrides == {
        "num_layers": 2,
        "hidden_size": 32,
        "mlp_dim": 64,
        "num_heads": 2,
        "patch_size": 4,
    }


# ----------------------------------------------------------------------------- 5. one-line errors


def test_bad_device_is_a_one_line_error(synthetic_run, tmp_path, capsys):
    rc, err = run_cli(["train", "--recipe", "tiny", "--out", tmp_path / "r", "--set", "device=foo"], capsys)
    assert_one_line_error(rc, err, "unknown device 'foo'")
    assert not (tmp_path / "r").exists()
    rc, err = run_cli(["eval", "--checkpoint", synthetic_run, "--device", "foo", "--no-progress"], capsys)
    assert_one_line_error(rc, err, "unknown device 'foo'")
    rc, err = run_cli(["analyze", "--checkpoint", synthetic_run, "--device", "cuda:x"], capsys)
    assert_one_line_error(rc, err, "unknown device 'cuda:x'")


def test_out_that_is_a_file_is_a_one_line_error(synthetic_run, tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = run_cli(["train", "--recipe", "tiny", "--out", f, "--set", "steps=1", "--no-progress"], capsys)
    assert_one_line_error(rc, err, str(f), "not a directory")
    rc, err = run_cli(["analyze", "--checkpoint", synthetic_run, "--out", f], capsys)
    assert_one_line_error(rc, err, str(f), "not a directory")
    rc, err = run_cli(["demo", "--out", f, "--no-progress"], capsys)
    assert_one_line_error(rc, err, str(f), "not a directory")
    assert f.read_text() == "x"


@pytest.mark.parametrize("n", ["0", "-1"])
def test_analyze_num_samples_must_be_positive(synthetic_run, tmp_path, capsys, n):
    rc, err = run_cli(
        ["analyze", "--checkpoint", synthetic_run, "--out", tmp_path / "an", "--num-samples", n], capsys
    )
    assert_one_line_error(rc, err, f"--num-samples must be >= 1, got {n}")


@pytest.mark.parametrize("name", ["data_info.json", "train_config.json"])
@pytest.mark.parametrize("content", ["[1, 2]", '"text"', "3"])
def test_checkpoint_json_of_the_wrong_type(synthetic_run, tmp_path, capsys, name, content):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(synthetic_run), ckpt)
    (ckpt / name).write_text(content)
    rc, err = run_cli(["eval", "--checkpoint", ckpt, "--no-progress"], capsys)
    assert_one_line_error(rc, err, str(ckpt / name))


def test_data_info_without_statistics(synthetic_run, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(latest_checkpoint(synthetic_run), ckpt)
    info = json.loads((ckpt / "data_info.json").read_text())
    del info["mean"]
    (ckpt / "data_info.json").write_text(json.dumps(info))
    rc, err = run_cli(["eval", "--checkpoint", ckpt, "--no-progress"], capsys)
    assert_one_line_error(rc, err, str(ckpt / "data_info.json"), "mean")


# ----------------------------------------------------------------------------- 6. relative --data


def test_relative_data_is_stored_absolute(folder_run, tmp_path, monkeypatch, capsys):
    data = json.loads((folder_run / "config.json").read_text())["train"]["data"]
    assert data == str(folder_run.parent / "imgs")
    tc = json.loads((latest_checkpoint(folder_run) / "train_config.json").read_text())
    assert tc["data"] == data
    monkeypatch.chdir(tmp_path)  # elsewhere: the run still finds its data
    rc, err = run_cli(["eval", "--checkpoint", folder_run, "--no-progress"], capsys)
    assert rc == 0, err
    # Built-in names stay names.
    args = cli.build_parser().parse_args(["train", "--recipe", "tiny", "--out", "x", "--data", "synthetic"])
    assert cli._train_config(args).data == "synthetic"


def test_eval_with_relative_data_uses_the_training_statistics(folder_run, monkeypatch):
    monkeypatch.chdir(folder_run.parent)
    _, _, info, _, _ = cli._load_for_eval(str(folder_run), "imgs", "cpu", progress=False)
    trained = json.loads((latest_checkpoint(folder_run) / "data_info.json").read_text())
    assert list(info.mean) == trained["mean"]  # "imgs" is the run's own data, given relative


def test_resume_with_the_same_relative_data_keeps_the_image_size(tmp_path, monkeypatch, capsys):
    # The stored data path is absolute; the same relative --data on resume is the same data, so the
    # run's image size is kept (not reset to the data's native size, which resume would then refuse).
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (24, 8, 8, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "x.npz", x_train=x[:16], y_train=np.arange(16) % 2, x_test=x[16:], y_test=np.arange(8) % 2
    )
    monkeypatch.chdir(tmp_path)
    base = ["train", "--data", "x.npz", "--out", "run", "--no-progress"]
    rc, err = run_cli([*base, "--recipe", "tiny", "--image-size", "16", "--steps", "1"], capsys)
    assert rc == 0, err
    rc, err = run_cli([*base, "--resume", "--steps", "2"], capsys)  # the run's own settings
    assert rc == 0, err
    assert json.loads(Path("run/config.json").read_text())["train"]["image_size"] == 16


# ----------------------------------------------------------------------------- 8. demo report


def test_reproduce_command():
    from vmoe.report import reproduce_command

    assert reproduce_command("out dir", "tiny", ["steps=1", "model.x=a b"]) == (
        "vmoe demo --out 'out dir' --recipe tiny --set steps=1 'model.x=a b'"
    )
    assert reproduce_command("r") == "vmoe demo --out r --recipe default"


def test_demo_readme_reproduces_recipe_and_set(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--out", out, "--recipe", "tiny", "--set", "steps=1", "--set", "max_test=16"]
    rc, err = run_cli([*argv, "--no-progress"], capsys)
    assert rc == 0, err
    readme = (out / "README.md").read_text()
    assert f"Reproduce: `vmoe demo --out {out} --recipe tiny --set steps=1 max_test=16`" in readme


# ----------------------------------------------------------------------------- a user's walkthrough (2026-12-05)


def _two_checkpoint_run(root: Path) -> Path:
    out = root / "run"
    argv = ["train", "--recipe", "tiny", "--out", str(out), "--no-progress"]
    assert main([*argv, "--set", "steps=2", "checkpoint_every=1", "keep_checkpoints=3"]) == 0
    return out


def test_eval_names_its_checkpoint_and_a_skipped_incomplete_one(tmp_path, capsys):
    out = _two_checkpoint_run(tmp_path)
    capsys.readouterr()
    newest = latest_checkpoint(out)
    (newest / "COMPLETE").unlink()  # an interrupted save: eval falls back to the older checkpoint
    assert main(["eval", "--checkpoint", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    older = latest_checkpoint(out)
    assert older != newest and f"checkpoint {older} (step 1)" in captured.err
    assert captured.out.startswith("accuracy ")  # stdout keeps the results alone
    assert f"{newest.name} in {newest.parent} incomplete" in captured.err and older.name in captured.err


def test_resume_past_a_damaged_checkpoint_names_the_older_one(tmp_path, capsys):
    out = _two_checkpoint_run(tmp_path)
    newest = latest_checkpoint(out)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    rc, err = run_cli(["train", "--out", out, "--resume", "--set", "steps=3", "--no-progress"], capsys)
    assert_one_line_error(rc, err, "checksum mismatch", "older complete checkpoint exists (step_00000001)")


def test_unknown_key_lists_the_keys_and_a_non_npz_is_named(tmp_path, capsys):
    rc, err = run_cli(["train", "--out", tmp_path / "a", "--set", "bogus=1"], capsys)
    assert_one_line_error(rc, err, "unknown config key 'bogus'", "batch_size", "lr", "model.KEY=value")
    junk = tmp_path / "junk.npz"
    junk.write_text("not an archive\n")
    rc, err = run_cli(["train", "--out", tmp_path / "b", "--data", junk], capsys)
    assert_one_line_error(rc, err, f"{junk}: not a .npz archive")
    assert "pickle" not in err
    single = tmp_path / "single.npz"
    with open(single, "wb") as f:
        np.save(f, np.zeros(3))
    rc, err = run_cli(["train", "--out", tmp_path / "c", "--data", single], capsys)
    assert_one_line_error(rc, err, "a single .npy array, not a .npz archive")


def test_progress_bars_refresh_rarely_into_a_log_file(monkeypatch):
    # tqdm's carriage-return updates pile up on one line in a log: rare refreshes when stderr is no TTY.
    import io

    from vmoe._progress import LOG_REFRESH_S, bar_kwargs

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert bar_kwargs() == {"mininterval": LOG_REFRESH_S}

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    assert bar_kwargs() == {}
