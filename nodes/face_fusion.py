"""FaceFusion: the template face fused into every generated portrait, inside a soft face mask only."""

from __future__ import annotations

import numpy as np
import torch

from ..facechain_core.errors import FaceChainError
from ..facechain_core.fusion import BACKENDS, FusionSettings, fuse_images
from .common import CATEGORY, first, images_to_numpy, progress


class FaceFusion:
    DESCRIPTION = ("Fuses the template face into each image: aligns it by facial landmarks, matches the "
                   "image's colour and lighting, and blends it in seamlessly inside a soft face mask. Pixels "
                   "outside the mask are not changed; images with no face pass through unchanged (the report "
                   "says which).")
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("images", "masks", "report")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = ("The images with the template face fused in (same sizes and order as the input).",
                       "Where and how strongly each image took the template face (0 = unchanged).",
                       "Which images were fused and which passed through, and why.")
    FUNCTION = "fuse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The generated portraits (a batch, or a list of images of any sizes)."}),
            "template": ("IMAGE", {"tooltip": "The template face: the best training photo (its first image is used)."}),
            "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                   "tooltip": "How much of the template face to use inside the mask (0 = none)."}),
            "backend": (list(BACKENDS), {"default": "embedded", "tooltip": "embedded: landmark warp, colour match "
                                         "and seamless blending, offline. face_fusion: FaceChain's face-fusion "
                                         "model, fetched into models/facechain by install.py."}),
        }}

    def fuse(self, images, template, strength, backend):
        batches = [b for b in (images or []) if isinstance(b, torch.Tensor) and b.ndim == 4 and b.shape[0] > 0]
        if not batches:
            raise FaceChainError("FaceFusion got no images. Connect the decoded images (VAE Decode).")
        templates = images_to_numpy(template or [])
        if not templates:
            raise FaceChainError("FaceFusion got no template image. Connect the template face photo.")
        arrays = [images_to_numpy(b) for b in batches]
        flat = [a for group in arrays for a in group]
        settings = FusionSettings(strength=float(first(strength)), backend=first(backend))
        result = fuse_images(flat, templates[0], settings, progress(len(flat)))
        out_images, out_masks, k = [], [], 0
        for batch in batches:
            n = batch.shape[0]
            fused = result.images[k:k + n]
            k += n
            mask = torch.from_numpy(np.stack([f.mask for f in fused])).float()
            new = torch.from_numpy(np.stack([f.image for f in fused])).float() / 255.0
            src = batch[..., :3].detach().cpu().float()
            # Outside the mask the input's own values pass through exactly (no 8-bit round trip).
            out = torch.where(mask.unsqueeze(-1) > 0, new, src)
            out_images.append(out)
            out_masks.append(mask)
        report = result.report_text()
        return {"ui": {"text": [report]}, "result": (out_images, out_masks, report)}


NODE_CLASS_MAPPINGS = {"FaceChainFaceFusion": FaceFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainFaceFusion": "Face Fusion (FaceChain)"}
