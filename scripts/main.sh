#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vmoe demo "$@"
