"""Training speed on a GPU: our trainer against a FaceChain-style reference loop, SD1.5 sizes, random weights.

Real SD1.5 weights cannot be fetched here; a training step costs the same with random ones. Everything runs
in one process on one GPU so the numbers compare:

* reference: FaceChain's loop as its script runs it: batch 1, fp16 autocast over fp16 weights with loss
  scaling, the VAE and the text encoder run every step, LoRA rank 4 on to_q/to_k/to_v/to_out.0.
* ours: ``facechain_core.train.train_lora`` (the code the node and the command run) on the same modules,
  in several configurations (batch size, precision mode, gradient checkpointing, torch.compile), and on
  ComfyUI's own UNet class when ComfyUI is importable (``--comfyui DIR``), as the node trains it.
* defaults: a full run at the shipped defaults (2000 samples), the "2000 samples in under 30 s" check.
* sdxl_*: SDXL at 1024x1024 (128x128 latents) through the node's own path: ComfyUI's SDXL model class (UNet
  2.6 B parameters), its SDXL CLIP (L + G) and VAE classes with random fp16 weights, handed to the node's
  ``comfy_backbone`` as CheckpointLoaderSimple hands them over, trained at the trainer's defaults;
  ``sdxl_node_defaults`` also sizes memory to the card as the node does by default (memory "auto"),
  ``sdxl_as_set`` keeps batch 4 without recomputation. They need ``--comfyui``; no reference loop is run for
  them (``--reference-steps 0`` skips the SD1.5 one, and with it the diffusers import).

Usage: python benchmarks/bench_train.py [--configs NAME,...] [--comfyui .cache/ComfyUI] [--json OUT.json]
Prints the command line, ms per training sample, samples/s, peak GPU memory and the speed-up over the reference.
SDXL on the GPU machine: ``python3 benchmarks/bench_train.py --configs sdxl_node_defaults,sdxl_as_set
--reference-steps 0 --comfyui ComfyUI --json sdxl.json`` (peft carried as a wheel, ComfyUI's source as a
tarball; diffusers, av and torchsde are not needed: checked here with them blocked from import). CPU check of
the same code at a tiny SDXL-like UNet and 64 px: ``--cpu-smoke --configs sdxl_node_defaults --reference-steps 0
--comfyui .cache/ComfyUI``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shlex
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from facechain_core.files import write_atomic  # noqa: E402
from facechain_core.train import Backbone, TrainSettings, train_lora  # noqa: E402
from facechain_core.train import diffusers_backbone as db  # noqa: E402
from facechain_core.train.lora_layers import lora_adapters  # noqa: E402

GiB = 2 ** 30
DEVICE = "cuda"  # --cpu-smoke: "cpu", a tiny UNet and fp32, to check this script without a GPU
SMOKE_UNET = dict(block_out_channels=[320], layers_per_block=1, down_block_types=["CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D"])
CAPTIONS = ["fcsks, a handsome man, short hair, smiling", "fcsks, a handsome man, black hair",
            "fcsks, a handsome man, suit, smile", "fcsks, a handsome man"]

# ComfyUI's SDXL base UNet (comfy/model_detection.py's SDXL values), as UNetModel keywords
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2],
                 channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
                 num_head_channels=64, use_spatial_transformer=True, legacy=False, use_temporal_attention=False,
                 use_temporal_resblock=False)
# --cpu-smoke: the same class at a tiny depth (as tests/test_train_sdxl.py builds it)
SMOKE_SDXL_UNET = {**SDXL_UNET, "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
                   "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1}
SDXL_SIZE = 1024
AUTO = "auto (fit the card)"  # the node's default memory mode (facechain_core.train.memory.MEMORY_MODES[0])

# name: (backbone, settings changes)
TF = ["BasicTransformerBlock"]  # checkpoint the transformer blocks only (their activations are the big ones)
# name: (backbone, settings changes). All use CUDA graphs unless named "eager".
CONFIGS = {
    "b1": ("diffusers", dict(batch_size=1)),
    "b4": ("diffusers", dict(batch_size=4)),
    "b8": ("diffusers", dict(batch_size=8)),
    "b16": ("diffusers", dict(batch_size=16)),
    "b32": ("diffusers", dict(batch_size=32)),
    "b1_eager": ("diffusers", dict(batch_size=1, cuda_graphs=False)),
    "b8_eager": ("diffusers", dict(batch_size=8, cuda_graphs=False)),
    "b8_autocast": ("diffusers", dict(batch_size=8, amp_mode="autocast")),
    "b4_ckpt": ("diffusers", dict(batch_size=4, gradient_checkpointing=True)),
    "b4_eager": ("diffusers", dict(batch_size=4, cuda_graphs=False)),
    "b8_ckpt": ("diffusers", dict(batch_size=8, gradient_checkpointing=True)),
    "b16_ckpt": ("diffusers", dict(batch_size=16, gradient_checkpointing=True)),
    "b32_ckpt": ("diffusers", dict(batch_size=32, gradient_checkpointing=True)),
    "b8_ckpt_tf": ("diffusers", dict(batch_size=8, gradient_checkpointing=True, checkpoint_blocks=TF)),
    "b16_ckpt_tf": ("diffusers", dict(batch_size=16, gradient_checkpointing=True, checkpoint_blocks=TF)),
    "b8_ckpt_eager": ("diffusers", dict(batch_size=8, gradient_checkpointing=True, cuda_graphs=False)),
    "b8_fp16": ("diffusers_fp16", dict(batch_size=8, precision="fp16")),
    "b8_compile": ("diffusers", dict(batch_size=8, compile=True, compile_mode="default")),
    "b8_compile_graphs": ("diffusers", dict(batch_size=8, compile=True, compile_mode="reduce-overhead")),
    "comfy_b8_bf16_over_fp16": ("comfy_fp16", dict(batch_size=8, precision="bf16")),
    "comfy_b8_fp16": ("comfy_fp16", dict(batch_size=8, precision="fp16")),
    "comfy_b8_bf16": ("comfy_bf16", dict(batch_size=8, precision="bf16")),
    "comfy_b4_bf16_over_fp16": ("comfy_fp16", dict(batch_size=4, precision="bf16")),
    "comfy_b4_fp16": ("comfy_fp16", dict(batch_size=4, precision="fp16")),
    "comfy_b4_bf16": ("comfy_bf16", dict(batch_size=4, precision="bf16")),
    "comfy_defaults_fp16_weights": ("comfy_fp16", dict(samples=2000)),
    # speed switches of round two, each alone on the node's path at the default batch
    "comfy_b4_cl": ("comfy_fp16", dict(channels_last=True)),
    "comfy_b4_attn_flash": ("comfy_fp16", dict(attention_backend="flash")),
    "comfy_b4_attn_efficient": ("comfy_fp16", dict(attention_backend="efficient")),
    "comfy_b4_attn_cudnn": ("comfy_fp16", dict(attention_backend="cudnn")),
    "comfy_b4_compile": ("comfy_fp16", dict(compile=True)),
    "comfy_b4_lora_half": ("comfy_fp16", dict(lora_compute="activations")),
    "comfy_b8_lora_half": ("comfy_fp16", dict(lora_compute="activations", batch_size=8)),
    "comfy_defaults_lora_half": ("comfy_fp16", dict(samples=2000, lora_compute="activations")),
    "comfy_b4_lora_half_cl": ("comfy_fp16", dict(lora_compute="activations", channels_last=True)),
    "comfy_b4_compile_cl": ("comfy_fp16", dict(compile=True, channels_last=True)),
    # the node's path at the batch `memory: auto` picks on an H200, all else at its defaults (cuDNN's autotuning
    # too, unless --cudnn-benchmark: the runs before round four had it on for every configuration)
    "comfy_b8": ("comfy_fp16", dict(batch_size=8)),
    # larger batches than `memory: auto` picks for the 8 GiB goal: what a sample costs as the batch grows
    "comfy_b12": ("comfy_fp16", dict(batch_size=12)),
    "comfy_b16": ("comfy_fp16", dict(batch_size=16)),
    # round five: the LoRA product fused into the base layers (lora_compute "fused") and the host's training-only
    # forwards (fast_frozen_layers), each alone and neither (the defaults before)
    "comfy_b8_before": ("comfy_fp16", dict(batch_size=8, lora_compute="activations", fast_frozen_layers=False)),
    "comfy_b8_fused_only": ("comfy_fp16", dict(batch_size=8, fast_frozen_layers=False)),
    "comfy_b8_fast_only": ("comfy_fp16", dict(batch_size=8, lora_compute="activations")),
    "comfy_b8_cl": ("comfy_fp16", dict(batch_size=8, channels_last=True)),
    # round six: GroupNorm (+SiLU) by the pack's layout-keeping kernels, with and without channels-last
    "comfy_b8_gn_off": ("comfy_fp16", dict(batch_size=8, group_norm_kernels=False)),
    "comfy_b8_cl_gn_off": ("comfy_fp16", dict(batch_size=8, channels_last=True, group_norm_kernels=False)),
    "comfy_b8_nchw": ("comfy_fp16", dict(batch_size=8, channels_last=False)),
    "comfy_node_defaults_r5": ("comfy_fp16", dict(samples=2000, memory=AUTO, group_norm_kernels=False)),
    # round seven: the LoRA merged into the weight where that moves less memory (lora_compute "merged") and GEGLU
    # by the pack's kernels (geglu_kernels), each alone and neither (round six's LoRA and GEGLU paths; the folded
    # ResBlock and SpatialTransformer additions have no switch: they come with group_norm_kernels)
    "comfy_b8_r6": ("comfy_fp16", dict(batch_size=8, lora_compute="fused", geglu_kernels=False)),
    "comfy_b8_merged_only": ("comfy_fp16", dict(batch_size=8, geglu_kernels=False)),
    "comfy_b8_geglu_only": ("comfy_fp16", dict(batch_size=8, lora_compute="fused")),
    "comfy_node_defaults_r6": ("comfy_fp16", dict(samples=2000, memory=AUTO, lora_compute="fused",
                                                  geglu_kernels=False)),
    "sdxl_node_defaults_r6": ("comfy_sdxl_fp16", dict(memory=AUTO, lora_compute="fused", geglu_kernels=False)),
    "sdxl_node_defaults_r5": ("comfy_sdxl_fp16", dict(memory=AUTO, group_norm_kernels=False)),
    # round eight: the transformer blocks' residual additions and LayerNorms by the pack's kernels
    # (layer_norm_kernels), off (round seven's norms and additions; the round's other changes, the GroupNorm
    # adding the skip connections' gradients and no scale-1 multiplies or factor casts in the merged layers, have
    # no switch and are on in both; the _r6 configurations above have the LayerNorm kernels on)
    "comfy_b8_r7": ("comfy_fp16", dict(batch_size=8, layer_norm_kernels=False)),
    "comfy_node_defaults_r7": ("comfy_fp16", dict(samples=2000, memory=AUTO, layer_norm_kernels=False)),
    "sdxl_node_defaults_r7": ("comfy_sdxl_fp16", dict(memory=AUTO, layer_norm_kernels=False)),
    # round nine: each transformer block's adapters merged ahead and the projections of one input (q, k, v; k, v
    # of the text) as one multiply (block_merge), off
    "comfy_b8_r8": ("comfy_fp16", dict(batch_size=8, block_merge=False)),
    "comfy_node_defaults_r8": ("comfy_fp16", dict(samples=2000, memory=AUTO, block_merge=False)),
    "sdxl_node_defaults_r8": ("comfy_sdxl_fp16", dict(memory=AUTO, block_merge=False)),
    # round ten: the up path's skip joins by the pack's copy kernels (concat_kernels), off (the round's other
    # change, the whole-group GroupNorm kernels for small maps, has no switch: bench_group_norm --split-or-whole)
    "comfy_b8_r9": ("comfy_fp16", dict(batch_size=8, concat_kernels=False)),
    "comfy_node_defaults_r9": ("comfy_fp16", dict(samples=2000, memory=AUTO, concat_kernels=False)),
    "sdxl_node_defaults_r9": ("comfy_sdxl_fp16", dict(memory=AUTO, concat_kernels=False)),
    # the node as it trains by default: 2000 samples, memory "auto" (batch 8 on an H200); and before round five
    "comfy_node_defaults": ("comfy_fp16", dict(samples=2000, memory=AUTO)),
    "comfy_node_defaults_before": ("comfy_fp16", dict(samples=2000, memory=AUTO, lora_compute="activations",
                                                      fast_frozen_layers=False)),
    "comfy_b8_compile": ("comfy_fp16", dict(compile=True, batch_size=8)),
    "comfy_defaults_compile": ("comfy_fp16", dict(samples=2000, compile=True)),
    "comfy_defaults_fp16_weights_fp16": ("comfy_fp16", dict(samples=2000, precision="fp16")),
    "comfy_b8_ckpt_fp16": ("comfy_fp16", dict(batch_size=8, precision="fp16", gradient_checkpointing=True)),
    "comfy_b8_ckpt_bf16_over_fp16": ("comfy_fp16", dict(batch_size=8, precision="bf16", gradient_checkpointing=True)),
    # recompute only the full-resolution blocks (64x64 latent positions), to bring defaults under 8 GiB
    "comfy_defaults_hr": ("comfy_fp16", dict(samples=2000, high_res_checkpoint_tokens=4096)),
    "comfy_defaults_hr_tf": ("comfy_fp16", dict(samples=2000, high_res_checkpoint_tokens=4096, checkpoint_blocks=TF)),
    "full_defaults_hr": ("diffusers", dict(samples=2000, high_res_checkpoint_tokens=4096)),
    # full-length runs (2000 samples) of candidate defaults
    "full_b8_ckpt": ("diffusers", dict(batch_size=8, gradient_checkpointing=True, samples=2000)),
    "full_b16_ckpt": ("diffusers", dict(batch_size=16, gradient_checkpointing=True, samples=2000)),
    "full_b8_ckpt_tf": ("diffusers", dict(batch_size=8, gradient_checkpointing=True, checkpoint_blocks=TF,
                                          samples=2000)),
    # SDXL at 1024x1024 on ComfyUI's classes through the node's comfy_backbone ("memory" is train_lora's argument)
    "sdxl_node_defaults": ("comfy_sdxl_fp16", dict(memory=AUTO)),
    "sdxl_as_set": ("comfy_sdxl_fp16", dict()),
}


def synthetic_faces(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images (low-frequency noise), [n, size, size, 3] in 0..1, like photos to a VAE."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    mid = torch.rand(n, 3, 32, 32, generator=g) * 0.3
    img = torch.nn.functional.interpolate(low, size=size, mode="bicubic") + \
        torch.nn.functional.interpolate(mid, size=size, mode="bilinear")
    return (img / 1.3).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def init_random_(module: torch.nn.Module, seed: int = 0) -> None:
    """Small random weights everywhere (ComfyUI's layers skip initialisation), on whatever device each is."""
    gens = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim <= 1:
                p.fill_(1.0)
            else:
                g = gens.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32) / math.sqrt(fan_in))


def reset_memory():
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GiB if DEVICE == "cuda" else float("nan")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reference_loop(unet, vae, text_encoder, images, steps: int, warmup: int = 3) -> dict:
    """FaceChain's loop: batch 1, fp16 autocast, VAE + text encoder every step, GradScaler, AdamW, rank 4."""
    tok = db.tokenizer()
    alphas = db.alphas_cumprod().to(DEVICE)
    amp = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    scale = db.config("sd15_vae")["scaling_factor"]
    reset_memory()
    with lora_adapters(unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 4, 42, product="fp32") as params:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
        scaler = torch.amp.GradScaler(DEVICE, enabled=DEVICE == "cuda")
        times = []
        for step in range(warmup + steps):
            t0 = time.perf_counter()
            i = step % images.shape[0]
            pixels = images[i:i + 1].permute(0, 3, 1, 2).to(DEVICE) * 2 - 1
            if torch.rand(1).item() < 0.5:
                pixels = pixels.flip(-1)
            ids = tok([CAPTIONS[i % len(CAPTIONS)]], padding="max_length", max_length=77, truncation=True,
                      return_tensors="pt").input_ids.to(DEVICE)
            with torch.autocast(DEVICE, dtype=amp):
                with torch.no_grad():
                    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * scale
                    context = text_encoder(ids, return_dict=False)[0]
                noise = torch.randn_like(latents)
                t = torch.randint(0, 1000, (1,), device=DEVICE)
                a = alphas[t].view(-1, 1, 1, 1)
                noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
                pred = unet(noisy, t, encoder_hidden_states=context, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            loss.item()  # the reference logs the loss every step
            sync()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
    ms = 1000 * sum(times) / len(times)
    return {"ms_per_sample": ms, "samples_per_s": 1000 / ms, "peak_gib": peak_gib()}


class Backbones:
    """Builds each kind of model once (random SD1.5-size weights): {"backbone", "unet", "vae", "text"}."""

    def __init__(self, comfyui: str | None):
        self.comfyui = comfyui
        if comfyui:  # CLIP's tokenizer files for the diffusers path come from the carried ComfyUI
            os.environ.setdefault("FACECHAIN_CLIP_TOKENIZER", str(Path(comfyui) / "comfy" / "sd1_tokenizer"))
        self.cache = {}

    def get(self, kind: str) -> dict:
        if kind not in self.cache:
            self.cache.clear()  # one model family on the GPU at a time
            reset_memory()
            self.cache[kind] = self._build(kind)
        return self.cache[kind]

    def _build(self, kind: str) -> dict:
        dtype = torch.float16 if kind.endswith("fp16") else torch.bfloat16
        if DEVICE == "cpu":
            dtype = torch.float32
        if kind.startswith("diffusers"):
            cfg = {**db.config("sd15_unet"), **SMOKE_UNET} if DEVICE == "cpu" else None
            unet, vae, te = db.build_modules(cfg, device=DEVICE, dtype=dtype)
            return {"backbone": db.make_backbone(unet, vae, te, DEVICE), "unet": unet, "vae": vae, "text": te}
        if kind.startswith("comfy_sdxl"):
            return self._comfy_sdxl(torch.float32 if DEVICE == "cpu" else dtype)
        return self._comfy(dtype)

    def _import_comfy(self) -> None:
        """ComfyUI's modules in this process, its arguments parsed for the device first."""
        if not self.comfyui:
            raise RuntimeError("no --comfyui folder given")
        from comfy_host import import_comfy

        import_comfy(Path(self.comfyui), cpu=DEVICE == "cpu")

    def _comfy_sdxl(self, dtype) -> dict:
        """ComfyUI's SDXL model, CLIP (L + G) and VAE classes with random weights, as CheckpointLoaderSimple
        hands them to TrainFaceLoRA, and the node's own comfy_backbone on them."""
        self._import_comfy()
        import comfy.model_patcher
        import comfy.sd
        import comfy.supported_models
        from bench_generate import pack_module
        from comfy.ldm.models.autoencoder import AutoencoderKL
        from tiny_checkpoint import VAE_DDCONFIG

        model_config = comfy.supported_models.SDXL(dict(SDXL_UNET if DEVICE == "cuda" else SMOKE_SDXL_UNET,
                                                        dtype=dtype))
        device = torch.device(DEVICE)
        with torch.inference_mode():
            model = model_config.get_model({}, "", device=device)
            init_random_(model.diffusion_model)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
        clip = comfy.sd.CLIP(model_config.clip_target(), embedding_directory=None)
        init_random_(clip.cond_stage_model)
        vae_module = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
        init_random_(vae_module)
        vae = comfy.sd.VAE(sd=vae_module.state_dict())
        size = SDXL_SIZE if DEVICE == "cuda" else 64
        backbone = pack_module("nodes.comfy_backbone").comfy_backbone(patcher, clip, vae, (size, size))
        return {"backbone": backbone, "unet": model.diffusion_model, "vae": vae, "text": clip, "size": size}

    def _comfy(self, dtype) -> dict:
        """ComfyUI's SD1.5 UNet class, built under inference mode as the host loads it; trained as the node does."""
        self._import_comfy()
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

        from bench_generate import pack_module
        from tiny_checkpoint import SD15_UNET

        cb = pack_module("nodes.comfy_backbone")  # the node's own host patches

        cfg = dict(SD15_UNET)  # a copy: the CPU smoke run shrinks it
        nrb = list(cfg["num_res_blocks"])
        if DEVICE == "cpu":
            dtype = torch.float32
            nrb = [1]
            cfg.update(num_res_blocks=nrb, channel_mult=[1], transformer_depth=[1, 1],
                       transformer_depth_output=[1, 1])
        with torch.inference_mode():
            unet = UNetModel(**cfg, dtype=dtype, device=DEVICE, operations=comfy.ops.disable_weight_init)
            init_random_(unet)
        unet.eval()
        vae, te = db.build_modules(device=DEVICE, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32,
                                   parts=("vae", "text"))
        encode_images, encode_text = db.encoders(vae, te, DEVICE)

        def predict_noise(x, t, cond):  # as nodes/train_lora.py calls ComfyUI's UNet
            return unet(x.to(dtype), t.float(), context=cond["context"].to(dtype), transformer_options={})

        backbone = Backbone(arch="sd15", unet=unet, unet_naming="ldm", num_res_blocks=nrb,
                            predict_noise=predict_noise, alphas_cumprod=db.alphas_cumprod(),
                            device=torch.device(DEVICE), encode_images=encode_images, encode_text=encode_text,
                            text_encoders=[te], size_multiple=8 * 2 ** (len(cfg["channel_mult"]) - 1),
                            prepare=db.offloader(vae, te, DEVICE),
                            plain_linear=cb.plain_linear,
                            fast_layers=lambda **kernels: cb.fast_frozen_layers(unet, **kernels))
        return {"backbone": backbone, "unet": unet, "vae": vae, "text": te}


def run_ours(backbone, images, settings: TrainSettings, memory: str = "as set") -> dict:
    reset_memory()
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(images.shape[0])]
    r = train_lora(backbone, images, captions, settings, memory=memory)
    steady = r.timings.get("steady_step_s", r.timings["train_s"] / r.steps)
    batch = r.samples // r.steps  # memory "auto" may choose another batch size than the settings'
    out = {"arch": backbone.arch, "unet": type(backbone.unet).__name__, "steps": r.steps, "samples": r.samples,
           "precision": r.precision, "batch": batch, "memory": memory,
           "sizing": next((n for n in r.notes if n.startswith(("memory", "no GPU"))), ""),
           "ms_per_sample": 1000 * steady / batch,
           "samples_per_s": batch / steady, "train_s": r.timings["train_s"],
           "cache_s": r.timings["cache_s"], "peak_gib": r.timings.get("peak_gib", float("nan")),
           "loss_first": r.losses[0], "loss_last": sum(r.losses[-5:]) / len(r.losses[-5:]),
           # a failed capture leaves eager steps: slower, and not what the row claims to measure
           "graph_fallback": next((n for n in r.notes if n.startswith("CUDA graphs unavailable")), "")}
    if "compile_s" in r.timings:
        out["compile_s"] = r.timings["compile_s"]
    return out


def lr_check(backbones, images, samples: int) -> list[dict]:
    """Equal work, different batch: held-out denoising loss after ``samples`` samples (random weights)."""
    backbone = backbones.get("diffusers")["backbone"]
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(images.shape[0])]
    rows = []
    big = TrainSettings().batch_size
    for batch, scaling in ((1, "none"), (big, "none"), (big, "sqrt"), (big, "linear")):
        s = TrainSettings().with_(samples=samples, batch_size=batch, lr_batch_scaling=scaling)
        reset_memory()
        r = train_lora(backbone, images, captions, s)
        tail = r.losses[-max(1, len(r.losses) // 4):]  # the last quarter: the same 25% of samples for every batch
        rows.append({"batch": batch, "lr_scaling": scaling, "lr": s.effective_lr,
                     "loss_last_quarter": sum(tail) / len(tail), "train_s": r.timings["train_s"]})
        print(f"  lr check batch {batch:2d} {scaling:6s} lr {s.effective_lr:.2e}: mean loss over the last quarter "
              f"{rows[-1]['loss_last_quarter']:.4f} ({samples} samples, {r.timings['train_s']:.1f} s)", flush=True)
    return rows


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side (SD1.5 configurations; sdxl_*: 1024)")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per configuration (after the first)")
    ap.add_argument("--reference-steps", type=int, default=20, help="0: no reference loop (and no diffusers)")
    ap.add_argument("--configs", default="b8_fp16,b1,b4,b8,b16,b8_autocast,b8_ckpt,b16_ckpt,defaults",
                    help=f"comma-separated, run in this order: defaults (full run at the shipped defaults), "
                         f"{', '.join(CONFIGS)}")
    ap.add_argument("--comfyui", default=None, help="a ComfyUI folder, for the comfy_* and sdxl_* configurations")
    ap.add_argument("--lr-check", type=int, default=0, help="samples for the equal-work batch/lr check (0: off)")
    ap.add_argument("--time-budget", type=float, default=420, help="skip what would start after this many s")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="cuDNN times its algorithms per shape for every configuration (as the runs before round "
                         "four did); off by default, as the node trains (cudnn_benchmark false)")
    ap.add_argument("--cpu-smoke", action="store_true", help="check the script on the CPU (tiny UNet, tiny sizes)")
    return ap.parse_args()


def versions(with_diffusers: bool) -> dict:
    import transformers

    env = {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__}
    for name in ("diffusers", "peft") if with_diffusers else ("peft",):
        env[name] = __import__(name).__version__
    return env


def plan(name: str, args) -> tuple[str, TrainSettings, str]:
    """(backbone kind, settings, memory mode) of a configuration."""
    if name == "defaults":  # the shipped defaults, full length: the "2000 samples in < 30 s" check
        return "diffusers", TrainSettings().with_(samples=24 if args.cpu_smoke else None), "as set"
    kind, changes = CONFIGS[name]
    changes = dict(changes)
    memory = changes.pop("memory", "as set")
    batch = changes.get("batch_size", TrainSettings().batch_size)
    steps = args.steps + 1 + (10 if changes.get("compile") else 0)
    settings = TrainSettings().with_(**{"samples": batch * steps, **changes})
    if args.cpu_smoke:
        settings = settings.with_(samples=batch * steps)
    return kind, settings, memory


def run_config(name: str, args, backbones: Backbones, images: dict, ref: dict | None) -> dict:
    """One configuration, run and printed; an error is its result."""
    kind, settings, memory = plan(name, args)
    try:
        built = backbones.get(kind)
        size = built.get("size", args.size)
        if size not in images:
            images[size] = synthetic_faces(args.images, size)
        r = run_ours(built["backbone"], images[size], settings, memory)
        r["size"] = size
    except torch.OutOfMemoryError:
        r = {"error": "out of memory"}
        backbones.cache.clear()
    except Exception as e:  # a configuration that cannot run here is reported, not fatal
        traceback.print_exc()
        r = {"error": f"{type(e).__name__}: {e}"[:300]}
    if "ms_per_sample" not in r:
        print(f"{name:26s} {r['error']}", flush=True)
        return r
    extra = f", compile {r['compile_s']:.0f} s" if "compile_s" in r else ""
    if name == "defaults" or name.startswith(("full_", "sdxl_")) or "defaults" in name:
        extra += f", {r['samples']} samples in {r['train_s']:.1f} s training (+{r['cache_s']:.1f} s caching)"
    if kind.startswith("comfy_sdxl"):
        full = TrainSettings().samples  # the shipped length, at the measured steady speed
        r["default_samples_s"] = full * r["ms_per_sample"] / 1000
        extra += (f", {r['size']}x{r['size']}, batch {r['batch']}, {r['sizing'] or 'memory as set'}; "
                  f"{full} samples would take {r['default_samples_s']:.0f} s")
    elif ref is not None:  # the reference is SD1.5: a speed-up only against the same model
        r["speedup"] = ref["ms_per_sample"] / r["ms_per_sample"]
        extra = f"  x{r['speedup']:.1f} vs reference" + extra
    if r.get("graph_fallback"):
        extra += f"  ({r['graph_fallback']})"
    print(f"{name:26s} {r['ms_per_sample']:7.2f} ms/sample {r['samples_per_s']:7.1f} samples/s "
          f"peak {r['peak_gib']:6.2f} GiB  [{r['precision']}]{extra}", flush=True)
    return r


def main() -> None:
    args = parse_args()
    print(f"command: {shlex.join(sys.orig_argv)}", flush=True)
    start = time.time()
    global DEVICE
    if args.cpu_smoke:
        DEVICE = "cpu"
        args.size, args.steps, args.images = 64, 2, 3
        args.reference_steps = min(args.reference_steps, 2)
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --cpu-smoke)"
    env = versions(with_diffusers=args.reference_steps > 0 or "defaults" in args.configs.split(","))
    print(json.dumps(env), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # a configuration's cudnn_benchmark can still turn it on
    images = {args.size: synthetic_faces(args.images, args.size)}
    results = {"command": shlex.join(sys.orig_argv), "env": env, "size": args.size, "images": args.images,
               "cudnn_benchmark": args.cudnn_benchmark, "configs": {}}
    backbones = Backbones(args.comfyui)

    ref = None
    if args.reference_steps > 0:  # the reference, on fp16 modules as FaceChain's script casts them
        m = backbones.get("diffusers_fp16")
        ref = reference_loop(m["unet"], m["vae"], m["text"], images[args.size], args.reference_steps)
        results["reference"] = ref
        print(f"reference (batch 1, fp16 autocast, VAE+TE every step): {ref['ms_per_sample']:.1f} ms/sample, "
              f"{ref['samples_per_s']:.1f} samples/s, peak {ref['peak_gib']:.2f} GiB", flush=True)

    for name in [c for c in args.configs.split(",") if c]:
        if time.time() - start > args.time_budget:
            print(f"{name}: skipped (time budget)", flush=True)
            continue
        results["configs"][name] = run_config(name, args, backbones, images, ref)

    if args.lr_check and time.time() - start < args.time_budget:
        results["lr_check"] = lr_check(backbones, images[args.size], args.lr_check)
    print(f"total {time.time() - start:.0f} s", flush=True)
    if args.json:
        write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(results, indent=1)))


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
