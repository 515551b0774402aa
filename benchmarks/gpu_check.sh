#!/usr/bin/env bash
# One-shot GPU check for the MoE layer (SPEC 1.3, shared PERF.md), in well under 4 minutes.
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh        # from the repository root or anywhere
#
# Then benchmarks/train_throughput.py --device cuda: V-MoE-B/16 (E=8, E=32) training images/s
# against ViT-B/16 (ours and timm's) in the same run, with the FLOP-adjusted efficiency.
# The two benchmarks are capped at 3 + 4 minutes.
#
# Runs from the source tree (PYTHONPATH=src, nothing installed): prints the environment, runs the
# CUDA unit tests when pytest is importable, then benchmarks/moe_layer.py --device cuda, which first
# checks the fast path against a float32 reference (outputs and every gradient within 1e-2
# relative, every kept token's output row written) and then times all rows (CUDA events, warm-up,
# median of 20) at V-MoE-B/16 shapes for E=8 and E=32, printing one table and writing
# $OUT/moe_layer.json. Exit status: non-zero if a check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-${1:-/tmp/vmoe_gpu_check}}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
status=0

"$PY" - <<'PYEOF' || exit 1
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
assert torch.cuda.is_available(), "no CUDA device"
print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability(),
      "| torch._grouped_mm present:", hasattr(torch, "_grouped_mm"))
PYEOF

if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    echo "== CUDA unit tests (-m gpu)"
    timeout 50 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_moe_layer.py || status=1
else
    echo "== pytest/hypothesis not importable: unit tests skipped (the benchmark's own check still runs)"
fi

echo "== benchmarks/moe_layer.py --device cuda"
timeout 180 "$PY" benchmarks/moe_layer.py --device cuda --json "$OUT/moe_layer.json" 2>&1 | tee "$OUT/moe_layer.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== benchmarks/train_throughput.py --device cuda (V-MoE-B/16 E=8/E=32 vs ViT-B/16, ours and timm)"
timeout 240 "$PY" benchmarks/train_throughput.py --device cuda --json "$OUT/train_throughput.json" 2>&1 | tee "$OUT/train_throughput.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== done (status $status); results in $OUT"
exit $status
