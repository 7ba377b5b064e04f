"""FaceFusion: the template face fused into every generated portrait, inside a soft face mask only."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from ..facechain_core import licences
from ..facechain_core.errors import FaceChainError
from ..facechain_core.fusion import BACKENDS, FusionSettings, fuse_images
from .common import CATEGORY, first, progress

DETECTIONS = "FACECHAIN_DETECTIONS"  # per image (flattened batch order): a list of {box, keypoints, score}


def batches_of(images) -> list[torch.Tensor]:
    return [b for b in (images or []) if isinstance(b, torch.Tensor) and b.ndim == 4 and b.shape[0] > 0]


def to_uint8(batches: list[torch.Tensor]) -> list[np.ndarray]:
    """IMAGE batches -> HxWx3 uint8 arrays, rounded to nearest. OpenCV converts in one pass (about 20x
    faster than the same arithmetic in numpy or torch on the CPU); negatives are cut to 0 first."""
    out = []
    for b in batches:
        rgb = b[..., :3] if b.shape[-1] >= 3 else b[..., :1].expand(*b.shape[:-1], 3)
        arr = np.ascontiguousarray(rgb.detach().cpu().float().numpy())
        flat = arr.reshape(-1, arr.shape[-2] * arr.shape[-1])
        u8 = cv2.convertScaleAbs(cv2.max(flat, 0.0), alpha=255.0).reshape(arr.shape)
        out.extend(u8)
    return out


class FaceFusion:
    DESCRIPTION = ("Fuses the template face into each image: aligns it by facial landmarks, matches the "
                   "image's colour and lighting, and blends it in seamlessly inside a soft face mask. Pixels "
                   "outside the mask are not changed; images with no face pass through unchanged (the report "
                   "says which).")
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "MASK", "STRING", DETECTIONS)
    RETURN_NAMES = ("images", "masks", "report", "detections")
    OUTPUT_IS_LIST = (True, True, False, False)
    OUTPUT_TOOLTIPS = ("The images with the template face fused in (same sizes and order as the input).",
                       "Where and how strongly each image took the template face (0 = unchanged).",
                       "Which images were fused and which passed through, and why.",
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
        }}

    def fuse(self, images, template, strength, backend):
        batches = batches_of(images)
        if not batches:
            raise FaceChainError("FaceFusion got no images. Connect the decoded images (VAE Decode).")
        templates = to_uint8(batches_of(template)[:1])
        if not templates:
            raise FaceChainError("FaceFusion got no template image. Connect the template face photo.")
        flat = to_uint8(batches)
        settings = FusionSettings(strength=float(first(strength)), backend=first(backend))
        result = fuse_images(flat, templates[0], settings, progress(len(flat)))
        out_images, out_masks, k = [], [], 0
        for batch in batches:
            out = batch[..., :3].detach().cpu().float().clone()  # the input's own values, kept exactly...
            masks = []
            for j in range(batch.shape[0]):
                fused = result.images[k]
                k += 1
                masks.append(fused.mask)
                if fused.roi is None:
                    continue
                x0, y0, x1, y1 = fused.roi  # ...except inside the mask, where the fused face goes
                m = torch.from_numpy(fused.mask[y0:y1, x0:x1]).unsqueeze(-1) > 0
                face = torch.from_numpy(fused.image[y0:y1, x0:x1]).float().div_(255.0)
                out[j, y0:y1, x0:x1] = torch.where(m, face, out[j, y0:y1, x0:x1])
            out_images.append(out)
            out_masks.append(torch.from_numpy(np.stack(masks)))
        report = result.report_text() + "\n" + licences.line(fusion=settings.backend)
        return {"ui": {"text": [report]}, "result": (out_images, out_masks, report, result.detections())}


NODE_CLASS_MAPPINGS = {"FaceChainFaceFusion": FaceFusion}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainFaceFusion": "Face Fusion (FaceChain)"}
