"""ApplyStyleLoRA: the face LoRA and a style's LoRA on the loaded model, and the prompts for that style."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.sd
import comfy.utils
import folder_paths

from ..facechain_core import styles, user_paths
from ..facechain_core.errors import FaceChainError
from .common import CATEGORY
from .sockets import CAPTIONS, numpy_to_images

NONE = "none"
_log = logging.getLogger("comfyui-facechain")
_reported: set[str] = set()


def _style_names() -> tuple[list[str], str]:
    cat = styles.catalogue()
    for problem in cat.problems:
        if problem not in _reported:  # say it once in the log, not on every /object_info
            _reported.add(problem)
            _log.warning("FaceChain: skipped style file %s", problem)
    note = ""
    if cat.problems:
        note = " Skipped style files: " + "; ".join(cat.problems)
    return cat.names() or ["(no styles found)"], note


def resolve_lora(name: str, what: str) -> Path:
    """A LoRA path given relative to ComfyUI's loras folders (or absolute inside one of them)."""
    name = user_paths.check_name(name or "", what)
    roots = [Path(p).resolve() for p in folder_paths.get_folder_paths("loras")]
    candidate = Path(name)
    options = [candidate] if candidate.is_absolute() else [r / candidate for r in roots]
    for p in options:
        p = p.resolve()
        if not any(p == r or r in p.parents for r in roots):
            raise FaceChainError(f"The {what} '{name}' is outside ComfyUI's loras folders; use a path inside "
                                 f"models/loras, such as facechain/face.safetensors.")
        if p.is_file():
            return p
    raise FaceChainError(f"The {what} '{name}' was not found in ComfyUI's loras folders (models/loras). "
                         f"Train it first (TrainFaceLoRA) or pick one from the list.")


class ApplyStyleLoRA:
    DESCRIPTION = ("Applies the person's face LoRA and the chosen style's LoRA (with the weights the style pairs "
                   "them at) through ComfyUI's own LoRA patching, and writes the positive and negative prompts: "
                   "trigger word, subject phrase and shared tags, then the style's own text. Connect the prompts "
                   "to CLIP Text Encode and the model to KSampler. Prompt-only styles need no download.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "positive", "negative", "style_preview")
    OUTPUT_TOOLTIPS = ("The model with the face and style LoRAs applied.",
                       "The text encoder with the face and style LoRAs applied (encode the prompts with it).",
                       "Positive prompt for CLIP Text Encode.", "Negative prompt for CLIP Text Encode.",
                       "The style's preview swatch.")
    FUNCTION = "apply"

    def __init__(self):
        self._loaded: dict[str, tuple[float, dict]] = {}

    @classmethod
    def INPUT_TYPES(cls):
        names, note = _style_names()
        loras = [NONE] + folder_paths.get_filename_list("loras")
        default_style = "Studio Headshot" if "Studio Headshot" in names else names[0]
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model (a portrait SD1.5 checkpoint), or TrainFaceLoRA's "
                                    "model."}),
                "clip": ("CLIP", {"tooltip": "The base model's text encoder."}),
                "style": (names, {"default": default_style, "tooltip": "The portrait style. Add your own by "
                                  "dropping a style file into models/facechain/styles." + note}),
                "face_lora": (loras, {"default": NONE, "tooltip": "A face LoRA from the loras folder. Ignored when "
                                      "face_lora_path is connected (a LoRA trained in this same run)."}),
                "face_weight": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "Face LoRA weight; -1 uses the style's pairing (about 0.9-1.0)."}),
                "style_weight": ("FLOAT", {"default": -1.0, "min": -1.0, "max": 2.0, "step": 0.05,
                                           "tooltip": "Style LoRA weight; -1 uses the style's own (about 0.2-0.55). "
                                                      "Prompt-only styles have none."}),
                "trigger": ("STRING", {"default": "", "tooltip": "The face LoRA's trigger word. Empty: taken from "
                                       "the captions input when connected."}),
                "subject": ("STRING", {"default": "", "tooltip": "Subject phrase such as 'a handsome man'. Empty: "
                                       "taken from the captions input when connected."}),
                "shared_tags": ("STRING", {"default": "", "tooltip": "Comma-separated tags the training photos "
                                           "share (hair, smile, ...). Empty: taken from the captions input."}),
                "extra_prompt": ("STRING", {"default": "", "multiline": True,
                                            "tooltip": "Your own words, added after the style's prompt."}),
            },
            "optional": {
                "captions": (CAPTIONS, {"tooltip": "AutoTag's captions: trigger word, subject phrase and shared "
                                        "tags."}),
                "face_lora_path": ("STRING", {"forceInput": True, "tooltip": "TrainFaceLoRA's LoRA path (relative "
                                              "to models/loras); wins over the face_lora list."}),
            },
        }

    def _lora(self, path: Path) -> dict:
        mtime = path.stat().st_mtime
        hit = self._loaded.get(str(path))
        if hit is None or hit[0] != mtime:
            try:
                sd = comfy.utils.load_torch_file(str(path), safe_load=True)
            except Exception as e:  # a truncated or foreign file: say which one
                raise FaceChainError(f"The LoRA file '{path.name}' could not be read ({type(e).__name__}: {e}). "
                                     f"Replace it (train or download it again).") from None
            self._loaded[str(path)] = hit = (mtime, sd)
        return hit[1]

    def apply(self, model, clip, style, face_lora, face_weight, style_weight, trigger, subject, shared_tags,
              extra_prompt, captions=None, face_lora_path=None):
        cat = styles.catalogue()
        plan = styles.plan_style(cat, style, captions, face_weight, style_weight, trigger, subject, shared_tags,
                                 extra_prompt)
        chosen, fw, sw = plan.style, plan.face_weight, plan.style_weight

        lines = [f"Style: {chosen.name}" + (" (prompt only)" if chosen.prompt_only else "")]
        face_path = None
        if face_lora_path and str(face_lora_path).strip():
            face_path = resolve_lora(str(face_lora_path), "face LoRA")
        elif face_lora and face_lora != NONE:
            face_path = resolve_lora(face_lora, "face LoRA")
        # The style LoRA is looked up before anything is patched, so a missing file fails fast.
        style_path = None
        if chosen.style_lora is not None and sw != 0.0:
            style_path = styles.find_style_lora(chosen, folder_paths.get_folder_paths("loras"))
        if face_path is not None and fw != 0.0:
            model, clip = comfy.sd.load_lora_for_models(model, clip, self._lora(face_path), fw, fw)
            lines.append(f"Face LoRA: {face_path.name} at {fw:g}")
        else:
            lines.append("Face LoRA: none" + (f" ({face_path.name} at weight 0)" if face_path is not None else ""))
        if style_path is not None:
            model, clip = comfy.sd.load_lora_for_models(model, clip, self._lora(style_path), sw, sw)
            lines.append(f"Style LoRA: {chosen.style_lora.file} at {sw:g}")

        positive, negative = plan.positive, plan.negative
        lines += [f"Positive: {positive}", f"Negative: {negative}"]
        preview = numpy_to_images([styles.preview_image(chosen)])
        return {"ui": {"text": ["\n".join(lines)]}, "result": (model, clip, positive, negative, preview)}


NODE_CLASS_MAPPINGS = {"FaceChainApplyStyleLoRA": ApplyStyleLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainApplyStyleLoRA": "Apply Style LoRA (FaceChain)"}
