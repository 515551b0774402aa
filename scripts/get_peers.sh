#!/usr/bin/env bash
# Fetch the peer MoE libraries the benchmarks race (shared PERF.md) into .peers/ (git-ignored), outside the
# project's dependencies: benchmarks/moe_layer.py imports them from there when present (PYTHONPATH=.peers,
# as benchmarks/gpu_check.sh sets), and leaves their rows out otherwise.
#
#   bash scripts/get_peers.sh            # needs PyPI; then carry .peers/ to a machine without it
#
# fairscale 0.4.13 (GShard MOELayer + Top2Gate): PyPI has only its sdist; built here as a pure-Python wheel
# without dependencies and unpacked (its top-level `benchmarks` package is dropped: it would shadow ours).
# Tutel is not fetched: it is not on PyPI and needs its CUDA extension built on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip wheel --quiet --no-deps --no-build-isolation "fairscale==0.4.13" -w "$tmp"
rm -rf .peers.new && mkdir -p .peers.new
"$PY" -m zipfile -e "$tmp"/fairscale-0.4.13-*.whl .peers.new
rm -rf .peers.new/benchmarks
rm -rf .peers && mv .peers.new .peers
PYTHONPATH=.peers "$PY" -c "from fairscale.nn import MOELayer, Top2Gate; print('fairscale', __import__('fairscale').__version__, 'in .peers/')"
