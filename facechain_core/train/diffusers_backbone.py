"""The trainer outside ComfyUI: diffusers/transformers modules built from the configs shipped with the pack.

``load_checkpoint`` reads an original-format SD1.5 single-file checkpoint (what ComfyUI and A1111 load)
and converts its weights with diffusers' own converters; nothing is fetched from a hub. The configs in
``data/configs`` describe SD1.5; the UNet's level count, channels, res blocks and transformer depth are read
from the checkpoint's shapes so that SD1.5-shaped test checkpoints load too. ``make_backbone`` turns the
modules into the trainer's ``Backbone`` (the benchmark builds the same modules with random weights).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from .. import data_files
from ..errors import FaceChainError
from .trainer import Backbone

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer."


def config(name: str) -> dict:
    return data_files.settings(f"configs/{name}.json")


def alphas_cumprod() -> torch.Tensor:
    s = config("sd15_scheduler")
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of GPT-2/CLIP byte-level BPE."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


# CLIP's tokenizer files are not shipped with the pack; they come from what is installed. Searched in order:
# $FACECHAIN_CLIP_TOKENIZER (a folder with vocab.json and merges.txt), the ComfyUI this pack sits in
# (comfy/sd1_tokenizer), then the open_clip package's BPE file.
TOKENIZER_ENV = "FACECHAIN_CLIP_TOKENIZER"
CLIP_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2, these merges, 2 special tokens


def _tokenizer_dirs() -> list[Path]:
    dirs = [Path(os.environ[TOKENIZER_ENV])] if os.environ.get(TOKENIZER_ENV) else []
    here = Path(__file__).resolve()
    for parent in list(here.parents)[2:6]:  # .../ComfyUI/custom_nodes/<pack>/facechain_core/train
        dirs.append(parent / "comfy" / "sd1_tokenizer")
    return dirs


def _open_clip_bpe() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


@lru_cache(maxsize=1)
def tokenizer():
    """CLIP's tokenizer from installed files (see _tokenizer_dirs), or a clear error saying where to get them."""
    from transformers import CLIPTokenizer

    vocab = merges = None
    for folder in _tokenizer_dirs():
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
            merges = [ln for ln in lines[1:] if ln.strip()]
            break
    if vocab is None:
        bpe = _open_clip_bpe()
        if bpe is None:
            raise FaceChainError(
                "CLIP's tokenizer files were not found. Set FACECHAIN_CLIP_TOKENIZER to a folder holding vocab.json "
                "and merges.txt (ComfyUI's comfy/sd1_tokenizer is one), or `pip install open_clip_torch`.")
        # open_clip's file is CLIP's merge list; the vocabulary is built from it the way CLIP builds it.
        with gzip.open(bpe, "rt", encoding="utf-8") as f:
            merges = [ln for ln in f.read().splitlines()[1:CLIP_MERGES + 1] if ln.strip()]
        base = list(_bytes_to_unicode().values())
        tokens = base + [b + "</w>" for b in base] + [m.replace(" ", "") for m in merges] + \
            ["<|startoftext|>", "<|endoftext|>"]
        vocab = {t: i for i, t in enumerate(tokens)}
    # transformers 5 builds the fast tokenizer from these in memory (its file arguments gave wrong ids here)
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token="<|endoftext|>",
                         model_max_length=77)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FaceChainError(f"Checkpoint {path} not found.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def detect_arch(sd: dict) -> str:
    if any(k.startswith("conditioner.embedders.") for k in sd) or f"{UNET_PREFIX}label_emb.0.0.weight" in sd:
        raise FaceChainError("This is an SDXL checkpoint: the standalone command trains SD1.5 checkpoints; train "
                             "SDXL with the TrainFaceLoRA node inside ComfyUI.")
    ctx = sd.get(f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    has_clip = any(k.startswith(CLIP_PREFIX) and k.endswith("embeddings.token_embedding.weight") for k in sd)
    if ctx is None or ctx.shape[1] != 768 or not has_clip:
        raise FaceChainError("Not an SD1.5 checkpoint (UNet with 768-wide cross-attention and a CLIP-L text "
                             "encoder, original single-file layout): the standalone command trains SD1.5.")
    return "sd15"


def unet_config_from_checkpoint(sd: dict) -> dict:
    """SD1.5's UNet config with the shapes this checkpoint actually has."""
    cfg = config("sd15_unet")
    blocks: dict[int, set] = {}
    for k in sd:
        m = re.match(re.escape(UNET_PREFIX) + r"input_blocks\.(\d+)\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    levels, current, attention, channels = [], 0, [], []
    for n in sorted(b for b in blocks if b > 0):
        if f"{UNET_PREFIX}input_blocks.{n}.0.op.weight" in sd:  # a downsampler closes the level
            levels.append(current)
            current = 0
            continue
        if current == 0:
            channels.append(sd[f"{UNET_PREFIX}input_blocks.{n}.0.out_layers.3.weight"].shape[0])
            attention.append(1 in blocks[n])
        current += 1
    levels.append(current)
    if len(set(levels)) != 1:
        raise FaceChainError(f"Unsupported UNet layout (res blocks per level {levels}).")
    depth = len({k.split(".transformer_blocks.")[1].split(".")[0]
                 for k in sd if k.startswith(f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.")}) or 1
    cfg.update(
        block_out_channels=channels,
        layers_per_block=levels[0],
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=depth,
        in_channels=sd[f"{UNET_PREFIX}input_blocks.0.0.weight"].shape[1],
        use_linear_projection=sd[f"{UNET_PREFIX}input_blocks.1.1.proj_in.weight"].ndim == 2,
    )
    return cfg


def _encode_batch(x: "torch.Tensor", device) -> int:
    """How many of ``x``'s images one VAE encoder pass may take: the free GPU memory over ComfyUI's estimate of
    an encode's memory per pixel (``vae_encode_bytes_per_pixel`` in memory_plans.json); all of them on a CPU."""
    if torch.device(device).type != "cuda":
        return len(x)
    from .memory import cuda_free_bytes, table

    free = cuda_free_bytes(torch.device(device))  # what ComfyUI counts free: the card's and the allocator's spare

    per_pixel = table()["vae_encode_bytes_per_pixel"] * x.element_size()
    return int(free // (per_pixel * x.shape[2] * x.shape[3]))


def build_modules(unet_cfg: dict | None = None, device="cpu", dtype=torch.float32, parts=("unet", "vae", "text")):
    """Random-weight SD1.5 modules (for benchmarks), or empty shells to load a checkpoint into."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # no advice about from_pretrained: there is no hub here
    try:
        build = {"unet": lambda: UNet2DConditionModel(**(unet_cfg or config("sd15_unet"))),
                 "vae": lambda: AutoencoderKL(**config("sd15_vae")),
                 "text": lambda: CLIPTextModel(CLIPTextConfig(**config("sd15_clip_l")))}
        with torch.device(device):
            return [build[p]().to(dtype=dtype).eval().requires_grad_(False) for p in parts]
    finally:
        diffusers.utils.logging.set_verbosity(level)


def load_checkpoint(path: str | Path, device="cpu", dtype=torch.float32):
    """(unet, vae, text_encoder, original UNet tensors) from an SD1.5 single-file checkpoint."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd = read_state_dict(path)
    detect_arch(sd)
    unet_cfg = unet_config_from_checkpoint(sd)
    unet, vae, text = build_modules(unet_cfg, "cpu", torch.float32)
    _load(unet, convert_ldm_unet_checkpoint(sd, unet_cfg), "UNet")
    _load(vae, convert_ldm_vae_checkpoint(sd, config("sd15_vae")), "VAE")
    # Checkpoints name CLIP's tensors with or without a "text_model." level, and so do transformers versions.
    te = {k[len(CLIP_PREFIX):].removeprefix("text_model."): v for k, v in sd.items() if k.startswith(CLIP_PREFIX)}
    if any(k.startswith("text_model.") for k in text.state_dict()):
        te = {"text_model." + k: v for k, v in te.items()}
    _load(text, te, "text encoder", allow_missing=("text_model.embeddings.position_ids", "embeddings.position_ids"))
    original_unet = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    import diffusers

    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        mods = [m.to(device=device, dtype=dtype) for m in (unet, vae, text)]
    finally:
        diffusers.utils.logging.set_verbosity(level)
    return (*mods, original_unet)


def _load(module, state, what, allow_missing=()):
    state = {k: v.float() for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in allow_missing]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise FaceChainError(f"The checkpoint's {what} does not match SD1.5: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}.")


def encoders(vae, text_encoder, device):
    """(encode_images, encode_text) for the trainer, from a diffusers VAE and a transformers CLIP."""
    tok = tokenizer()
    scale = config("sd15_vae")["scaling_factor"]

    def encode_images(images):  # [B,H,W,3] 0..1
        vae.to(device)  # (back) on the device: prepare() moves it away for training
        x = images.permute(0, 3, 1, 2).to(device=device, dtype=vae.dtype) * 2 - 1
        each = max(1, _encode_batch(x, device))  # as many images per pass as the free memory takes
        return torch.cat([vae.encode(x[i:i + each]).latent_dist.mode().float() for i in range(0, len(x), each)]) * scale

    def encode_text(captions):
        text_encoder.to(device)
        ids = tok(list(captions), padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        return {"context": text_encoder(ids, return_dict=False)[0]}

    return encode_images, encode_text


def offloader(vae, text_encoder, device):
    """Backbone.prepare: once latents and captions are cached, the VAE (and a frozen text encoder) leave the
    GPU, so that training has its memory."""
    def prepare(train_text_encoder: bool):
        if torch.device(device).type == "cuda":
            vae.to("cpu")
            if not train_text_encoder:
                text_encoder.to("cpu")
            torch.cuda.empty_cache()

    return prepare


def make_backbone(unet, vae, text_encoder, device) -> Backbone:
    levels = len(unet.config.block_out_channels)
    encode_images, encode_text = encoders(vae, text_encoder, device)

    def predict_noise(x, t, cond):
        dtype = unet.dtype
        return unet(x.to(dtype), t, encoder_hidden_states=cond["context"].to(dtype), return_dict=False)[0]

    return Backbone(arch="sd15", unet=unet, unet_naming="diffusers",
                    num_res_blocks=[unet.config.layers_per_block] * levels, predict_noise=predict_noise,
                    alphas_cumprod=alphas_cumprod(), device=torch.device(device), encode_images=encode_images,
                    encode_text=encode_text, text_encoders=[text_encoder], size_multiple=8 * 2 ** (levels - 1),
                    prepare=offloader(vae, text_encoder, device))
