"""TrainFaceLoRA: train a face LoRA on the MODEL/CLIP/VAE the user loaded, save it, and apply it."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from ..facechain_core.errors import FaceChainError
from ..facechain_core.lora_format import kohya_metadata
from ..facechain_core.train import (Backbone, TrainSettings, check_free, defaults, lora_file, require_images,
                                     resolve_captions,
                                     save_lora, train_lora, weights_fingerprint)
from ..facechain_core.train.settings import PRECISIONS
from .common import CATEGORY, progress
from .sockets import CAPTIONS

# ComfyUI's model config classes whose UNet, noise schedule and LoRA keys this trainer handles.
ARCHITECTURES = {"SD15": "sd15", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                 "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}
TEXT_ENCODERS = {"sd15": ["clip_l"], "sdxl": ["clip_l", "clip_g"]}


def _architecture(model) -> str:
    import comfy.model_sampling as sampling
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = getattr(model, "model", None)
    config_name = type(getattr(base, "model_config", None)).__name__
    arch = ARCHITECTURES.get(config_name)
    if arch is None or not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise FaceChainError(f"TrainFaceLoRA trains SD1.5 and SDXL checkpoints; this MODEL is '{config_name}'. "
                             f"Load an SD1.5 or SDXL checkpoint with Load Checkpoint.")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, sampling.ModelSamplingDiscrete) or not isinstance(ms, sampling.EPS) \
            or isinstance(ms, (sampling.V_PREDICTION, sampling.X0)):
        kind = " + ".join(c.__name__ for c in type(ms).__mro__[1:3])
        raise FaceChainError(f"TrainFaceLoRA trains epsilon-prediction models with the standard discrete schedule "
                             f"(SD1.5, SDXL); this MODEL predicts with '{kind}' (v-prediction or another "
                             f"sampling patch). Connect the checkpoint's MODEL directly.")
    return arch


def comfy_backbone(model, clip, vae, image_hw: tuple[int, int]) -> Backbone:
    """The trainer's view of ComfyUI's loaded model: the UNet module, its noise schedule, VAE and CLIP."""
    arch = _architecture(model)
    base = model.model
    unet = base.diffusion_model
    device = model.load_device
    dtype = base.manual_cast_dtype or base.get_dtype()
    sigmas = model.get_model_object("model_sampling").sigmas.detach().float().cpu()
    alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
    h, w = image_hw
    text_encoders = []
    for name in TEXT_ENCODERS[arch]:
        part = getattr(clip.cond_stage_model, name, None)
        if part is not None and hasattr(part, "transformer"):
            text_encoders.append(part.transformer)
    training_clip = {"on": False}

    def predict_noise(x, t, cond):
        extra = {"y": cond["y"].to(dtype)} if "y" in cond else {}
        return unet(x.to(dtype), t.float(), context=cond["context"].to(dtype), transformer_options={}, **extra)

    def encode_images(images):
        return base.process_latent_in(vae.encode(images[..., :3]))

    def encode_one(caption):
        tokens = clip.tokenize(caption)
        if training_clip["on"]:
            # Same calls as CLIP.encode_from_tokens, minus its model loading (the CLIP is already on the
            # device with the UNet; reloading could move the borrowed UNet weights).
            clip.cond_stage_model.reset_clip_options()
            if clip.layer_idx is not None:
                clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
            cond, pooled = clip.cond_stage_model.encode_token_weights(tokens)[:2]
        else:
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        cond = cond[:, :77]  # a batch needs one length: captions are cut to CLIP's 77 tokens
        y = None
        if arch == "sdxl":
            y = base.encode_adm(pooled_output=pooled, width=w, height=h, target_width=w, target_height=h,
                                crop_w=0, crop_h=0)
        return cond.to(device), y

    def encode_text(captions):
        parts = [encode_one(c) for c in captions]
        out = {"context": torch.cat([p[0] for p in parts])}
        if parts[0][1] is not None:
            out["y"] = torch.cat([p[1] for p in parts]).to(device)
        return out

    def prepare(train_text_encoder: bool):
        # As ComfyUI's own trainer does: free the device for training, load the UNet (and CLIP) in full.
        training_clip["on"] = train_text_encoder
        models = [model, clip.patcher] if train_text_encoder else [model]
        comfy.model_management.load_models_gpu(models, memory_required=1e20, force_full_load=True)

    unet_config = base.model_config.unet_config
    return Backbone(arch=arch, unet=unet, unet_naming="ldm", num_res_blocks=_num_res_blocks(unet_config),
                    predict_noise=predict_noise, alphas_cumprod=alphas_cumprod, device=device,
                    encode_images=encode_images, encode_text=encode_text, text_encoders=text_encoders,
                    size_multiple=8 * 2 ** (len(unet_config["channel_mult"]) - 1), prepare=prepare,
                    extra_frozen=[m for m in (getattr(base, "embedder", None),) if m is not None],
                    training_context=lambda train_te: _out_of_place_clip_layers(clip.cond_stage_model, train_te))


@contextmanager
def _out_of_place_clip_layers(clip_model, enabled: bool):
    """ComfyUI's CLIP layers add their residuals in place (``x += ...``), which autograd cannot differentiate
    through. While the text encoder trains, each layer instance runs the same sum out of place."""
    patched = []
    if enabled:
        for m in clip_model.modules():
            if type(m).__name__ == "CLIPLayer" and all(hasattr(m, a) for a in
                                                       ("self_attn", "mlp", "layer_norm1", "layer_norm2")):
                def forward(x, mask=None, optimized_attention=None, _m=m):
                    x = x + _m.self_attn(_m.layer_norm1(x), mask, optimized_attention)
                    return x + _m.mlp(_m.layer_norm2(x))

                m.forward = forward
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _num_res_blocks(unet_config) -> list[int]:
    nrb = unet_config["num_res_blocks"]
    levels = len(unet_config["channel_mult"])
    return list(nrb) if isinstance(nrb, (list, tuple)) else [int(nrb)] * levels


def _loss_text(node_id):
    """Show the current loss under the node (ComfyUI's progress bar carries numbers only)."""
    try:
        from server import PromptServer
    except ImportError:
        return lambda text: None
    last = {"t": 0.0}

    def send(text):
        now = time.monotonic()
        if node_id is not None and now - last["t"] > 0.5:
            last["t"] = now
            PromptServer.instance.send_progress_text(text, node_id)

    return send


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
                                       "step. Larger is faster on a GPU; lower it if memory runs out."}),
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
                                                       "For small GPUs."}),
                "compile": ("BOOLEAN", {"default": d["compile"], "tooltip": "torch.compile the UNet (CUDA only): "
                                        "faster steps after a one-off compile, whose cost the report shows."}),
            },
            "optional": {
                "captions": (CAPTIONS, {"tooltip": "AutoTag's captions (one per image, with the trigger)."}),
                "caption_text": ("STRING", {"multiline": True, "default": "", "tooltip": "Used when no AutoTag "
                                            "captions are connected: one caption per line, in image order, or one "
                                            "line for all. Empty: the trigger alone."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, images, name, trigger, rank, learning_rate, samples, batch_size, flip, seed,
              train_text_encoder, overwrite, precision, gradient_checkpointing, compile, captions=None,
              caption_text="", unique_id=None):
        d = defaults()
        folder = os.path.join(folder_paths.get_folder_paths("loras")[0], d["lora_folder"])
        path = lora_file(folder, name)
        check_free(path, overwrite)  # before training: no wasted minutes
        caption_list, token = resolve_captions(require_images(images), captions, caption_text, trigger)
        settings = TrainSettings().with_(rank=rank, learning_rate=learning_rate, samples=samples,
                                         batch_size=batch_size, flip=flip, seed=seed,
                                         train_text_encoder=train_text_encoder, precision=precision,
                                         gradient_checkpointing=gradient_checkpointing, compile=compile).validate()
        backbone = comfy_backbone(model, clip, vae, (images.shape[1], images.shape[2]))
        bar = progress(settings.steps)
        show = _loss_text(unique_id)

        def report_progress(done, total, info=None):
            bar(done, total, info)
            if info:
                show(info)

        base_hash = weights_fingerprint(backbone.unet.state_dict().items())
        with torch.inference_mode(False):
            result = train_lora(backbone, images, caption_list, settings, report_progress)
        meta = kohya_metadata(backbone.arch, settings.rank, settings.lora_alpha, result.steps, result.samples,
                              token, caption_list, base_hash, train_text_encoder=settings.train_text_encoder,
                              extra={"ss_output_name": path.stem, "facechain_batch_size": settings.batch_size,
                                     "facechain_learning_rate": settings.learning_rate,
                                     "facechain_seed": settings.seed, "facechain_precision": result.precision})
        save_lora(path, result.lora, meta, overwrite)

        # Apply the file as it is on disk, through the same calls as the stock LoraLoader.
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
        rel = os.path.relpath(path, folder_paths.get_folder_paths("loras")[0]).replace(os.sep, "/")
        report = f"LoRA saved: {rel}\ntrigger: {token}\n{result.summary()}"
        return {"ui": {"text": [report]}, "result": (model_lora, clip_lora, rel, report)}


NODE_CLASS_MAPPINGS = {"FaceChainTrainFaceLoRA": TrainFaceLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"FaceChainTrainFaceLoRA": "Train Face LoRA (FaceChain)"}
