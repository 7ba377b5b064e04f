"""The trainer's view of a model ComfyUI loaded (not a node): the UNet, its noise schedule, VAE and CLIP as a
``facechain_core.train.Backbone``, the host patches training needs, and applying a LoRA file as LoraLoader
does. All the ComfyUI model surgery of TrainFaceLoRA lives here; the core never imports ComfyUI."""

from __future__ import annotations

from contextlib import contextmanager

import torch

import comfy.model_management
import comfy.sd
import comfy.utils

from ..facechain_core.errors import FaceChainError
from ..facechain_core.train import Backbone

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


def apply_lora_file(model, clip, path):
    """The LoRA file as it is on disk applied at strength 1, through the same calls as the stock LoraLoader."""
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
