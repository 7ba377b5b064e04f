"""What every FaceChain node shares with the host: progress with Cancel, safe paths, the model folder.

Nodes stay thin: they translate ComfyUI types to numpy/torch (``sockets``) and call ``facechain_core``.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
from PIL import Image

from ..facechain_core import model_store, onnx_torch, previews, user_paths
from ..facechain_core.errors import FaceChainError
from ..facechain_core.threads import parallel_map

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
        _step(bar, done, n)

    return update


def _step(bar, done: int, n: int) -> None:
    """Cancel honoured (ComfyUI's interrupt raised here), then the bar moved to ``done`` of ``n``."""
    comfy.model_management.throw_exception_if_processing_interrupted()
    bar.update_absolute(int(done), int(n))


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


def input_subfolder(name: str) -> Path:
    """A folder under ComfyUI's input directory; the name can never point outside it. A name with '..' or an
    absolute path is refused even where it would land inside, as the editor's upload button refuses it."""
    if not (name or "").strip():
        raise FaceChainError("No folder given: type the name of a folder inside ComfyUI's input directory.")
    place = "ComfyUI's input directory"
    target = user_paths.within(folder_paths.get_input_directory(), user_paths.relative_name(name, "folder", place),
                               "folder", place)
    if not target.is_dir():
        raise FaceChainError(
            f"Folder '{name.strip()}' was not found in ComfyUI's input directory. Create input/{name.strip()} "
            f"and put the photos there, or type the right name.")
    return target


def first(value):
    """Widgets of an INPUT_IS_LIST node arrive as one-element lists."""
    return value[0] if isinstance(value, list) else value


def follow_host_device() -> None:
    """The embedded nets follow the host's device: a ComfyUI started with ``--cpu`` keeps them on the CPU."""
    try:
        device_type = comfy.model_management.get_torch_device().type
    except Exception:  # a host that cannot say: the nets' own setting decides
        return
    onnx_torch.follow_host(device_type)


def show_pictures(pictures, node: str) -> list[dict]:
    """Small RGB pictures written as PNGs into ComfyUI's temp folder (as PreviewImage does: unique names,
    written under a temporary name and renamed); the list goes into a node's ``{"ui": {"images": ...}}`` so
    the editor shows them in the node itself. The temp folder is emptied when ComfyUI starts."""
    folder = Path(folder_paths.get_temp_directory())
    run = uuid.uuid4().hex[:12]
    names = [f"facechain_{node}_{run}_{i:03d}.png" for i in range(len(pictures))]
    # encoded side by side (OpenCV's PNG encoder runs outside the GIL)
    list(parallel_map(lambda item: previews.write_png(folder / item[0], item[1]), list(zip(names, pictures))))
    return [{"filename": name, "subfolder": "", "type": "temp"} for name in names]


class TrainingProgress:
    """TrainFaceLoRA's progress: the bar with Cancel, the step's text under the node, and the loss curve so
    far as the bar's preview picture (redrawn at most every ``curve_every_s``), so the curve grows in the node
    beside the bar while it trains."""

    def __init__(self, total: int, node_id: str | None):
        self.bar = comfy.utils.ProgressBar(max(int(total), 1))
        self.show_text = _text_under_node(node_id)
        self.every = float(previews.look()["curve_every_s"])
        self.last_curve = 0.0

    def __call__(self, done: int, n: int, info: str | None = None) -> None:
        _step(self.bar, done, n)
        if info:
            self.show_text(info)

    def losses(self, losses: list[float], steps: int) -> None:
        """Called after each training step with the losses read so far; sends the curve now and then, and
        always once all ``steps`` losses are in (the picture the node keeps showing after the run)."""
        now = time.monotonic()
        if not losses or (len(losses) < steps and now - self.last_curve < self.every):
            return
        self.last_curve = now
        picture = Image.fromarray(previews.loss_curve(losses, steps))
        self.bar.update_absolute(self.bar.current, self.bar.total, ("PNG", picture, None))
