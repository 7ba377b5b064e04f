"""AutoTag: a training caption per crop and the prompt fragment FaceChain derives from shared tags."""

from __future__ import annotations

from ..facechain_core import licences
from ..facechain_core.face_regions import faces_for_images
from ..facechain_core.tags import SUBJECT_SOURCES, TAGGERS, caption_photos, rules
from ._learned import models_state
from .common import CATEGORY, progress
from .sockets import CAPTIONS, FACES, images_to_numpy


class AutoTag:
    DESCRIPTION = ("Writes one caption per photo for LoRA training: the trigger token, a subject phrase and "
                   "descriptive tags (WD14 tagger, filtered by FaceChain's rules: no eye, nose, lip, body or "
                   "gender tags), plus the generation prompt fragment from the tags more than half the photos "
                   "share. Works without any download: the subject phrase then comes from the embedded gender/age "
                   "networks (a handsome man, a mature woman, ...) and captions carry no tags.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (CAPTIONS, "STRING", "STRING", "STRING")
    RETURN_NAMES = ("captions", "captions_text", "prompt", "report")
    OUTPUT_TOOLTIPS = (
        "Everything at once for TrainFaceLoRA / ApplyStyleLoRA / TemplateFace: a dict with trigger, subject, "
        "captions (one per image, in batch order), shared_tags, prompt, tags (per image) and names.",
        "The captions as text, one line per image in batch order.",
        "Generation prompt fragment: trigger, subject phrase and the tags shared by more than half the photos.",
        "Where the subject phrase and tags came from, and each photo's caption.")
    FUNCTION = "tag"

    @classmethod
    def INPUT_TYPES(cls):
        threshold = rules()["tagger"]["general_threshold"]
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The training crops (after HumanParse / SkinRetouch)."}),
            "faces": (FACES, {"tooltip": "The faces output of the FaceAlign that made these crops (names and "
                                         "keypoints for the gender/age model)."}),
            "trigger": ("STRING", {"default": "fcsks", "tooltip": "A made-up word the LoRA learns as this person; "
                                   "every caption and the prompt start with it."}),
            "subject": ("STRING", {"default": "a person", "tooltip": "Subject phrase when no gender/age model is used "
                                   "or it cannot tell, e.g. 'a handsome man' or 'a beautiful woman' as FaceChain "
                                   "writes them."}),
            "subject_from": (list(SUBJECT_SOURCES), {"default": "auto", "tooltip": (
                "How the subject phrase is chosen, by FaceChain's rule over gender and age summed over all photos. "
                "auto: FairFace when installed, else the embedded gender/age networks (offline). input: always the "
                "subject input. fairface: FairFace, an error if it is not installed. embedded: the embedded "
                "networks.")}),
            "tagger": (list(TAGGERS), {"default": "auto", "tooltip": (
                "auto: the WD14 tagger when installed (models/facechain/wd14/model.onnx + selected_tags.csv), else "
                "no tags. none: no tags. wd14: the WD14 tagger, an error if it is not installed.")}),
            "threshold": ("FLOAT", {"default": threshold, "min": 0.05, "max": 0.95, "step": 0.01,
                                    "tooltip": "Keep tags the tagger scores at least this high."}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return models_state("wd14_tagger", "fairface")

    def tag(self, images, faces, trigger, subject, subject_from, tagger, threshold):
        arrays = images_to_numpy(images)
        faces = faces_for_images(faces, len(arrays), "AutoTag")
        result = caption_photos(arrays, [f["keypoints"] for f in faces], trigger, subject, subject_from, tagger,
                                threshold, [f.get("name") or "" for f in faces], progress(len(arrays)))
        report = result.report() + "\n" + licences.line(tagger=tagger, subject=subject_from)
        return {"ui": {"text": [report]},
                "result": (result.to_dict(), "\n".join(result.captions), result.prompt, report)}


NODE_CLASS_MAPPINGS = {"FaceChainAutoTag": AutoTag}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainAutoTag": "AutoTag (FaceChain)"}
