"""What every FaceChain node shares: tensor conversion, progress with Cancel, safe paths, model folder.

Nodes stay thin: they translate ComfyUI types to numpy/torch and call ``facechain_core``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

import comfy.model_management
import comfy.utils
import folder_paths

from ..facechain_core import model_store, user_paths
from ..facechain_core.errors import FaceChainError

CATEGORY = "FaceChain"
FACES = "FACECHAIN_FACES"  # per-crop face data: list of dicts (box, keypoints, score, name, ...)
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


def images_to_numpy(images) -> list[np.ndarray]:
    """IMAGE ([B,H,W,C] float 0..1) or a list of them -> list of HxWx3 uint8 arrays."""
    batches = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for batch in batches:
        if not isinstance(batch, torch.Tensor) or batch.ndim != 4:
            raise FaceChainError(f"Expected an IMAGE batch [B,H,W,C], got {type(batch).__name__} "
                                 f"{tuple(getattr(batch, 'shape', ()))}.")
        arr = (batch.detach().float().cpu().clamp(0, 1).numpy() * 255.0 + 0.5).astype(np.uint8)
        if arr.shape[-1] < 3:
            arr = np.repeat(arr[..., :1], 3, axis=-1)
        out.extend(np.ascontiguousarray(a[..., :3]) for a in arr)
    return out


def numpy_to_images(arrays: list[np.ndarray]) -> torch.Tensor:
    """Same-size HxWx3 uint8 arrays -> IMAGE [B,H,W,3] float."""
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)


def numpy_to_masks(masks: list[np.ndarray]) -> torch.Tensor:
    """HxW masks (bool, uint8 or float) -> MASK [B,H,W] float 0..1."""
    stack = np.stack([m.astype(np.float32) / (255.0 if m.dtype == np.uint8 else 1.0) for m in masks])
    return torch.from_numpy(stack)


def masks_to_numpy(mask) -> list[np.ndarray]:
    m = mask if mask.ndim == 3 else mask.unsqueeze(0)
    return [a for a in m.detach().float().cpu().clamp(0, 1).numpy()]


def progress(total: int, node_id: str | None = None):
    """A facechain_core progress callback that moves the node's bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(max(int(total), 1), node_id=node_id)

    def update(done: int, n: int, info: str | None = None) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(int(done), int(n))

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
