"""RTSRank: keep the portraits with one plausible face and sort them by likeness to the person."""

from __future__ import annotations

from ..facechain_core import licences, previews
from ..facechain_core.errors import FaceChainError
from ..facechain_core.rank import IF_NONE_KEPT, RankSettings, filter_defaults, order_or_unranked, rank_images
from ..facechain_core.recognition import BACKENDS
from .common import CATEGORY, first, progress, show_pictures
from .sockets import DETECTIONS, batches_of, images_to_numpy

IF_NONE = IF_NONE_KEPT


class RTSRank:
    DESCRIPTION = ("FaceChain's final step: keeps the images that show exactly one face of plausible size, "
                   "embeds each face with a face-recognition model and returns the top N sorted by cosine "
                   "similarity to the reference (the template face, or the mean of several photos such as the "
                   "aligned training crops), with their scores.")
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", "FLOAT", "STRING", "FLOAT", "IMAGE", "STRING")
    RETURN_NAMES = ("images", "scores", "report", "likeness", "rejected", "rejected_reasons")
    OUTPUT_IS_LIST = (True, True, False, True, True, True)
    OUTPUT_TOOLTIPS = ("The accepted images, most alike first, at most top_n (a list: sizes may differ).",
                       "The cosine similarity of each returned image to the reference.",
                       "Every image's likeness and rank, or why it was rejected; images FaceFusion fused less or "
                       "left unfused are named.",
                       "The likeness of each returned image in percent: 100 = as alike as two of the person's own "
                       "photos (leave-one-out over the reference photos).",
                       "The images not accepted (no single plausible face, or below the accept threshold), "
                       "most alike first.",
                       "Why each rejected image was rejected, in the same order.")
    FUNCTION = "rank"

    @classmethod
    def INPUT_TYPES(cls):
        d = filter_defaults()
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The portraits to rank (a batch, or a list of images of any sizes)."}),
            "reference": ("IMAGE", {"tooltip": "The template face photo, or several photos of the person (their "
                                    "mean embedding is used)."}),
            "top_n": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip": "How many images to return."}),
            "backend": (list(BACKENDS), {"default": "embedded", "tooltip": "embedded: SFace, offline. arcface: an "
                                         "ArcFace ONNX file in models/facechain/arcface. rts: FaceChain's RTS model. "
                                         "Fetch the learned ones with install.py --models."}),
            "min_face_fraction": ("FLOAT", {"default": d["min_face_fraction"], "min": 0.01, "max": 1.0, "step": 0.01,
                                            "tooltip": "Smallest plausible face, as a share of the image's "
                                                       "short side."}),
            "max_face_fraction": ("FLOAT", {"default": d["max_face_fraction"], "min": 0.05, "max": 1.5, "step": 0.01,
                                            "tooltip": "Largest plausible face, as a share of the image's "
                                                       "short side."}),
            "if_none_kept": (list(IF_NONE), {"default": IF_NONE[0], "tooltip": "When no image shows one plausible "
                                             "face: return the first top_n images unranked (score 0), or stop."}),
        }, "optional": {
            "accept_likeness": ("FLOAT", {"default": d["accept_likeness"], "min": 0.0, "max": 200.0, "step": 1.0,
                                          "tooltip": "Accept an image only at this likeness (percent of the person's "
                                                     "own photo-to-photo similarity) or above."}),
            "names": ("STRING", {"forceInput": True, "tooltip": "Names of the images for the report (the names "
                                 "output of Load Face Photos)."}),
            "detections": (DETECTIONS, {"tooltip": "FaceFusion's detections of these images: the faces are not "
                                        "searched for again (FaceFusion keeps each face's keypoints)."}),
        }}

    def rank(self, images, reference, top_n, backend, min_face_fraction, max_face_fraction, if_none_kept,
             names=None, detections=None, accept_likeness=None):
        batches = batches_of(images)
        arrays = images_to_numpy(batches)
        singles = [b[i:i + 1, ..., :3] for b in batches for i in range(b.shape[0])]  # the input's own floats
        if not arrays:
            raise FaceChainError("RTSRank got no images. Connect the generated (or fused) images.")
        refs = images_to_numpy(batches_of(reference))
        settings = RankSettings(top_n=int(first(top_n)), backend=first(backend),
                                min_face_fraction=float(first(min_face_fraction)),
                                max_face_fraction=float(first(max_face_fraction)))
        if accept_likeness:
            settings.accept_likeness = float(first(accept_likeness))
        result = rank_images(arrays, refs, settings, [str(n) for n in names or []], progress(len(arrays)),
                             first(detections) if detections else None)
        order, scores, likeness, report = order_or_unranked(result, len(arrays), settings.top_n,
                                                            first(if_none_kept), licences.line(rank=settings.backend))
        out = [singles[i] for i in order]
        by_index = {c.index: c for c in result.candidates}
        rejected = [i for i in result.rejected if i not in order]
        reasons = [f"{by_index[i].name}: {by_index[i].why_dropped}" for i in rejected]
        accepted = [i in by_index and by_index[i].accepted for i in order]
        shown = show_pictures(previews.ranked_pictures(arrays, order, likeness, accepted,
                                                       [(i, by_index[i].why_dropped) for i in rejected]), "rank")
        return {"ui": {"text": [report], "images": shown}, "result": (out, scores, report, likeness,
                                                     [singles[i] for i in rejected], reasons)}


NODE_CLASS_MAPPINGS = {"FaceChainRTSRank": RTSRank}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainRTSRank": "RTS Rank (FaceChain)"}
