"""LoRA weights in the kohya format that ComfyUI's LoraLoader, A1111, Forge and kohya's scripts load.

A trained layer is ``(down [rank, in], up [out, rank], alpha)`` keyed by its module path inside the UNet or
the text encoder. kohya names a layer ``lora_unet_<path with _ for .>`` (``lora_te_`` / ``lora_te1_`` /
``lora_te2_`` for text encoders) and stores ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``;
the applied change is ``up @ down * alpha / rank``.

Which UNet path is used follows what those tools write for each architecture: SD1.5 LoRAs use the
diffusers block names (``down_blocks.0.attentions.0...``), SDXL LoRAs the original ones
(``input_blocks.4.1...``). ComfyUI's UNet carries the original names, diffusers' the diffusers names, so
``unet_path_for_kohya`` converts between the two for the attention blocks this trainer touches.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import torch

ARCH_UNET_NAMING = {"sd15": "diffusers", "sdxl": "ldm"}
TEXT_ENCODER_PREFIXES = {"sd15": ["lora_te"], "sdxl": ["lora_te1", "lora_te2"]}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def _level_of(n: int, counts: Sequence[int], start: int, gap: int) -> tuple[int, int] | None:
    """Block index n -> (level, index inside the level); ``gap`` blocks (a downsampler) follow each level."""
    for level, count in enumerate(counts):
        if start <= n < start + count:
            return level, n - start
        start += count + gap
    return None


def ldm_to_diffusers(path: str, num_res_blocks: Sequence[int]) -> str:
    """``input_blocks.1.1.transformer_blocks.0.attn1.to_q`` -> ``down_blocks.0.attentions.0.transformer_...``.

    Only paths inside the spatial transformers (what LoRA targets here) are converted. ``num_res_blocks``
    lists the res blocks of each level, top level first (SD1.5: [2, 2, 2, 2]).
    """
    m = re.match(r"input_blocks\.(\d+)\.1\.(.+)$", path)
    if m:
        found = _level_of(int(m.group(1)), list(num_res_blocks), 1, gap=1)
        if found:
            return f"down_blocks.{found[0]}.attentions.{found[1]}.{m.group(2)}"
    m = re.match(r"middle_block\.1\.(.+)$", path)
    if m:
        return f"mid_block.attentions.0.{m.group(1)}"
    m = re.match(r"output_blocks\.(\d+)\.1\.(.+)$", path)
    if m:
        # every output level has one block more than its input level (the skip of the downsampler)
        found = _level_of(int(m.group(1)), [c + 1 for c in reversed(num_res_blocks)], 0, gap=0)
        if found:
            return f"up_blocks.{found[0]}.attentions.{found[1]}.{m.group(2)}"
    raise ValueError(f"no diffusers name for UNet module {path!r}")


def diffusers_to_ldm(path: str, num_res_blocks: Sequence[int]) -> str:
    """The inverse of ``ldm_to_diffusers``."""
    counts = list(num_res_blocks)
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", path)
    if m:
        level, i = int(m.group(1)), int(m.group(2))
        return f"input_blocks.{1 + sum(c + 1 for c in counts[:level]) + i}.1.{m.group(3)}"
    m = re.match(r"mid_block\.attentions\.0\.(.+)$", path)
    if m:
        return f"middle_block.1.{m.group(1)}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)$", path)
    if m:
        level, i = int(m.group(1)), int(m.group(2))
        rev = [c + 1 for c in reversed(counts)]
        return f"output_blocks.{sum(rev[:level]) + i}.1.{m.group(3)}"
    raise ValueError(f"no original name for UNet module {path!r}")


def unet_path_for_kohya(path: str, arch: str, naming: str, num_res_blocks: Sequence[int]) -> str:
    want = ARCH_UNET_NAMING[arch]
    if naming == want:
        return path
    if naming == "ldm":
        return ldm_to_diffusers(path, num_res_blocks)
    return diffusers_to_ldm(path, num_res_blocks)


def kohya_state_dict(unet_layers: Mapping[str, tuple], text_layers: Sequence[Mapping[str, tuple]], arch: str,
                     unet_naming: str, num_res_blocks: Sequence[int],
                     dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Build the kohya state dict.

    ``unet_layers``: module path inside the UNet -> (down, up, alpha). ``text_layers``: one mapping per text
    encoder (in kohya's te1, te2 order), module path inside a transformers-style CLIP text model
    (``text_model.encoder.layers.0.self_attn.q_proj``) -> (down, up, alpha).
    """
    out: dict[str, torch.Tensor] = {}

    def put(key: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> None:
        out[f"{key}.lora_down.weight"] = down.detach().to("cpu", dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.detach().to("cpu", dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(float(alpha), dtype=dtype)

    for path, (down, up, alpha) in sorted(unet_layers.items()):
        kpath = unet_path_for_kohya(path, arch, unet_naming, num_res_blocks)
        put("lora_unet_" + kpath.replace(".", "_"), down, up, alpha)
    prefixes = TEXT_ENCODER_PREFIXES[arch]
    if len(text_layers) > len(prefixes):
        raise ValueError(f"{arch} has {len(prefixes)} text encoders, got LoRA layers for {len(text_layers)}")
    for prefix, layers in zip(prefixes, text_layers):
        for path, (down, up, alpha) in sorted(layers.items()):
            # transformers 5 dropped the "text_model." level of CLIPTextModel; kohya's names keep it
            path = path if path.startswith("text_model.") else "text_model." + path
            put(f"{prefix}_" + path.replace(".", "_"), down, up, alpha)
    return out


def kohya_metadata(arch: str, rank: int, alpha: float, steps: int, samples: int, trigger: str,
                   captions: Iterable[str], base_model_hash: str, extra: Mapping[str, str] | None = None,
                   train_text_encoder: bool = False) -> dict[str, str]:
    """Safetensors metadata: kohya's ``ss_*`` keys that tools read, and FaceChain's own."""
    import json

    captions = list(captions)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": BASE_MODEL_VERSION[arch],
        "ss_steps": str(int(steps)),
        "ss_num_train_images": str(len(captions)),
        "ss_network_train_unet_only": "False" if train_text_encoder else "True",
        "modelspec.architecture": {"sd15": "stable-diffusion-v1/lora",
                                   "sdxl": "stable-diffusion-xl-v1-base/lora"}[arch],
        "modelspec.trigger_phrase": trigger,
        "facechain_trigger": trigger,
        "facechain_captions": json.dumps(captions, ensure_ascii=False),
        "facechain_base_model_hash": base_model_hash,
        "facechain_steps": str(int(steps)),
        "facechain_samples": str(int(samples)),
        "facechain_rank": str(int(rank)),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta
