"""The LoRA training loop, for any SD1.5/SDXL-style UNet that a ``Backbone`` describes.

The loop is FaceChain's recipe (epsilon-prediction MSE, uniform timesteps, random flip, AdamW, cosine
learning rate) made fast: every image is encoded by the VAE once (and once mirrored, so that the flip
costs nothing per step), captions are encoded once when the text encoder is frozen, samples go through
in batches, matmuls run in bf16 (fp16 with loss scaling on cards without bf16, fp32 on the CPU), the
loss is read one step late so the GPU never waits for the Python side, and the UNet can be compiled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..errors import FaceChainError
from ..lora_format import kohya_state_dict
from ..progress import ProgressFn, no_progress
from .captions import require_images
from .lora_layers import borrowed_weights, gradient_checkpointing, lora_adapters, lora_weights
from .settings import TrainSettings

Cond = dict  # {"context": [B, 77, C], "y": [B, D] (SDXL only)}


@dataclass
class Backbone:
    """What the trainer needs from a host (ComfyUI's loaded model, or diffusers modules)."""

    arch: str  # "sd15" or "sdxl"
    unet: torch.nn.Module  # attention projections named to_q / to_k / to_v / to_out.0
    unet_naming: str  # "ldm" (ComfyUI, original checkpoints) or "diffusers"
    num_res_blocks: Sequence[int]  # per level, for kohya key names
    predict_noise: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]  # (x_t, t, cond) -> eps
    alphas_cumprod: torch.Tensor  # [1000] training noise schedule
    device: torch.device
    encode_images: Callable[[torch.Tensor], torch.Tensor]  # [B,H,W,3] 0..1 -> scaled latents [B,4,h,w]
    encode_text: Callable[[list], Cond]  # captions -> cond with batch dimension
    text_encoders: Sequence[torch.nn.Module] = ()  # CLIP text models (kohya te1, te2 order), for TE LoRA
    size_multiple: int = 64  # image sides must be multiples of this (8 x the UNet's downsampling)
    supports_bf16: bool = True
    prepare: Optional[Callable[[bool], None]] = None  # called with train_text_encoder before training
    extra_frozen: Sequence[torch.nn.Module] = ()  # other host modules the forward touches (borrowed too)
    # a context manager factory entered around training, given train_text_encoder (host-specific patches)
    training_context: Optional[Callable[[bool], ContextManager]] = None


@dataclass
class TrainResult:
    lora: dict  # kohya state dict, ready to save
    steps: int
    samples: int
    losses: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        t = self.timings
        tenth = max(1, len(self.losses) // 10)
        head, tail = self.losses[:tenth], self.losses[-tenth:]
        first, last = sum(head) / max(1, len(head)), sum(tail) / max(1, len(tail))
        lines = [
            f"{self.steps} steps x batch {self.samples // max(self.steps, 1)} = {self.samples} samples, "
            f"{self.precision}",
            f"loss {first:.4f} (first 10%) -> {last:.4f} (last 10%)",
            f"caching {t.get('cache_s', 0):.1f} s, training {t.get('train_s', 0):.1f} s "
            f"({1000 * t.get('train_s', 0) / max(self.samples, 1):.1f} ms/sample)",
        ]
        if "compile_s" in t:
            lines.append(f"compile (first step) {t['compile_s']:.1f} s")
        if "peak_gib" in t:
            lines.append(f"peak GPU memory {t['peak_gib']:.2f} GiB")
        return "\n".join(lines + self.notes)


def choose_precision(requested: str, device: torch.device, supports_bf16: bool = True,
                     weight_dtype: torch.dtype | None = None) -> str:
    """fp32 on the CPU. "auto" on a GPU: bf16 where supported, fp16 with loss scaling otherwise - except that
    fp16 weights (ComfyUI's usual choice for SD1.5/SDXL) train in fp16 directly: on an H100 that measured
    13.3 ms/sample and 8.2 GiB against 15.0 ms and 9.8 GiB for bf16 autocast over the same weights."""
    if device.type != "cuda":
        return "fp32"  # bf16/fp16 autocast on the CPU is slower than fp32 and fp16 is unsupported
    bf16_ok = supports_bf16 and torch.cuda.is_bf16_supported()
    if requested == "auto":
        if weight_dtype == torch.float16:
            return "fp16"
        return "bf16" if bf16_ok else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise FaceChainError("This GPU has no bf16 support: choose precision fp16 (or auto).")
    return requested


COMPUTE_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_plan(precision: str, weight_dtype: torch.dtype, amp_mode: str) -> tuple[torch.dtype | None, bool]:
    """(compute dtype or None for fp32, use autocast?).

    When the frozen weights already are in the compute dtype, the UNet can run in it directly ("pure"):
    no per-op casts and no float32 norms, as in inference. Otherwise autocast casts weights per op.
    """
    compute = COMPUTE_DTYPE.get(precision)
    if compute is None:
        return None, False
    pure = amp_mode == "pure" or (amp_mode == "auto" and weight_dtype == compute)
    return compute, not (pure and weight_dtype == compute)


def _lr_factor(settings: TrainSettings, steps: int) -> Callable[[int], float]:
    warm = int(settings.warmup_fraction * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if settings.lr_schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _check_images(images: torch.Tensor, captions: Sequence[str], backbone: Backbone) -> None:
    n, h, w = require_images(images), images.shape[1], images.shape[2]
    if len(captions) != n:
        raise FaceChainError(f"{n} images but {len(captions)} captions: give one caption per image, "
                             f"or one caption for all.")
    m = backbone.size_multiple
    if h % m or w % m:
        raise FaceChainError(f"The images are {w}x{h}; this model needs sides that are multiples of {m}. "
                             f"Align the faces at 512 (or another multiple of {m}).")


def _capture(forward_backward, inputs, optimizer, device):
    """Record one forward+backward as a CUDA graph: each step then costs one launch, not thousands.

    Warm-up passes run on a side stream first (kernel choice, lazy initialisation); their gradients are
    thrown away and no parameter changes. Returns (graph, static inputs, static loss, seconds).
    """
    t0 = time.perf_counter()
    static_in = {k: (v.clone() if isinstance(v, torch.Tensor) else {kk: vv.clone() for kk, vv in v.items()})
                 for k, v in inputs.items()}
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            forward_backward(static_in, autocast_cache=False)
            optimizer.zero_grad(set_to_none=True)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = forward_backward(static_in, autocast_cache=False)
    torch.cuda.synchronize(device)
    return graph, static_in, static_loss, time.perf_counter() - t0


def _index_cond(cond: Cond, idx: torch.Tensor) -> Cond:
    return {k: v[idx] for k, v in cond.items()}


def train_lora(backbone: Backbone, images: torch.Tensor, captions: Sequence[str], settings: TrainSettings,
               progress: ProgressFn | None = None) -> TrainResult:
    """Train a face LoRA; returns the kohya state dict (nothing is written here).

    ``images``: [N, H, W, 3] floats 0..1 (ComfyUI's IMAGE layout). ``captions``: one per image.
    ``progress(done, total, info)`` is called at least once per step and may raise to cancel; on any
    exception the host's modules are restored and no result exists.
    """
    settings.validate()
    progress = progress or no_progress
    captions = list(captions)
    _check_images(images, captions, backbone)
    device = backbone.device
    weight_dtype = next(backbone.unet.parameters()).dtype
    precision = choose_precision(settings.precision, device, backbone.supports_bf16, weight_dtype)
    compute_dtype, use_autocast = compute_plan(precision, weight_dtype, settings.amp_mode)
    on_cuda = device.type == "cuda"
    n = images.shape[0]
    steps = settings.steps
    batch = int(settings.batch_size)
    views = 2 if settings.flip else 1
    total = steps + n * views  # progress units: encode each view of each image, then each step
    timings: dict = {}
    notes: list = []
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)

    with torch.inference_mode(False):
        t0 = time.perf_counter()
        # 1. latents of every image (and its mirror), once
        latents = []
        with torch.no_grad():
            for view in range(views):
                for i in range(n):
                    img = images[i:i + 1]
                    img = img.flip(2) if view else img
                    latents.append(backbone.encode_images(img).to(device=device, dtype=torch.float32).clone())
                    progress(len(latents), total, "encoding images")
        latents = torch.cat(latents)  # [views * n, 4, h, w]

        # 2. captions: cached embeddings when the text encoder is frozen
        unique = sorted(set(captions))
        caption_index = torch.tensor([unique.index(c) for c in captions], device=device)
        cached_cond = None
        if not settings.train_text_encoder:
            with torch.no_grad():
                cached_cond = {k: v.to(device).clone() for k, v in backbone.encode_text(unique).items()}
        if backbone.prepare:  # e.g. load the UNet in full, after the VAE and text encoder are done
            backbone.prepare(settings.train_text_encoder)
        timings["cache_s"] = time.perf_counter() - t0

        text_encoders = list(backbone.text_encoders) if settings.train_text_encoder else []
        if settings.train_text_encoder and not text_encoders:
            raise FaceChainError("This model's text encoder cannot be trained here: turn 'train text encoder' off.")
        alphas = backbone.alphas_cumprod.to(device=device, dtype=torch.float32)
        gen = torch.Generator(device=device).manual_seed(int(settings.seed))
        order_gen = torch.Generator().manual_seed(int(settings.seed))

        result_layers = None
        losses: list[float] = []
        cast_inputs = not use_autocast  # peft casts activations to the LoRA's float32 unless autocast does
        frozen = [backbone.unet, *backbone.text_encoders, *backbone.extra_frozen]
        host_context = backbone.training_context(settings.train_text_encoder) if backbone.training_context \
            else nullcontext()
        with host_context, borrowed_weights(*frozen), \
                lora_adapters(backbone.unet, settings.unet_targets, settings.rank, settings.lora_alpha,
                              settings.seed, cast_inputs) as unet_params, \
                gradient_checkpointing(backbone.unet,
                                       settings.gradient_checkpointing or settings.high_res_checkpoint_tokens > 0,
                                       settings.checkpoint_blocks,
                                       0 if settings.gradient_checkpointing else settings.high_res_checkpoint_tokens):
            te_params = []
            te_contexts = []
            try:
                for k, te in enumerate(text_encoders):
                    ctx = lora_adapters(te, settings.text_encoder_targets, settings.rank, settings.lora_alpha,
                                        settings.seed + 1 + k, cast_inputs)
                    te_params += ctx.__enter__()
                    te_contexts.append(ctx)
                groups = [{"params": unet_params, "lr": settings.effective_lr}]
                if te_params:
                    groups.append({"params": te_params, "lr": settings.effective_lr * settings.text_encoder_lr_ratio})
                opt_kwargs = dict(betas=tuple(settings.adam_betas), eps=settings.adam_eps,
                                  weight_decay=settings.weight_decay)
                if on_cuda:
                    opt_kwargs["fused"] = True
                optimizer = torch.optim.AdamW(groups, **opt_kwargs)
                scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(settings, steps))
                scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
                all_params = unet_params + te_params

                forward = backbone.predict_noise
                if settings.compile:
                    if on_cuda:
                        forward = torch.compile(forward, mode=settings.compile_mode)
                    else:
                        notes.append("compile: skipped on the CPU")

                # The whole sample order (epochs of permutations) goes to the device once: a per-step copy
                # from host memory would make the CPU wait for the GPU at every step.
                order = torch.cat([torch.randperm(n, generator=order_gen)
                                   for _ in range(math.ceil(steps * batch / n))])[: steps * batch]
                order = order.view(steps, batch).to(device)
                cond_fixed = cached_cond is not None

                def step_inputs(step):
                    idx = order[step]
                    if views == 2:
                        flip = torch.randint(0, 2, (batch,), generator=gen, device=device)
                        x0 = latents[idx + n * flip]
                    else:
                        x0 = latents[idx]
                    noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
                    t = torch.randint(0, alphas.shape[0], (batch,), generator=gen, device=device)
                    a = alphas[t].view(-1, 1, 1, 1)
                    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
                    if cond_fixed:
                        cond = _index_cond(cached_cond, caption_index[idx])
                    else:
                        cond = {"captions": [captions[i] for i in idx.tolist()]}
                    return {"x_t": x_t, "t": t, "noise": noise, "cond": cond}

                def forward_backward(inp, autocast_cache=True):
                    with torch.autocast(device.type, dtype=compute_dtype, enabled=use_autocast,
                                        cache_enabled=autocast_cache):
                        cond = inp["cond"]
                        if not cond_fixed:
                            cond = {k: v.to(device) for k, v in backbone.encode_text(cond["captions"]).items()}
                        x_t = inp["x_t"]
                        if compute_dtype is not None and not use_autocast:
                            x_t = x_t.to(compute_dtype)
                            cond = {k: v.to(compute_dtype) for k, v in cond.items()}
                        eps = forward(x_t, inp["t"], cond)
                    loss = torch.nn.functional.mse_loss(eps.float(), inp["noise"])
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                    return loss.detach()

                graph = None
                use_graphs = settings.cuda_graphs and on_cuda and cond_fixed and not settings.compile
                if use_graphs:
                    try:
                        graph, static_in, static_loss, capture_s = _capture(forward_backward, step_inputs(0),
                                                                           optimizer, device)
                        timings["capture_s"] = capture_s
                    except Exception as e:  # e.g. a host patch that syncs: train eagerly instead
                        graph = None
                        optimizer.zero_grad(set_to_none=True)
                        notes.append(f"CUDA graphs unavailable ({type(e).__name__}: {str(e)[:120]}); eager steps")

                pending = None
                t_train = time.perf_counter()
                t_first = None
                for step in range(steps):
                    inp = step_inputs(step)
                    if graph is not None:
                        for k in ("x_t", "t", "noise"):
                            static_in[k].copy_(inp[k])
                        for k, v in inp["cond"].items():
                            static_in["cond"][k].copy_(v)
                        graph.replay()
                        loss = static_loss.clone()
                    else:
                        loss = forward_backward(inp)
                    if scaler is not None:
                        scaler.unscale_(optimizer)
                    if settings.max_grad_norm:
                        torch.nn.utils.clip_grad_norm_(all_params, settings.max_grad_norm, foreach=on_cuda or None)
                    if scaler is not None:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    if graph is None:
                        optimizer.zero_grad(set_to_none=True)
                    # (a graph's backward overwrites the same gradient tensors at every replay)
                    scheduler.step()
                    # read the previous step's loss: the GPU already has this step queued
                    if pending is not None:
                        losses.append(pending.item())
                        if t_first is None:
                            t_first = time.perf_counter()
                    pending = loss
                    info = f"step {step + 1}/{steps} loss {losses[-1]:.4f}" if losses else f"step {step + 1}/{steps}"
                    progress(n * views + step + 1, total, info)
                losses.append(pending.item())
                if on_cuda:
                    torch.cuda.synchronize(device)
                t_end = time.perf_counter()
                timings["train_s"] = t_end - t_train
                if t_first is not None and steps > 2:
                    timings["steady_step_s"] = (t_end - t_first) / (steps - 1)
                if settings.compile and on_cuda and t_first is not None and steps > 2:
                    # the first step (compilation) minus what a steady step costs
                    steady = (t_end - t_first) / (steps - 1)
                    timings["compile_s"] = max(0.0, (t_first - t_train) - 2 * steady)
                result_layers = (lora_weights(backbone.unet), [lora_weights(te) for te in text_encoders])
                del graph
            finally:
                for ctx in reversed(te_contexts):
                    ctx.__exit__(None, None, None)

    if on_cuda:
        timings["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    unet_layers, te_layers = result_layers
    lora = kohya_state_dict(unet_layers, te_layers, backbone.arch, backbone.unet_naming, backbone.num_res_blocks,
                            dtype=getattr(torch, settings.save_dtype))
    how = "autocast over " + str(weight_dtype).replace("torch.", "") + " weights" if use_autocast \
        else "weights and activations"
    mode = f"{precision} ({how})" if compute_dtype is not None else "fp32"
    return TrainResult(lora=lora, steps=steps, samples=steps * batch, losses=losses, timings=timings,
                       precision=mode, notes=notes)

