"""The ComfyUI adapters: every module here that defines NODE_CLASS_MAPPINGS is one pipeline step.

Each node module is imported on its own: one that fails to import (a missing package, a bug) leaves the
other nodes working, and the log names the module and the reason. ``FAILED`` keeps them for the tests.
"""

import logging
from importlib import import_module
from pathlib import Path

from .boundary import guard
from .common import follow_host_device, register_model_folder

# Shared helpers, not nodes: sockets (types and conversions), common (host helpers), comfy_backbone,
# boundary (errors leaving the pack) and the _private modules.
HELPERS = {"common", "sockets", "comfy_backbone", "boundary"}
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
FAILED: dict[str, str] = {}  # node module -> why it did not load
_log = logging.getLogger("comfyui-facechain")


def _register(stem: str) -> None:
    try:
        module = import_module(f".{stem}", __name__)
    except Exception as e:  # any failure of one module must not take the others down
        FAILED[stem] = f"{type(e).__name__}: {e}"
        _log.error("comfyui-facechain: the nodes of '%s' are not available: %s", stem, FAILED[stem], exc_info=True)
        return
    NODE_CLASS_MAPPINGS.update(getattr(module, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(module, "NODE_DISPLAY_NAME_MAPPINGS", {}))


register_model_folder()
follow_host_device()
for _path in sorted(Path(__file__).parent.glob("*.py")):
    if not _path.stem.startswith("_") and _path.stem not in HELPERS:
        _register(_path.stem)
for _key, _cls in NODE_CLASS_MAPPINGS.items():
    guard(_cls, NODE_DISPLAY_NAME_MAPPINGS.get(_key, _key))
