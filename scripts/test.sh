#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the default test suite (fast tests; slow/gpu ones are opt-in).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VMOE_VENV:-.venv}"/bin/python -m pytest -n 2 "$@"
