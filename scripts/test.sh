#!/usr/bin/env bash
# The test command: set up (idempotent), then run every test against a real ComfyUI on the CPU.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
