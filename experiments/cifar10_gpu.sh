#!/usr/bin/env bash
# CIFAR-10 V-MoE vs dense ViT at GPU scale (one H200, bf16 autocast), one process:
#   dense ViT-Ti/4 and V-MoE-Ti/4 (E=8, k=2, every 2nd block) x seeds 0 1, capacity sweeps of both
#   V-MoE seeds, per-image compute under BPR at C=0.5, V-MoE k=1 x 2 seeds, aux-loss ablation (seed 0),
#   and training throughput against timm's ViT of the same shape.
#
#   OUT=/some/dir bash experiments/cifar10_gpu.sh [extra experiments/cifar10.py flags]
#
# Needs: python3 with torch (2.11 is fine), numpy, pillow, tqdm, matplotlib (timm optional); no pip
# installs. Data: cifar10_jpeg_bytes.npz in $VMOE_DATA_DIR, ../shared/data or shared/data (the repo's
# copy of /work/shared/data; carry it, it does not travel by itself).
#
# Sizing (estimate, not measured yet): full 50k train / 10k test, 10 epochs, batch 256. Assuming a
# ViT-Ti/4 trains at 20-40k img/s in bf16 on an H200 and V-MoE-Ti/4 k=2 at 8-20k img/s (dispatch
# overhead on a model this small), one epoch of the 7 runs costs 15-35 s, so 10 epochs are 2.5-6 min of
# training; the main comparison (2 models x 2 seeds + 2 sweeps of 32 settings on 10k images) is about
# half of it. Start-up (JPEG decode of 60k images, CUDA init) adds about 0.5-1 min. --budget-s 500
# skips (and records) any run that would not finish in time, so the command ends inside 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() else 1)"
# $OUT/cifar10 gets exactly 8 files (results.json, results.md, 6 PNGs); checkpoints stay in /tmp.
"$PY" experiments/cifar10.py --scale gpu --out "$OUT/cifar10" --runs-dir /tmp/vmoe_cifar10_runs \
  --device cuda --budget-s 500 "$@" 2>&1 | tee /tmp/vmoe_cifar10.log
