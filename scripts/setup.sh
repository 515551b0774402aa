#!/usr/bin/env bash
# Set up a virtual environment in .venv with everything vmoe and its tests need.
# The CPU build of torch is installed first and pinned, so that no multi-GB CUDA build is pulled.
# Override with VMOE_TORCH (e.g. VMOE_TORCH="torch==2.11.0") or VMOE_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VMOE_PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "${VMOE_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import torch, vmoe; print(f'vmoe {vmoe.__version__} with torch {torch.__version__} ready in .venv')"
