"""FaceChain outside ComfyUI: one SD1.5 single-file checkpoint in diffusers modules, trained on and sampled from.

The modules come from ``train.diffusers_backbone.load_checkpoint`` (configs shipped with the pack, the UNet's
shape read from the checkpoint, nothing fetched from a hub). One process keeps one loaded checkpoint
(``load_models``), so a worker that handles many people loads it once. Training borrows the UNet and gives it
back unchanged; generation adds the face and style LoRAs into the weights for one call and takes them out again.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from .errors import FaceChainError
from . import licences
from .data_files import settings as data_settings
from .lora_format import kohya_metadata
from .progress import ProgressFn


@dataclass
class Models:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    base_hash: str  # the UNet fingerprint that the LoRA metadata records
    path: str


def choose_device(device: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype: bf16 (fp16 without bf16 support) on a GPU unless fp32 is asked; fp32 on CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise FaceChainError("--device cuda was asked for but torch sees no GPU; use --device cpu or auto.")
    if device != "cuda" or precision == "fp32":
        return torch.device(device), torch.float32
    if precision in ("auto", "bf16") and torch.cuda.is_bf16_supported():
        return torch.device(device), torch.bfloat16
    return torch.device(device), torch.float16


def load_models(checkpoint: str | Path, device: torch.device, dtype: torch.dtype) -> Models:
    """The checkpoint's UNet, VAE and text encoder, held in the pack's model cache: one checkpoint per device
    and dtype, loaded again when another file is asked for or the file changes."""
    from . import model_cache

    path = Path(checkpoint).resolve()
    if not path.is_file():
        raise FaceChainError(f"Checkpoint '{checkpoint}' not found: give an SD1.5 single-file checkpoint "
                             f"(.safetensors).")
    return model_cache.cached(("standalone sd15", str(device), str(dtype)),
                              lambda: _load_models(path, device, dtype), files=[path])


def _load_models(path: Path, device: torch.device, dtype: torch.dtype) -> Models:
    from .train import diffusers_backbone as db
    from .train import weights_fingerprint

    unet, vae, text, original_unet = db.load_checkpoint(path, device=device, dtype=dtype)
    return Models(unet, vae, text, device, dtype, weights_fingerprint(original_unet.items()), str(path))


def train_and_save(models: Models, images: np.ndarray, captions: Sequence[str], trigger: str, settings,
                   out: Path, names: Sequence[str], overwrite: bool, progress: ProgressFn | None = None,
                   memory: str = "as set"):
    """Train a face LoRA on ``images`` ([N,H,W,3] uint8) and write it with kohya keys and metadata."""
    from .train import save_lora, train_lora
    from .train import diffusers_backbone as db

    backbone = db.make_backbone(models.unet, models.vae, models.text_encoder, models.device)
    pixels = torch.from_numpy(np.asarray(images).astype(np.float32) / 255.0)
    result = train_lora(backbone, pixels, list(captions), settings, progress, memory)
    meta = kohya_metadata("sd15", settings.rank, settings.lora_alpha, result.steps, result.samples, trigger,
                          captions, models.base_hash, train_text_encoder=settings.train_text_encoder,
                          extra={"ss_output_name": Path(out).stem,
                                 "facechain_batch_size": result.samples // result.steps,
                                 "facechain_learning_rate": settings.learning_rate, "facechain_seed": settings.seed,
                                 "facechain_precision": result.precision, "facechain_images": ",".join(names),
                                 **licences.metadata(licences.models_for(train="lora"))})
    save_lora(Path(out), result.lora, meta, overwrite)
    return result


# --- generation --------------------------------------------------------------------------------------------

def make_scheduler(sampler_name: str, scheduler: str):
    """The diffusers scheduler for ComfyUI's (sampler_name, scheduler) pair, on SD1.5's noise schedule."""
    import diffusers

    from .train.diffusers_backbone import config

    table = data_settings("samplers.json")
    if sampler_name not in table["samplers"] or scheduler not in table["schedulers"]:
        raise FaceChainError(f"The standalone pipeline samples with {', '.join(table['samplers'])} and schedules "
                             f"{', '.join(table['schedulers'])}; got sampler '{sampler_name}', scheduler "
                             f"'{scheduler}' (add a mapping to facechain_core/data/samplers.json).")
    entry = table["samplers"][sampler_name]
    options = {**config("sd15_scheduler"), **table["common"], **entry["options"], **table["schedulers"][scheduler]}
    return getattr(diffusers, entry["class"]).from_config(options)


def lora_targets(unet: torch.nn.Module, text_encoder: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """kohya layer name -> module, for the diffusers UNet (SD1.5 LoRAs use diffusers block names) and CLIP."""
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            out["lora_unet_" + name.replace(".", "_")] = m
    for name, m in text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear):
            full = name if name.startswith("text_model.") else "text_model." + name
            out["lora_te_" + full.replace(".", "_")] = m
    return out


def layer_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The kohya layer names in a LoRA state dict."""
    return sorted({k.rsplit(".lora_down.weight", 1)[0] for k in state if k.endswith(".lora_down.weight")})


def _delta(state: Mapping[str, torch.Tensor], key: str, module: torch.nn.Module) -> torch.Tensor | None:
    down = state[f"{key}.lora_down.weight"].float()
    up = state[f"{key}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(state[f"{key}.alpha"]) if f"{key}.alpha" in state else float(rank)
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        return None  # a 3x3 (LoCon) layer: not what FaceChain's LoRAs hold
    delta = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1) * (alpha / rank)
    return delta.reshape(module.weight.shape) if delta.numel() == module.weight.numel() else None


@contextmanager
def applied_loras(models: Models, loras: Sequence[tuple[str, Mapping[str, torch.Tensor], float]]) -> Iterator[list]:
    """Add each (label, kohya state, weight) into the weights; the originals come back on exit.

    Yields one report line per LoRA. A LoRA none of whose layers exist in this model is an error."""
    targets = lora_targets(models.unet, models.text_encoder)
    saved: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
    lines = []
    try:
        for label, state, weight in loras:
            names = layer_names(state)
            used = 0
            for key in names:
                module = targets.get(key)
                delta = _delta(state, key, module) if module is not None else None
                if delta is None:
                    continue
                saved.setdefault(id(module), (module, module.weight.detach().clone()))
                w = module.weight
                w.data = (w.data.float() + weight * delta.to(w.device)).to(w.dtype)
                used += 1
            if names and not used:
                raise FaceChainError(f"The {label} has no layer this SD1.5 model has ({len(names)} layers, e.g. "
                                     f"{names[0]}); is it a LoRA for another base model?")
            lines.append(f"{label}: {used} of {len(names)} layers at {weight:g}")
        yield lines
    finally:
        for module, original in saved.values():
            module.weight.data = original


def read_lora(path: str | Path, label: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # a truncated or foreign file: say which one
        raise FaceChainError(f"The {label} '{Path(path).name}' could not be read ({type(e).__name__}: {e}). "
                             f"Replace it (train or download it again).") from None


def generate(models: Models, positive: str, negative: str, width: int, height: int, count: int, steps: int,
             cfg: float, seed: int, sampler_name: str, scheduler: str) -> list[np.ndarray]:
    """``count`` images (HxWx3 uint8) from the model as it is now (LoRAs applied by the caller)."""
    import diffusers
    from diffusers import StableDiffusionPipeline

    from .train.diffusers_backbone import tokenizer

    for side in (width, height):
        if side % 8:
            raise FaceChainError(f"Image sides must be multiples of 8 (got {width}x{height}).")
    models.vae.to(models.device)  # training moved the VAE and the text encoder off the GPU
    models.text_encoder.to(models.device)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # no warnings about the absent safety checker
    try:
        pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoder, tokenizer=tokenizer(),
                                       unet=models.unet, scheduler=make_scheduler(sampler_name, scheduler),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator(device=models.device).manual_seed(int(seed))
        with torch.inference_mode():
            out = pipe(prompt=positive, negative_prompt=negative, width=width, height=height,
                       num_inference_steps=steps, guidance_scale=cfg, num_images_per_prompt=count,
                       generator=gen, output_type="np").images
    finally:
        diffusers.utils.logging.set_verbosity(level)
    return [np.clip(np.nan_to_num(im) * 255.0 + 0.5, 0, 255).astype(np.uint8) for im in out]
