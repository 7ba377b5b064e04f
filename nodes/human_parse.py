"""HumanParse: face, hair and head masks of each aligned crop, and the head alone on white."""

from __future__ import annotations

from ..facechain_core import licences, previews
from ..facechain_core.face_regions import faces_for_images
from ..facechain_core.head_parse import LONG_HAIR
from ..facechain_core.parse import BACKENDS, parse_crops
from ._learned import models_state
from .common import CATEGORY, progress, show_pictures
from .sockets import FACES, images_to_numpy, numpy_to_images, numpy_to_masks


class HumanParse:
    DESCRIPTION = ("Finds the face, the hair and the head (hair + face, grown a little, one connected region) "
                   "in each aligned crop and paints everything outside the head white, as FaceChain trains on. "
                   "The masks come out as ComfyUI masks for any other use.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "MASK", "MASK", "MASK")
    RETURN_NAMES = ("head_on_white", "head_mask", "face_mask", "hair_mask")
    OUTPUT_TOOLTIPS = ("The crops with everything outside the head painted white.",
                       "Head (hair + face, grown a little), 1 inside.", "Face skin and features, 1 inside.",
                       "Hair, 1 inside.")
    FUNCTION = "parse"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The aligned crops from FaceAlign."}),
            "faces": (FACES, {"tooltip": "The faces output of the same FaceAlign (keypoints of each crop)."}),
            "backend": (list(BACKENDS), {"default": "embedded", "tooltip": (
                "embedded: MediaPipe's person mask and 468-point face mesh, offline (files fetched by install.py). "
                "classical: keypoints, skin colour and GrabCut, no model file. m2fp: FaceChain's M2FP human "
                "parsing (ModelScope), fetched into models/facechain by install.py --models m2fp.")}),
        }, "optional": {
            "long_hair": (list(LONG_HAIR), {"default": "keep", "tooltip": (
                "keep: hair that falls below the chin onto the shoulders stays in the head, as FaceChain keeps "
                "it. cut: the head ends at the chin. Used by the embedded backend.")}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return models_state("m2fp")

    def parse(self, images, faces, backend, long_hair="keep"):
        arrays = images_to_numpy(images)
        faces = faces_for_images(faces, len(arrays), "HumanParse")
        names = [f.get("name") or f"crop {i + 1}" for i, f in enumerate(faces)]
        parts = parse_crops(arrays, [f["keypoints"] for f in faces], backend, names, progress(len(arrays)),
                            [f.get("mesh") for f in faces], long_hair)
        shown = show_pictures([previews.thumbnail(p.image) for p in parts], "parse")
        return {"ui": {"text": [licences.line(parse=backend)], "images": shown}, "result": (
            numpy_to_images([p.image for p in parts]), numpy_to_masks([p.head for p in parts]),
            numpy_to_masks([p.face for p in parts]), numpy_to_masks([p.hair for p in parts]))}


NODE_CLASS_MAPPINGS = {"FaceChainHumanParse": HumanParse}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainHumanParse": "HumanParse (FaceChain)"}
