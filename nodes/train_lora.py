"""TrainFaceLoRA: train a face LoRA on the MODEL/CLIP/VAE the user loaded, save it, and apply it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

import folder_paths

from ..facechain_core import licences, previews
from ..facechain_core.errors import FaceChainError
from ..facechain_core.lora_format import kohya_metadata
from ..facechain_core.train import (TrainSettings, check_free, defaults, lora_file, require_images,
                                     resolve_captions, save_lora, train_lora, weights_fingerprint)
from ..facechain_core.train.memory import MEMORY_MODES
from ..facechain_core.train.save import INPUTS_KEY, REUSED, inputs_fingerprint, trained_from
from ..facechain_core.train.settings import PRECISIONS
from .comfy_backbone import apply_lora_file, comfy_backbone
from .common import CATEGORY, TrainingProgress, show_pictures
from .sockets import CAPTIONS


class TrainFaceLoRA:
    DESCRIPTION = ("Trains a face LoRA (FaceChain's recipe, batched and cached for speed) on the loaded checkpoint "
                   "from the aligned face crops and their captions, saves it as models/loras/facechain/<name>."
                   "safetensors (kohya keys: LoraLoader, A1111 and Forge load it), and outputs the MODEL and CLIP "
                   "with the new LoRA applied exactly as LoraLoader would. The input MODEL is left unchanged.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "STRING")
    RETURN_NAMES = ("model", "clip", "lora_name", "report")
    OUTPUT_TOOLTIPS = ("The input MODEL with the new LoRA applied (strength 1).",
                       "The input CLIP with the LoRA applied (only changes if the text encoder was trained).",
                       "The LoRA file, relative to models/loras (e.g. facechain/face.safetensors).",
                       "Steps, loss, timings and where the file went.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        d = defaults()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint's MODEL from Load Checkpoint (SD1.5 or SDXL). "
                                    "Trained in place without a copy, and left unchanged."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's CLIP: encodes the captions."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE: encodes each image once."}),
                "images": ("IMAGE", {"tooltip": "The prepared face crops (FaceAlign / SkinRetouch / HumanParse), one "
                                     "batch; sides a multiple of 64 (512 as FaceChain)."}),
                "name": ("STRING", {"default": d["default_name"], "tooltip": "File name of the LoRA inside "
                                    "models/loras/facechain (no folders)."}),
                "trigger": ("STRING", {"default": "fcsks", "tooltip": "The made-up word the LoRA learns as this "
                                       "person; used when no AutoTag captions are connected, and put in front of "
                                       "typed captions that lack it."}),
                "rank": ("INT", {"default": d["rank"], "min": 1, "max": 128, "tooltip": "LoRA rank. FaceChain "
                                 "really trained rank 4 (its script asked for 32)."}),
                "learning_rate": ("FLOAT", {"default": d["learning_rate"], "min": 1e-6, "max": 1e-2, "step": 1e-5,
                                            "round": False, "tooltip": "Learning rate at batch size 1 (FaceChain: "
                                            "1e-4); scaled by sqrt(batch size), cosine decay to 0."}),
                "samples": ("INT", {"default": d["samples"], "min": 1, "max": 100000, "tooltip": "Total training "
                                    "samples seen: the amount of work (FaceChain: 200 epochs x 10 photos = 2000). "
                                    "Steps = samples / batch size."}),
                "batch_size": ("INT", {"default": d["batch_size"], "min": 1, "max": 64, "tooltip": "Samples per "
                                       "step. Larger is faster on a GPU. With memory 'auto' the trainer chooses it "
                                       "from the GPU's free memory; 'as set' uses this value."}),
                "flip": ("BOOLEAN", {"default": d["flip"], "tooltip": "Randomly mirror images (FaceChain does)."}),
                "seed": ("INT", {"default": d["seed"], "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the "
                                 "LoRA initialisation, image order, flips, noise and timesteps."}),
                "train_text_encoder": ("BOOLEAN", {"default": d["train_text_encoder"], "tooltip": "Also train LoRA on "
                                                   "the text encoder's attention (FaceChain trained the UNet only)."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace an existing LoRA of the same name. "
                                          "Off: an existing file is an error and is never touched."}),
                "precision": (list(PRECISIONS), {"default": d["precision"], "tooltip": "auto: the 16-bit type the "
                                                 "model "
                                                 "is loaded in (fp16 with loss scaling, or bf16), else bf16 where "
                                                 "the GPU supports it; always fp32 on the CPU."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": d["gradient_checkpointing"], "tooltip":
                                                       "Recompute activations in backward: less memory, ~30% slower. "
                                                       "For small GPUs; memory 'auto' turns it on when needed "
                                                       "(and keeps it on when set)."}),
                "compile": ("BOOLEAN", {"default": d["compile"], "tooltip": "torch.compile the UNet (CUDA only): "
                                        "faster steps after a one-off compile, whose cost the report shows."}),
            },
            "optional": {
                "captions": (CAPTIONS, {"tooltip": "AutoTag's captions (one per image, with the trigger)."}),
                "caption_text": ("STRING", {"multiline": True, "default": "", "tooltip": "Used when no AutoTag "
                                            "captions are connected: one caption per line, in image order, or one "
                                            "line for all. Empty: the trigger alone."}),
                "memory": (list(MEMORY_MODES), {"default": MEMORY_MODES[0], "tooltip": "auto: before training, "
                           "read the GPU's free memory and pick the fastest batch size and recomputation that "
                           "fit (an error before any work if nothing fits). as set: use batch_size and "
                           "gradient_checkpointing as given; the report warns if they may not fit."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, name=None, **_):
        """The saved file's state: a LoRA deleted (or replaced) since the last run makes the node run again.
        With the name connected (not known yet), the state of the whole facechain LoRA folder."""
        folder = lora_folder()
        try:
            files = [lora_file(folder, name)] if isinstance(name, str) else sorted(folder.glob("*.safetensors"))
        except FaceChainError:
            return float("nan")
        return "|".join(f"{p.name}:{p.stat().st_mtime_ns}" if p.is_file() else f"{p.name}:missing" for p in files)

    def train(self, model, clip, vae, images, name, trigger, rank, learning_rate, samples, batch_size, flip, seed,
              train_text_encoder, overwrite, precision, gradient_checkpointing, compile, captions=None,
              caption_text="", memory=MEMORY_MODES[0], unique_id=None):
        path = lora_file(lora_folder(), name)
        check_free(path, overwrite, reusable=True)  # before any work: no wasted minutes
        caption_list, token = resolve_captions(require_images(images), captions, caption_text, trigger)
        settings = TrainSettings().with_(rank=rank, learning_rate=learning_rate, samples=samples,
                                         batch_size=batch_size, flip=flip, seed=seed,
                                         train_text_encoder=train_text_encoder, precision=precision,
                                         gradient_checkpointing=gradient_checkpointing, compile=compile).validate()
        backbone = comfy_backbone(model, clip, vae, (images.shape[1], images.shape[2]))
        base_hash = weights_fingerprint(backbone.unet.state_dict().items())
        fingerprint = inputs_fingerprint(images, caption_list, dataclasses.asdict(settings), base_hash)
        if path.is_file() and trained_from(path) == fingerprint:
            return self._output(model, clip, path, token, REUSED)
        check_free(path, overwrite)
        progress = TrainingProgress(settings.steps, unique_id)
        with torch.inference_mode(False):
            result = train_lora(backbone, images, caption_list, settings, progress, memory,
                                host_free_bytes(backbone), on_losses=progress.losses)
        meta = kohya_metadata(backbone.arch, settings.rank, settings.lora_alpha, result.steps, result.samples,
                              token, caption_list, base_hash, train_text_encoder=settings.train_text_encoder,
                              extra={"ss_output_name": path.stem,
                                     "facechain_batch_size": result.samples // result.steps,
                                     "facechain_learning_rate": settings.learning_rate,
                                     "facechain_seed": settings.seed, "facechain_precision": result.precision,
                                     INPUTS_KEY: fingerprint, **licences.metadata(licences.models_for(train="lora"))})
        save_lora(path, result.lora, meta, overwrite)
        curve = show_pictures([previews.loss_curve(result.losses, result.steps)], "loss")
        return self._output(model, clip, path, token, result.summary(), curve)

    @staticmethod
    def _output(model, clip, path, token, summary, curve=()):
        model_lora, clip_lora = apply_lora_file(model, clip, path)
        rel = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0]).replace(os.sep, "/")
        report = f"LoRA saved: {rel}\ntrigger: {token}\n{summary}\n{licences.line(train='lora')}"
        ui = {"text": [report], "images": list(curve)} if curve else {"text": [report]}
        return {"ui": ui, "result": (model_lora, clip_lora, rel, report)}


def host_free_bytes(backbone):
    """ComfyUI's reading of free memory on the training device, after unloading the models it can unload
    (other checkpoints) towards what the fastest plan needs, as ComfyUI itself does before sampling."""
    import comfy.model_management as mm

    def free(needed: int) -> int:
        mm.free_memory(needed, backbone.device)
        return int(mm.get_free_memory(backbone.device))

    return free


def lora_folder() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0]) / defaults()["lora_folder"]

NODE_CLASS_MAPPINGS = {"FaceChainTrainFaceLoRA": TrainFaceLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainTrainFaceLoRA": "Train Face LoRA (FaceChain)"}
