"""The ComfyUI adapters: every module here that defines NODE_CLASS_MAPPINGS is one pipeline step."""

from importlib import import_module
from pathlib import Path

from .boundary import guard
from .common import register_model_folder

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
register_model_folder()
for _path in sorted(Path(__file__).parent.glob("*.py")):
    if _path.stem.startswith("_") or _path.stem == "common":
        continue
    _mod = import_module(f".{_path.stem}", __name__)
    NODE_CLASS_MAPPINGS.update(getattr(_mod, "NODE_CLASS_MAPPINGS", {}))
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
for _key, _cls in NODE_CLASS_MAPPINGS.items():
    guard(_cls, NODE_DISPLAY_NAME_MAPPINGS.get(_key, _key))
