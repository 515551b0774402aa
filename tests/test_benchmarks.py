"""The one-shot GPU script (benchmarks/gpu_check.sh) in its CPU dry-run mode: it must run end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("fused", [False, True], ids=["stock-ops", "fused-kernels-interpreted"])
def test_gpu_check_script_dry_run_on_cpu(tmp_path, fused):
    """The whole script end to end; with ``fused``, the fused Triton kernels run too (in Triton's
    interpreter), in every check and timed row, as they will on the GPU."""
    if fused and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install -e '.[dev]' installs it)")
    env = {**os.environ, "VMOE_CHECK_DEVICE": "cpu", "OUT": str(tmp_path), "PYTHON": sys.executable}
    if fused:
        env.update(TRITON_INTERPRET="1", VMOE_FUSED_INTERPRET="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    layer = json.loads((tmp_path / "moe_layer.json").read_text())
    assert set(layer["config"]["checks"]) == {
        "E8",
        "E8_bmm",
        "E8_loop",
        "E8_grouped_mm",
        "E8_bmm_ones",
        "E8_bmm_unfused",
    }
    assert all(c["max_rel_err"] <= 1e-2 for c in layer["config"]["checks"].values())
    names = {r["name"] for r in layer["results"]}
    assert {
        "floor",
        "vmoe",
        "vmoe_bmm",
        "vmoe_loop",
        "vmoe_grouped_mm",
        "vmoe_bmm_ones",
        "vmoe_bmm_unfused",
        "vmoe_loop_fwd",
        "vmoe_experts",
        "vmoe_routing",
        "vmoe_experts_fwd",
        "vmoe_routing_fwd",
    } <= names
    assert "breakdown E=8 fwd+bwd: experts" in (tmp_path / "moe_layer.txt").read_text()
    # Step 6: the goals table, from the files above; steps 1 and 2 keep their output too.
    summary = (tmp_path / "summary.md").read_text()
    assert "## GPU check summary: cpu" in summary and "### Where the layer's time goes" in summary
    assert proc.stdout.rstrip().splitlines()[-1].startswith("== done (status 0)")
    assert json.loads((tmp_path / "summary.json").read_text())["exactness"] is True
    assert "torch" in (tmp_path / "env.txt").read_text()
    # The -m gpu tests (skipped here), with pytest's summary line.
    assert "skipped" in (tmp_path / "gpu_tests.txt").read_text()
    assert "CUDA unit tests (`-m gpu`): " in summary and "skipped" in summary
    want = "on (Triton)" if fused else "off (stock ops: no CUDA or no Triton)"
    assert layer["config"]["fused_kernels"] == want
    train_rows = [r for r in layer["results"] if not r["name"].endswith("_fwd")]
    assert all(r["saved_mib"] > 0 for r in train_rows)  # activation memory per fwd+bwd row
    train = json.loads((tmp_path / "train_throughput.json").read_text())
    names = [r["name"] for r in train["results"]]
    assert "vmoe_ti_e8[loop]" in names and "vit_ti" in names
    assert all(r["images_per_s"] > 0 for r in train["results"])
    assert (tmp_path / "moe_layer.txt").read_text().count("correctness ok") == 6
    # Step 5: the fused kernels' own timing (fused rows only when interpreted), then dropless routing, when the
    # earlier steps left them the time (they do here): checked, then timed.
    kernels = json.loads((tmp_path / "fused_kernels.json").read_text())
    assert {"copy", "bias_act_fwd[stock]", "combine_bwd[stock]"} <= {r["name"] for r in kernels["results"]}
    assert kernels["fused"] is fused
    assert ("combine_bwd[fused]" in {r["name"] for r in kernels["results"]}) is fused
    if "dropless run skipped" not in proc.stdout:
        dropless = json.loads((tmp_path / "moe_layer_dropless.json").read_text())
        assert dropless["config"]["capacity_factor"] is None
        assert set(dropless["config"]["checks"]) == {"E8", "E8_grouped_mm"}
        assert all(c["max_rel_err"] <= 1e-2 for c in dropless["config"]["checks"].values())
        assert {"floor", "vmoe", "vmoe_grouped_mm", "vmoe_grouped_mm_fwd"} <= {
            r["name"] for r in dropless["results"]
        }


def _train_throughput_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_train_throughput", ROOT / "benchmarks" / "train_throughput.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_DENSE = [("vit_ti", {"patch_size": 4}, 32, 6, 192, 4), ("vit_b16", {}, 224, 12, 768, 16)]


@pytest.mark.parametrize("name, kw, image, depth, width, patch", _DENSE)
def test_timm_reference_kwargs_follow_our_dense_config(name, kw, image, depth, width, patch):
    # The efficiency reference is timm's ViT built with our dense row's depth, width, heads, MLP and patch
    # (timm's vit_tiny has 12 blocks, our vit_ti 6: the default would have halved the CPU efficiencies).
    tkw = _train_throughput_module()._timm_kwargs(name, kw)
    assert (tkw["depth"], tkw["embed_dim"], tkw["patch_size"], tkw["mlp_ratio"]) == (depth, width, patch, 4.0)
    assert tkw["num_heads"] == width // 64


@pytest.mark.parametrize("name, kw, image, depth, width, patch", _DENSE)
def test_timm_reference_has_our_parameter_count(name, kw, image, depth, width, patch):
    pytest.importorskip("timm", reason="timm is an optional extra (the GPU machine has it)")
    import vmoe

    mod = _train_throughput_module()
    timm_name = "vit_tiny_patch16_224" if name == "vit_ti" else "vit_base_patch16_224"
    tm = mod._timm_model(timm_name, image, 1000, **mod._timm_kwargs(name, kw))
    ours = vmoe.create_model(name, image_size=image, num_classes=1000, **kw)
    assert sum(p.numel() for p in tm.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.filterwarnings("ignore:capacity rounding")
@pytest.mark.parametrize("impl", ["auto", "bmm", "bmm_ones", "loop", "packed"])
@pytest.mark.parametrize("E", [4, 7])  # 7: an odd number of experts leaves one outside the CPU's pairs
def test_bf16_fast_path_matches_float32_reference_on_cpu(impl, E):
    # The benchmark's own check (moe_layer.check_correctness) in bf16 autocast on the CPU: the output and
    # every gradient within 1e-2 of the float32 einsum reference, the inference path included, every
    # kept token's row written and dropped tokens exactly 0. The GPU script runs it on CUDA.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import moe_layer
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    import torch

    s = moe_layer.Shapes(batch=12, tokens=17, dim=32, hidden=64, num_experts=E)
    errors = moe_layer.check_correctness(s, torch.device("cpu"), amp=True, impl=impl)
    assert set(errors) >= {"y", "grad_x", "y_inference"} and max(errors.values()) <= 1e-2
    assert min(errors.values()) > 1e-4  # bf16 really ran (float32 matches to ~1e-7)


def _bench_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.filterwarnings("ignore:capacity rounding")
def test_slab_ab_times_every_layout(tmp_path):
    # benchmarks/slab_ab.py: each layout, training and inference, as a finite ratio to the floor; JSON out.
    report = _bench_module("slab_ab").main(
        ["--num-experts", "4", "--rounds", "2", "--json", str(tmp_path / "s.json")]
    )
    row = report["results"]["4"]
    assert set(row) == {f"{n}{s}" for n in ("per_expert", "pairs", "by_count") for s in ("", "_fwd")}
    assert all(0 < v < 100 for v in row.values())
    assert json.loads((tmp_path / "s.json").read_text())["results"]["4"] == row


def test_optimizer_step_benchmark_reports_all_implementations(tmp_path):
    report = _bench_module("optimizer_step").main(
        ["--models", "vit_ti", "--steps", "2", "--json", str(tmp_path / "o.json")]
    )
    row = report["results"]["vit_ti"]
    for key in (
        "step_ms_default",
        "step_ms_foreach",
        "step_ms_fused",
        "images_per_s_default",
        "images_per_s_vmoe",
    ):
        assert row[key] > 0, key
    assert 2.5 < row["params_m"] < 3.0  # ViT-Ti/4 at 32px: 2.7M parameters
    assert (tmp_path / "o.json").exists()


@pytest.mark.filterwarnings("ignore:capacity rounding")
@pytest.mark.parametrize("impl", ["auto", "bmm", "bmm_ones", "loop", "grouped_mm"])
def test_breakdown_identity_experts_leave_router_dispatch_and_combine(impl):
    # vmoe_routing: with identity experts the layer returns each token times the sum of its kept gates,
    # whichever entry point the implementation uses (buffers, packed rows, front-packed rows with a ones
    # column, augmented buffers), and the experts' methods are the class's again afterwards.
    import torch

    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm needs torch >= 2.8")
    ml = _bench_module("moe_layer")
    s = ml.Shapes(batch=12, tokens=17, dim=32, hidden=64, num_experts=4)
    layer = ml.make_layer(s, impl=impl).eval()
    layer.record_routing = True
    x = torch.randn(12, 17, 32)
    with ml.experts_replaced(layer, ml._identity_experts(layer)):
        y, _ = layer(x)
    assert layer.last_routing is not None
    kept = layer.last_routing["kept"]
    gates = torch.gather(layer.last_routing["gates"], -1, layer.last_routing["expert_index"])
    expect = x * (gates * kept).sum(-1, keepdim=True)
    torch.testing.assert_close(y, expect, rtol=1e-6, atol=1e-6)
    assert not any(n in vars(layer.experts) for n in ml._EXPERT_ENTRIES)
    assert not torch.equal(layer(x)[0], y)  # the real experts are back


@pytest.mark.filterwarnings("ignore:capacity rounding")
@pytest.mark.parametrize("train", [True, False], ids=["train", "inference"])
@pytest.mark.parametrize("impl", ["auto", "bmm", "bmm_ones", "loop", "grouped_mm"])
def test_breakdown_experts_alone_replays_the_layers_own_expert_call(impl, train):
    # vmoe_experts: the experts' call the layer made (its rows, counts and slabs), replayed alone, gives
    # the same rows as in the layer; in training it also computes every experts gradient (not into .grad).
    # "loop" enters through Experts.forward, which calls forward_rows: only the outer call is replaced.
    import contextlib

    import torch

    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm needs torch >= 2.8")
    ml = _bench_module("moe_layer")
    s = ml.Shapes(batch=12, tokens=17, dim=32, hidden=64, num_experts=4)
    layer = ml.make_layer(s, impl=impl)
    x = torch.randn(12, 17, 32)
    outs: list[torch.Tensor] = []
    filled: list[int] = []  # front-packed rows: those past offsets[-1] are never computed (arbitrary)

    def keep(name, original):
        def call(*args, **kw):
            outs.append(original(*args, **kw).detach().clone())
            filled.append(int(args[1][-1]) if name == "forward_grouped_rows" else len(outs[-1]))
            return outs[-1]

        return call

    torch.manual_seed(0)
    layer.train(train)
    with ml.experts_replaced(layer, keep), contextlib.nullcontext() if train else torch.inference_mode():
        layer(x)
    assert len(outs) == 1  # one outermost call, whichever entry point
    torch.manual_seed(0)  # the same router noise in the capture below
    step = ml.experts_alone(layer, x.requires_grad_(train), train, contextlib.nullcontext)
    got: list[str] = []
    for name, p in layer.experts.named_parameters():
        p.register_hook(lambda g, name=name: got.append(name))  # fires when its gradient is computed
    out = step()
    n = filled[0]
    assert out.shape[0] == n  # (front-packed: only the computed rows)
    torch.testing.assert_close(out.detach().float(), outs[0].float()[:n], rtol=1e-6, atol=1e-6)
    assert sorted(got) == (sorted(n for n, _ in layer.experts.named_parameters()) if train else [])
    assert all(p.grad is None for p in layer.experts.parameters())  # autograd.grad: nothing in .grad


def test_experts_replaced_nests_and_restores_what_was_there():
    import torch

    ml = _bench_module("moe_layer")
    s = ml.Shapes(batch=12, tokens=17, dim=32, hidden=64, num_experts=4)
    layer = ml.make_layer(s, impl="packed").eval()
    x = torch.randn(12, 17, 32)
    want = layer(x)[0]
    earlier = layer.experts.forward_rows  # a patch someone made before: kept afterwards
    layer.experts.forward_rows = lambda *a, **k: earlier(*a, **k)
    patched = vars(layer.experts)["forward_rows"]
    with ml.experts_replaced(layer, ml._identity_experts(layer)):
        with ml.experts_replaced(layer, lambda name, original: original):
            inner = layer(x)[0]
        outer = layer(x)[0]
    torch.testing.assert_close(inner, outer)  # the inner block passes through to the identity
    assert not torch.allclose(outer, want)
    assert vars(layer.experts)["forward_rows"] is patched
    assert not any(n in vars(layer.experts) for n in ml._EXPERT_ENTRIES if n != "forward_rows")
    with pytest.raises(RuntimeError, match="boom"), ml.experts_replaced(layer, ml._identity_experts(layer)):
        raise RuntimeError("boom")
    assert vars(layer.experts)["forward_rows"] is patched
    torch.testing.assert_close(layer(x)[0], want)


def test_moe_layer_breakdown_rows_and_summary(capsys):
    ml = _bench_module("moe_layer")
    report = ml.main(
        ["--device", "cpu", "--small", "--breakdown", "--no-peers", "--no-check", "--repeats", "2"]
    )
    rows = {r["name"]: r for r in report["results"]}
    for name in ("vmoe_experts", "vmoe_routing", "vmoe_experts_fwd", "vmoe_routing_fwd"):
        assert 0 < rows[name]["ratio_to_floor"] < 100, name
    assert rows["vmoe_experts"]["saved_mib"] > 0 and rows["vmoe_routing"]["saved_mib"] > 0
    assert report["config"]["breakdown"] is True
    out = capsys.readouterr().out
    assert "breakdown E=8 fwd+bwd: experts" in out and "breakdown E=8 forward: experts" in out


def _gpu_out(tmp_path, layer_rows, checks, train_rows, mem=True):
    """A made-up OUT folder of gpu_check.sh: (E, name, ratio, peak memory ratio) rows."""
    results = [
        {"name": n, "num_experts": E, "ratio_to_floor": r, **({"mem_ratio_to_floor": m} if mem else {})}
        for E, n, r, m in layer_rows
    ]
    cfg = {
        "gpu": "NVIDIA H200",
        "torch": "2.11.0",
        "date": "today",
        "checks": checks,
        "dtype": "bf16 autocast",
    }
    (tmp_path / "moe_layer.json").write_text(
        json.dumps({"device": "cuda", "config": cfg, "results": results})
    )
    train = {"config": {"reference": "timm_vit_base_patch16_224"}, "results": train_rows}
    (tmp_path / "train_throughput.json").write_text(json.dumps(train))
    (tmp_path / "gpu_tests.txt").write_text("....\n14 passed in 80.1s\n")
    return tmp_path


def test_gpu_summary_goals_met_and_missed(tmp_path):
    summarize = _bench_module("gpu_summary").summarize
    rows = []
    for E in (8, 32):
        rows += [(E, "floor", 1.0, 1.0), (E, "vmoe", 1.10, 1.2), (E, "vmoe_fwd", 1.05, None)]
        rows += [(E, "loop", 1.8, 1.9), (E, "fairscale", 40.0, 6.0), (E, "vmoe_einsum", 2.5, 2.4)]
        rows += [
            (E, "vmoe_experts", 0.95, 1.0),
            (E, "vmoe_routing", 0.14, 0.2),
            (E, "vmoe_grouped_mm", 1.05, 1.1),
        ]
    checks = {"E8": {"max_rel_err": 4e-3}, "E32_loop": {"max_rel_err": 5e-3}}
    train = [
        {"name": "vit_b16", "images_per_s": 1000.0, "efficiency_vs_dense": 1.0},
        {"name": "vmoe_b16_e8", "images_per_s": 900.0, "efficiency_vs_dense": 0.9},
        {"name": "vmoe_b16_e32", "images_per_s": 880.0, "efficiency_vs_dense": 0.88},
        {"name": "vmoe_b16_e8[loop]", "images_per_s": 500.0, "efficiency_vs_dense": 0.5},  # not a goal row
    ]
    text, v = summarize(_gpu_out(tmp_path, rows, checks, train))
    assert v == {"exactness": True, "layer": True, "memory": True, "peers": True, "end_to_end": True}
    assert "14 passed in 80.1s" in text and "| 32 | fwd+bwd | 0.950 | 0.140 | 1.090 | 1.100 |" in text
    assert "| 8 | vmoe_grouped_mm | 1.050 | - | 1.100 |" in text

    # One E over the goal, a peer ahead of us, a check over 1e-2, an efficiency below 0.85: each is NOT met.
    rows = [r if (r[0], r[1]) != (32, "vmoe") else (32, "vmoe", 1.3, 1.2) for r in rows]
    rows.append((32, "tutel", 1.2, 1.5))
    checks["E32"] = {"max_rel_err": 0.02}
    train[2]["efficiency_vs_dense"] = 0.8
    text, v = summarize(_gpu_out(tmp_path, rows, checks, train))
    assert v == {"exactness": False, "layer": False, "memory": True, "peers": False, "end_to_end": False}
    assert "| 32 | 1.300 | NOT met |" in text

    # No peak memory recorded (a CPU run) and no train file: missing, never met.
    (tmp_path / "train_throughput.json").unlink()
    _gpu_out(tmp_path, rows, checks, train, mem=False)
    (tmp_path / "train_throughput.json").unlink()
    _, v = summarize(tmp_path)
    assert v["memory"] is None and v["end_to_end"] is None
    # No vmoe row at all (its timing failed): the layer goal is missing, not met nor failed.
    _gpu_out(tmp_path, [r for r in rows if r[1] != "vmoe"], checks, train)
    _, v = summarize(tmp_path)
    assert v["layer"] is None and v["peers"] is False
