"""FaceAlign: FaceChain's level, square, white-filled face crop for each photo."""

from __future__ import annotations

from ..facechain_core import licences, previews
from ..facechain_core.align import AlignSettings, align_photos
from ..facechain_core.detect import BACKENDS
from ..facechain_core.errors import FaceChainError
from ..facechain_core.face_mesh import add_meshes
from .common import CATEGORY, first, progress, show_pictures
from .sockets import FACES, images_to_numpy, numpy_to_images


class FaceAlign:
    DESCRIPTION = ("Finds the person's face in each photo, levels the eyes and cuts a square crop with the "
                   "face at FaceChain's size and place (white outside the photo). A photo lying on its side or "
                   "upside down is turned upright first. In a photo with several faces the one that matches the "
                   "person of the single-face photos is kept (FaceChain's rule, the largest face at least 4x the "
                   "next, when there is no single-face photo). Skipped photos are named in the report with why.")
    CATEGORY = CATEGORY
    INPUT_IS_LIST = True
    RETURN_TYPES = ("IMAGE", FACES, "STRING")
    RETURN_NAMES = ("aligned", "faces", "report")
    OUTPUT_TOOLTIPS = ("The aligned crops, one batch.", "Face box and 5 keypoints of each crop, for "
                       "HumanParse, FaceFusion and RTSRank.", "Which photos were kept (turned upright, which face "
                       "was chosen) or skipped, and why.")
    FUNCTION = "align"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "photos": ("IMAGE", {"tooltip": "Photos of one person: a list from Load Face Photos, or any "
                                     "IMAGE batch. Sizes may differ."}),
                "size": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8,
                                 "tooltip": "Side of each square crop in pixels (FaceChain trains at 512)."}),
                "face_fraction": ("FLOAT", {"default": 0.40, "min": 0.35, "max": 0.45, "step": 0.01,
                                            "tooltip": "Face size as a share of the crop side "
                                                       "(FaceChain: 0.35-0.45)."}),
                "face_centre": ("FLOAT", {"default": 0.42, "min": 0.35, "max": 0.50, "step": 0.01,
                                          "tooltip": "Height of the face centre from the top, as a share of "
                                                     "the crop side (FaceChain: 0.35-0.50)."}),
                "detector": (list(BACKENDS), {"default": "embedded",
                                              "tooltip": "embedded: YuNet, offline, ships with the pack's "
                                                         "requirements. damofd: FaceChain's detector, fetched "
                                                         "into models/facechain by install.py."}),
            },
            "optional": {
                "names": ("STRING", {"forceInput": True, "tooltip": "Names of the photos for the report "
                                     "(the names output of Load Face Photos)."}),
            },
        }

    def align(self, photos, size, face_fraction, face_centre, detector, names=None):
        arrays = images_to_numpy(photos or [])
        if not arrays:
            raise FaceChainError("FaceAlign got no photos. Connect Load Face Photos or an IMAGE with 3-20 photos.")
        names = list(names or [])
        if len(names) != len(arrays):
            names = [f"photo {i + 1}" for i in range(len(arrays))]
        settings = AlignSettings(size=first(size), face_fraction=first(face_fraction),
                                 centre_from_top=first(face_centre), backend=first(detector))
        photos = list(zip(names, arrays))
        result = align_photos(photos, settings, progress(len(arrays)))
        report = result.report_text() + "\n" + licences.line(align=first(detector))
        crops = [a.image for a in result.aligned]
        shown = show_pictures(previews.aligned_pictures([(a.name, a.image) for a in result.aligned], photos,
                                                        result.skipped), "align")
        return {"ui": {"text": [report], "images": shown},
                "result": (numpy_to_images(crops), add_meshes(crops, [a.to_dict() for a in result.aligned]),
                           report)}


NODE_CLASS_MAPPINGS = {"FaceChainFaceAlign": FaceAlign}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainFaceAlign": "FaceAlign (FaceChain)"}
