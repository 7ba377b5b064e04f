"""What every FaceChain node shares with the host: progress with Cancel, safe paths, the model folder.

Nodes stay thin: they translate ComfyUI types to numpy/torch (``sockets``) and call ``facechain_core``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from ..facechain_core import model_store, user_paths
from ..facechain_core.errors import FaceChainError

CATEGORY = "FaceChain"
MODELS_FOLDER = "facechain"
PACK_DIR = Path(__file__).resolve().parent.parent


def register_model_folder() -> None:
    """``models/facechain`` holds the learned models; the library finds them through the model store."""
    path = os.path.join(folder_paths.models_dir, MODELS_FOLDER)
    folder_paths.add_model_folder_path(MODELS_FOLDER, path, is_default=True)
    model_store.set_models_root(folder_paths.get_folder_paths(MODELS_FOLDER)[0])
    user_paths.set_roots({"input": folder_paths.get_input_directory(), "output": folder_paths.get_output_directory(),
                          "models": folder_paths.models_dir, "temp": folder_paths.get_temp_directory(),
                          "custom_nodes/" + PACK_DIR.name: PACK_DIR})


def progress(total: int):
    """A facechain_core progress callback that moves the node's bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(max(int(total), 1))

    def update(done: int, n: int, info: str | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(int(done), int(n))

    return update


def _text_under_node(node_id):
    """Show the current loss under the node (ComfyUI's progress bar carries numbers only)."""
    try:
        from server import PromptServer
    except ImportError:
        return lambda text: None
    last = {"t": 0.0}

    def send(text):
        now = time.monotonic()
        if node_id is not None and now - last["t"] > 0.5:
            last["t"] = now
            PromptServer.instance.send_progress_text(text, node_id)

    return send


def progress_with_text(total: int, node_id: str | None):
    """``progress`` that also shows the step's text (e.g. the loss) under the node."""
    bar, show = progress(total), _text_under_node(node_id)

    def update(done: int, n: int, info: str | None = None) -> None:
        bar(done, n, info)
        if info:
            show(info)

    return update


def input_subfolder(name: str) -> Path:
    """A folder under ComfyUI's input directory; the name can never point outside it."""
    if not (name or "").strip():
        raise FaceChainError("No folder given: type the name of a folder inside ComfyUI's input directory.")
    target = user_paths.within(folder_paths.get_input_directory(), name, "folder", "ComfyUI's input directory")
    if not target.is_dir():
        raise FaceChainError(
            f"Folder '{name.strip()}' was not found in ComfyUI's input directory. Create input/{name.strip()} "
            f"and put the photos there, or type the right name.")
    return target


def first(value):
    """Widgets of an INPUT_IS_LIST node arrive as one-element lists."""
    return value[0] if isinstance(value, list) else value
