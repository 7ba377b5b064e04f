"""SkinRetouch: smooths the skin of each crop; eyes, brows, lips, hair and background stay untouched."""

from __future__ import annotations

import numpy as np

from ..facechain_core import licences, previews
from ..facechain_core.errors import FaceChainError
from ..facechain_core.face_regions import faces_for_images
from ..facechain_core.retouch import BACKENDS, retouch_crops
from ._learned import models_state
from .common import CATEGORY, progress, show_pictures
from .sockets import FACES, images_to_numpy, masks_to_numpy, numpy_to_images, numpy_to_masks


def limit_masks(mask, n: int, size: tuple[int, int]) -> list[np.ndarray] | None:
    """A MASK ([B,H,W], or one mask for all) as 0/255 arrays, one per image, checked against the images."""
    if mask is None:
        return None
    masks = masks_to_numpy(mask)
    if len(masks) not in (1, n):
        raise FaceChainError(f"SkinRetouch got {len(masks)} masks for {n} images; connect one mask per image "
                             f"(HumanParse's face_mask) or a single mask for all.")
    h, w = size
    if masks[0].shape != (h, w):
        raise FaceChainError(f"SkinRetouch's mask is {masks[0].shape[1]}x{masks[0].shape[0]} but the images are "
                             f"{w}x{h}; connect a mask made from these images (HumanParse's face_mask).")
    masks = [(m > 0.5).astype(np.uint8) * 255 for m in masks]
    return masks * n if len(masks) == 1 else masks


class SkinRetouch:
    DESCRIPTION = ("Smooths blemishes on the skin of the face and neck of each crop, with edge-preserving "
                   "filtering. Eyes, brows, lips, hair and background are left exactly as they were; the "
                   "skin_mask output shows where pixels may have changed.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("retouched", "skin_mask")
    OUTPUT_TOOLTIPS = ("The crops with smoothed skin.", "Where the retouch may change pixels (1 inside); "
                       "everything outside is unchanged.")
    FUNCTION = "retouch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The aligned crops (from FaceAlign or HumanParse)."}),
                "faces": (FACES, {"tooltip": "The faces output of the FaceAlign that made these crops."}),
                "strength": ("FLOAT", {"default": 0.6, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "tooltip": "How much of the smoothed skin to blend in: 0 changes nothing, "
                                                  "1 uses the smoothed skin fully."}),
                "backend": (list(BACKENDS), {"default": "embedded", "tooltip": (
                    "embedded: skin-only bilateral filter, offline. abpn: FaceChain's ABPN retouching network "
                    "(ModelScope), fetched into models/facechain by install.py --models abpn.")}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Retouch only inside this mask (e.g. HumanParse's face_mask). Same "
                                  "size as the images; one per image or one for all."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return models_state("abpn")

    def retouch(self, images, faces, strength, backend, mask=None):
        arrays = images_to_numpy(images)
        faces = faces_for_images(faces, len(arrays), "SkinRetouch")
        limits = limit_masks(mask, len(arrays), arrays[0].shape[:2])
        names = [f.get("name") or f"crop {i + 1}" for i, f in enumerate(faces)]
        out = retouch_crops(arrays, [f["keypoints"] for f in faces], strength, backend, limits, names,
                            progress(len(arrays)), [f.get("mesh") for f in faces])
        shown = show_pictures([previews.thumbnail(o[0]) for o in out], "retouch")
        return {"ui": {"text": [licences.line(retouch=backend)], "images": shown},
                "result": (numpy_to_images([o[0] for o in out]), numpy_to_masks([o[1] for o in out]))}


NODE_CLASS_MAPPINGS = {"FaceChainSkinRetouch": SkinRetouch}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainSkinRetouch": "SkinRetouch (FaceChain)"}
