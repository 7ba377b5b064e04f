"""Build a tiny SD1.5-shaped checkpoint with random weights for tests and the offline example.

Stock ``CheckpointLoaderSimple`` recognises an SD1.5 UNet by ``model_channels`` 320 and
``context_dim`` 768, so the UNet keeps those but has a single level with one res block and one
transformer block (~26 M parameters). The VAE and the CLIP-L text encoder are built by the host from
fixed configs, so they keep their full standard shapes. The modules are ComfyUI's own classes, which
gives the exact key names of an original-format SD1.5 file. Every weight is initialised (uninitialised
VAE weights give NaN images).

``--full`` builds the full SD1.5 UNet shape instead (860 M parameters, ~2.1 GB as fp16), for benchmarks on a
GPU machine that has no real checkpoint: speed does not depend on the weights. It is built on the CPU, on the
machine that uses it (not carried).

Usage: ``python scripts/tiny_checkpoint.py [--full] [--comfy COMFYUI_DIR] [OUT.safetensors]`` (without
``--comfy``, ComfyUI 0.3.75 is unpacked into the cache as the tests do).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SEED = 1234
# The UNet of the tiny model, as UNetModel keywords (SD1.5 values except the depth).
TINY_UNET = dict(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[1],
    channel_mult=[1], num_heads=8, num_head_channels=-1,
    use_spatial_transformer=True, transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, legacy=False,
)
# The full SD1.5 UNet (comfy/model_detection.py's SD15 values), as UNetModel keywords: the benchmarks' model.
SD15_UNET = dict(
    image_size=32, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=[2, 2, 2, 2],
    channel_mult=[1, 2, 4, 4], num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, legacy=False,
)
VAE_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768,
)


def _init_(module, gen):
    import torch

    for name, p in module.named_parameters():
        with torch.no_grad():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:  # norm scales
                p.fill_(1.0)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, (1.0 / fan_in) ** 0.5, generator=gen)


def save_random_checkpoint(out: Path, unet_config: dict) -> Path:
    """An original-format SD1.5 single file with random weights and the given UNet (ComfyUI importable and
    its argument parsing done). fp16, written to a temporary name and renamed."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    import comfy.ops
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(SEED)  # transformers initialises CLIP from the global generator
    gen = torch.Generator().manual_seed(SEED)
    unet = UNetModel(**unet_config, operations=comfy.ops.disable_weight_init)
    vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    for m in (unet, vae):
        _init_(m, gen)
    sd = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae),
                           ("cond_stage_model.transformer.", clip)):
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                sd[prefix + k] = v.detach().to(torch.float16).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata={"facechain_random": "1", "seed": str(SEED)})
    os.replace(tmp, out)
    return out


def build(out: Path, comfy_dir: Path, full: bool = False) -> Path:
    """The tiny (or with ``full`` the full-size) checkpoint, from a fresh process (parses ComfyUI's arguments
    for the CPU; this script's folder, where comfy_host is, is on sys.path as it runs)."""
    from comfy_host import import_comfy

    import_comfy(comfy_dir, cpu=True)
    return save_random_checkpoint(out, SD15_UNET if full else TINY_UNET)


def ensure(out: Path, full: bool = False, comfy_dir: Path | None = None, announce: bool = False) -> float:
    """``out`` built unless it is there, by this script in a child process on the CPU (it parses ComfyUI's
    arguments, which a test or benchmark process must not); the seconds spent building it."""
    if out.is_file():
        return 0.0
    import shlex
    import subprocess
    import time

    cmd = [sys.executable, str(Path(__file__).resolve()), *(["--comfy", str(comfy_dir)] if comfy_dir else []),
           *(["--full"] if full else []), str(out)]
    if announce:
        print(f"building the checkpoint: {shlex.join(cmd)}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return time.perf_counter() - t


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", type=Path, help="where to write it (default: .cache/tiny_sd15.safetensors, "
                    "or .cache/random_sd15.safetensors with --full)")
    ap.add_argument("--full", action="store_true", help="the full SD1.5 UNet shape instead of the tiny one")
    ap.add_argument("--comfy", type=Path, help="ComfyUI's source folder (default: unpack 0.3.75 into the cache)")
    args = ap.parse_args()
    if args.comfy is None:
        from comfy_host import COMFY_DIR, install_comfyui

        args.comfy = install_comfyui(COMFY_DIR)
    name = "random_sd15.safetensors" if args.full else "tiny_sd15.safetensors"
    target = args.out or here.parent / ".cache" / name
    print(build(target.resolve(), args.comfy.resolve(), args.full))


if __name__ == "__main__":
    main()
