"""LoadFacePhotos: a folder of photos of any sizes, as a list that FaceChain's nodes take one by one."""

from __future__ import annotations

import torch

from ..facechain_core.errors import FaceChainError
from ..facechain_core.images import list_photos, load_photo
from .common import CATEGORY, input_subfolder, progress


class LoadFacePhotos:
    DESCRIPTION = ("Loads every photo in a folder under ComfyUI's input directory, as a list, so photos of "
                   "different sizes can go to FaceAlign together. Transparent parts become white.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("photos", "names")
    OUTPUT_IS_LIST = (True, True)
    OUTPUT_TOOLTIPS = ("One IMAGE per photo, each at its own size.", "The file name of each photo.")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "folder": ("STRING", {"default": "facechain", "tooltip": "Folder inside ComfyUI's input directory "
                                  "that holds 3-20 photos of one person (JPEG, PNG, WebP)."}),
            "max_photos": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Use at most this many "
                                   "photos (in name order)."}),
        }}

    @classmethod
    def IS_CHANGED(cls, folder, max_photos):
        try:
            files = list_photos(input_subfolder(folder))
        except FaceChainError:
            return float("nan")
        return "|".join(f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in files)

    def load(self, folder, max_photos):
        files = list_photos(input_subfolder(folder))[:max_photos]
        step = progress(len(files))
        photos = []
        for i, path in enumerate(files):
            step(i, len(files))
            photos.append(torch.from_numpy(load_photo(path)).float().div_(255.0).unsqueeze(0))
        step(len(files), len(files))
        return (photos, [p.name for p in files])


NODE_CLASS_MAPPINGS = {"FaceChainLoadPhotos": LoadFacePhotos}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainLoadPhotos": "Load Face Photos (FaceChain)"}
