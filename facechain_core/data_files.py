"""The one loader of the pack's JSON data files (``facechain_core/data``): read once, cached, and a clear
error naming the file when one is broken."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .errors import FaceChainError

DATA = Path(__file__).resolve().parent / "data"


@lru_cache(maxsize=None)
def load(name: str) -> dict:
    """The JSON object in ``data/<name>`` (e.g. "models.json", "configs/sd15_unet.json")."""
    path = DATA / name
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise FaceChainError(f"The data file '{path}' could not be read ({e.strerror or e}); reinstall "
                             f"comfyui-facechain (git checkout or ComfyUI-Manager).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FaceChainError(f"The data file '{path}' is broken ({e}); restore it (git checkout) or reinstall "
                             f"comfyui-facechain.") from None
    if not isinstance(data, dict):
        raise FaceChainError(f"The data file '{path}' must hold one JSON object; restore it (git checkout).")
    return data


def settings(name: str) -> dict:
    """A data file without its ``_comment``-style keys (those starting with an underscore)."""
    return {k: v for k, v in load(name).items() if not k.startswith("_")}
