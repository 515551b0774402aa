#!/usr/bin/env bash
# Fetch and build the peer MoE libraries the benchmarks race (shared PERF.md) into .peers/ (git-ignored),
# outside the project's dependencies: benchmarks/moe_layer.py imports them from there when present
# (PYTHONPATH=.peers, as benchmarks/gpu_check.sh sets), and leaves their rows out otherwise.
#
#   bash scripts/get_peers.sh                          # fairscale (needs PyPI)
#   TUTEL_SRC=/path/to/tutel bash scripts/get_peers.sh # and Tutel, from a checkout of microsoft/tutel
#
# fairscale 0.4.13 (GShard MOELayer + Top2Gate): PyPI has only its sdist; built here as a pure-Python wheel
# without dependencies and unpacked (its top-level `benchmarks` package is dropped: it would shadow ours).
# Tutel (not on PyPI): built from TUTEL_SRC for this machine (CPU-only, NO_CUDA=1, when torch has no CUDA;
# ~1 min) into .peers/, and its source is copied to .peers/tutel-src/, from which benchmarks/gpu_check.sh
# builds the CUDA version on the GPU machine (a compiled extension does not travel between the two).
# Nothing of either is committed: carry .peers/ to the machine that runs the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
rm -rf .peers.new && mkdir -p .peers.new
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation "fairscale==0.4.13" -w "$tmp"
"$PY" -m zipfile -e "$tmp"/fairscale-0.4.13-*.whl .peers.new
rm -rf .peers.new/benchmarks
if [ -n "${TUTEL_SRC:-}" ]; then
    [ -f "$TUTEL_SRC/setup.py" ] && [ -d "$TUTEL_SRC/tutel" ] \
        || { echo "TUTEL_SRC=$TUTEL_SRC is not a checkout of microsoft/tutel (no setup.py and tutel/)" >&2; exit 2; }
    mkdir -p .peers.new/tutel-src
    (cd "$TUTEL_SRC" && tar --exclude=.git --exclude=build --exclude='*.egg-info' -cf - .) | tar -xf - -C .peers.new/tutel-src
    cp -r .peers.new/tutel-src "$tmp/tutel-build"
    no_cuda="$("$PY" -c 'import torch; print(0 if torch.cuda.is_available() else 1)')"
    NO_CUDA="$no_cuda" "$PY" -m pip install --quiet --no-build-isolation --no-deps --target .peers.new "$tmp/tutel-build"
fi
rm -rf .peers && mv .peers.new .peers
PYTHONPATH=.peers "$PY" -c "from fairscale.nn import MOELayer, Top2Gate; print('fairscale', __import__('fairscale').__version__, 'in .peers/')"
if [ -n "${TUTEL_SRC:-}" ]; then
    PYTHONPATH=.peers "$PY" -c "from tutel import moe; print('tutel in .peers/ (source for the GPU build in .peers/tutel-src/)')"
fi
