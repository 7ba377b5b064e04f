"""FaceFusion: the template face fused into every generated portrait, inside a soft face mask only."""

from __future__ import annotations

import numpy as np
import torch

from ..facechain_core import licences
from ..facechain_core.errors import FaceChainError
from ..facechain_core.fusion import BACKENDS, FusionSettings, fuse_images
from .common import CATEGORY, first, progress
from .sockets import DETECTIONS, batches_of, images_to_numpy


class FaceFusion:
    DESCRIPTION = ("Fuses the template face into each image: warps it triangle by triangle onto the image's "
                   "468-point face mesh, matches colour and light region by region and blends the inner face "
                   "(brows, eyes, nose, mouth, cheeks); the outline, jaw and pose stay the image's. Guards check "
                   "pose, expression and the warp first and fuse less (lower strength, eyes and brows, brows) or "
                   "not at all when they fail; the report says which and why. Pixels outside the mask are not "
                   "changed.")
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "MASK", "STRING", DETECTIONS)
    RETURN_NAMES = ("images", "masks", "report", "detections")
    OUTPUT_IS_LIST = (True, True, False, False)
    OUTPUT_TOOLTIPS = ("The images with the template face fused in (same sizes and order as the input).",
                       "Where and how strongly each image took the template face (0 = unchanged).",
                       "Which images were fused, fused less or passed through, and why.",
                       "The faces found in each image; RTSRank uses them instead of searching the images again "
                       "(the fused face keeps the image's own keypoints).")
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
        }, "optional": {
            "reference": ("IMAGE", {"tooltip": "The person's photos (the aligned training crops). A fusion is kept "
                                    "only where it makes the face more like their mean; without them, more like "
                                    "the template."}),
        }}

    def fuse(self, images, template, strength, backend, reference=None):
        batches = batches_of(images)
        if not batches:
            raise FaceChainError("FaceFusion got no images. Connect the decoded images (VAE Decode).")
        templates = images_to_numpy(batches_of(template)[:1])
        if not templates:
            raise FaceChainError("FaceFusion got no template image. Connect the template face photo.")
        flat = images_to_numpy(batches)
        settings = FusionSettings(strength=float(first(strength)), backend=first(backend))
        refs = images_to_numpy(batches_of(reference)) if reference else None
        result = fuse_images(flat, templates[0], settings, progress(len(flat)), refs)
        out_images, out_masks, k = [], [], 0
        for batch in batches:
            out = batch[..., :3].detach().cpu().float().clone()  # the input's own values, kept exactly...
            pixels = out.numpy()  # (the same memory: numpy on a few small regions is quicker than torch)
            masks = []
            for j in range(batch.shape[0]):
                fused = result.images[k]
                k += 1
                masks.append(fused.mask)
                if fused.roi is None:
                    continue
                x0, y0, x1, y1 = fused.roi  # ...except inside the mask, where the fused face goes
                m = fused.mask[y0:y1, x0:x1] > 0
                pixels[j, y0:y1, x0:x1][m] = fused.image[y0:y1, x0:x1][m].astype(np.float32) / np.float32(255.0)
            out_images.append(out)
            out_masks.append(torch.from_numpy(np.stack(masks)))
        report = result.report_text() + "\n" + licences.line(fusion=settings.backend)
        return {"ui": {"text": [report]}, "result": (out_images, out_masks, report, result.detections())}


NODE_CLASS_MAPPINGS = {"FaceChainFaceFusion": FaceFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainFaceFusion": "Face Fusion (FaceChain)"}
