"""experiments/cifar10.py end to end at the smoke scale (synthetic data, a few steps; ~25 s on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "cifar10.py"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} not present")
    out = tmp_path_factory.mktemp("cifar10_smoke")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--scale",
            "smoke",
            "--out",
            str(out / "run"),
            "--threads",
            "2",
            "--publish",
            str(out / "docs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_results_json_has_every_section(smoke_run: Path) -> None:
    r = json.loads((smoke_run / "run" / "results.json").read_text())
    for key in (
        "meta",
        "setup",
        "runs",
        "summary",
        "sweep",
        "per_image",
        "ablation",
        "throughput_timm",
        "figures",
    ):
        assert key in r, key
    meta = r["meta"]
    assert meta["status"] == "complete"
    assert meta["machine"]["torch"] and meta["wall_s"] > 0 and "--scale smoke" in meta["command"]
    kinds = {run["kind"] for run in r["runs"]}
    assert kinds == {"vit", "vmoe_k2", "vmoe_k1", "vmoe_k2_noaux"}
    for run in r["runs"]:
        assert 0.0 <= run["accuracy"] <= 1.0
        assert run["gflops_per_image"] > 0 and run["params"]["total"] > 0
        assert run["train_images_per_s"] is None or run["train_images_per_s"] > 0
    s = r["summary"]
    # dense has no experts; k=2 costs more than k=1 at the same capacity factor; k=1 about the dense cost
    assert s["vit"]["params"]["experts"] == 0 < s["vmoe_k2"]["params"]["experts"]
    assert s["vmoe_k2"]["gflops_per_image"] > s["vmoe_k1"]["gflops_per_image"] >= s["vit"]["gflops_per_image"]
    # the sweep grid: 8 capacities x k in {1, 2} x {vanilla, BPR}
    rows = r["sweep"]["mean"]
    assert len(rows) == 32
    assert {(x["num_selected"], x["batch_priority"]) for x in rows} == {
        (1, False),
        (1, True),
        (2, False),
        (2, True),
    }
    for k in (1, 2):  # realised compute grows with C
        g = [
            x["gflops_per_image"]
            for x in sorted(rows, key=lambda x: x["capacity_factor"])
            if x["num_selected"] == k and x["batch_priority"]
        ]
        assert g == sorted(g)
    pi = r["per_image"]
    assert pi["capacity_factor"] == 0.5 and pi["batch_priority"] is True
    g = pi["gflops_per_image"]
    assert g["min"] <= g["median"] <= g["max"] <= g["all_assignments_kept"] + 1e-12
    ab = r["ablation"]
    for key in ("with_aux", "without_aux"):
        for layer in ab[key]["routing"].values():
            assert abs(sum(layer["expert_load"]) - 1.0) < 1e-3
            assert 0.0 <= layer["dropped_fraction"] <= 1.0
    assert "skipped" in r["throughput_timm"]


def test_figures_and_markdown(smoke_run: Path) -> None:
    r = json.loads((smoke_run / "run" / "results.json").read_text())
    expected = {
        "accuracy.png",
        "sweep.png",
        "ablation_load.png",
        "train_loss.png",
        *r["per_image"]["figures"],
    }
    assert expected <= set(r["figures"])
    for f in r["figures"]:
        p = smoke_run / "run" / f
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
        assert p.stat().st_size < 300_000, f
        assert (smoke_run / "docs" / "figures" / f"cifar10_smoke_{f}").is_file()
    md = (smoke_run / "run" / "results.md").read_text()
    for needle in ("Dense vs V-MoE", "capacity sweep", "Per-image compute", "ablation", "Command:"):
        assert needle in md
    docs_md = (smoke_run / "run" / "results_docs.md").read_text()
    assert "figures/cifar10_smoke_sweep.png" in docs_md
