#!/usr/bin/env bash
# The main job on a fresh machine: set up (idempotent), then run the bundled workflow through a real ComfyUI.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python scripts/run_example.py "$@"
