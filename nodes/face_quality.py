"""TemplateFace: face quality of every crop, the poor ones dropped, and the best one as the template face."""

from __future__ import annotations

import torch

from ..facechain_core import licences, previews
from ..facechain_core.errors import FaceChainError
from ..facechain_core.face_regions import faces_for_images
from ..facechain_core.quality import SCORERS, assess_faces
from ..facechain_core.tags import CaptionSet
from ._learned import models_state
from .common import CATEGORY, progress, show_pictures
from .sockets import CAPTIONS, FACES, images_to_numpy


class TemplateFace:
    DESCRIPTION = ("Scores the face quality of every training crop (sharpness, source resolution, pose, how much "
                   "of the face is visible, detector confidence; or FaceChain's FQA model), drops photos below "
                   "min_quality with the reason in the report, and outputs the best one as the template face that "
                   "FaceFusion and RTSRank compare against.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", FACES, CAPTIONS, "IMAGE", FACES, "STRING")
    RETURN_NAMES = ("kept", "kept_faces", "kept_captions", "template", "template_face", "report")
    OUTPUT_TOOLTIPS = ("The crops good enough to train on, in their order.", "Face data of the kept crops.",
                       "The captions of the kept crops (when captions were connected), shared tags recomputed.",
                       "The best crop: FaceChain's template face.", "Face data of the template face (a one-item list).",
                       "Every photo's score and measures, which were dropped and why, which is the template.")
    FUNCTION = "choose"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "The training crops (after HumanParse / SkinRetouch)."}),
                "faces": (FACES, {"tooltip": "The faces output of the FaceAlign that made these crops."}),
                "scorer": (list(SCORERS), {"default": "embedded", "tooltip": (
                    "embedded: sharpness, resolution, pose, visibility and detector confidence, offline. fqa: "
                    "FaceChain's face-quality model (ONNX), fetched by install.py --models fqa.")}),
                "min_quality": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Photos scoring below this are dropped from the training set."}),
            },
            "optional": {
                "captions": (CAPTIONS, {"tooltip": "AutoTag's captions for the same images: the kept ones are "
                                             "passed on, so images and captions stay paired."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return models_state("fqa")

    def choose(self, images, faces, scorer, min_quality, captions=None):
        arrays = images_to_numpy(images)
        faces = faces_for_images(faces, len(arrays), "TemplateFace")
        caps = None
        if captions is not None:
            caps = CaptionSet.from_dict(captions)
            if len(caps.tags) != len(arrays):
                raise FaceChainError(f"TemplateFace got captions for {len(caps.tags)} images but {len(arrays)} "
                                     f"images; connect the captions AutoTag made from these same images.")
        result = assess_faces(arrays, faces, scorer, min_quality, progress(len(arrays)))
        report = result.report_text(scorer) + "\n" + licences.line(quality=scorer)
        keep = torch.tensor(result.kept, dtype=torch.long)
        kept_caps = caps.subset(result.kept).to_dict() if caps is not None else None
        best = result.template
        shown = show_pictures(previews.quality_pictures(arrays, [q.score for q in result.scores],
                                                        dict(result.dropped), best), "quality")
        return {"ui": {"text": [report], "images": shown},
                "result": (images.index_select(0, keep), [faces[i] for i in result.kept], kept_caps,
                           images[best:best + 1], [faces[best]], report)}


NODE_CLASS_MAPPINGS = {"FaceChainTemplateFace": TemplateFace}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainTemplateFace": "Template Face (FaceChain)"}
