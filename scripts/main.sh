#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job: train a small V-MoE on the built-in digits data,
# sweep test-time capacity / k / BPR, draw the routing pictures, and write report/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VMOE_VENV:-.venv}"/bin/vmoe demo --out "${1:-report}" "${@:2}"
