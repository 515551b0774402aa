#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything vmoe and its tests need.
# The CPU build of torch is installed first and pinned, so that no multi-GB CUDA build is pulled.
# Override with VMOE_TORCH, VMOE_PYTHON or VMOE_VENV (another directory). E.g. the GPU machine's torch,
# in its own venv (a CUDA build from PyPI, ~3 GB; it runs on a CPU too):
#   VMOE_VENV=.venv-torch211 VMOE_TORCH="torch==2.11.0" bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VMOE_PYTHON:-python3}
VENV=${VMOE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# Triton, pinned like torch, for the fused kernels' tests (its interpreter and its sm_90 compiler run on a
# CPU): the GPU machine's version, which torch 2.11's CUDA build requires too.
triton=()
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ]; then triton=("${VMOE_TRITON:-triton==3.6.0}"); fi
"$VENV/bin/python" -m pip install -q "${VMOE_TORCH:-torch==2.13.0}" ${triton[@]+"${triton[@]}"}
"$VENV/bin/python" -m pip install -q -e ".[dev]"
"$VENV/bin/python" -c "import torch, vmoe; print(f'vmoe {vmoe.__version__} with torch {torch.__version__} ready in $VENV')"
