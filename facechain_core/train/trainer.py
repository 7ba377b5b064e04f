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
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional, Sequence

import torch

from ..errors import FaceChainError
from ..lora_format import kohya_state_dict
from ..progress import LossesFn, ProgressFn, no_progress
from . import group_norm, speed
from .captions import require_images
from .lora_layers import borrowed_weights, gradient_checkpointing, lora_adapters, lora_weights
from .memory import size_to_card, table as memory_table
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
    # which of the host's linear layers compute F.linear(x, weight, bias) and nothing else (the fused LoRA
    # product bypasses their forward); None: torch.nn.Linear itself only
    plain_linear: Optional[Callable[[torch.nn.Module], bool]] = None
    # a context manager factory, given group_norm_kernels, geglu_kernels, layer_norm_kernels, block_merge and
    # concat_kernels (keywords): training-only forwards for the host's frozen layers (fast_frozen_layers); it
    # yields {"layers": patched, "group_norms": those of them that are GroupNorms, ...}
    fast_layers: Optional[Callable[..., ContextManager]] = None


LOSS_CURVE = "loss curve (mean per run of steps):"  # the report line a plot reads back


@dataclass
class TrainResult:
    lora: dict  # kohya state dict, ready to save
    steps: int
    samples: int
    losses: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"
    notes: list = field(default_factory=list)

    def loss_curve(self, points: int = 50) -> list[float]:
        """The per-step losses averaged over at most ``points`` equal runs of steps (for a plot)."""
        n = len(self.losses)
        edges = [round(i * n / min(points, n)) for i in range(min(points, n) + 1)]
        return [sum(self.losses[a:b]) / (b - a) for a, b in zip(edges, edges[1:]) if b > a]

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
        if self.losses:
            lines.append(f"{LOSS_CURVE} " + " ".join(f"{v:.4f}" for v in self.loss_curve()))
        if "setup_s" in t:
            capture = f" (of which CUDA-graph capture {t['capture_s']:.1f} s)" if "capture_s" in t else ""
            lines.append(f"set-up (adapters, optimizer) {t['setup_s']:.1f} s{capture}")
        if "compile_s" in t:
            lines.append(f"compile {t['compile_s']:.1f} s (once per process; the compile cache shortens later ones)")
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


class LoRATrainer:
    """One training run in named steps: cache latents, cache text, build the optimizer, one step (eager or
    CUDA graph), the loop, save. ``train_lora`` runs them in that order."""

    def __init__(self, backbone: Backbone, settings: TrainSettings, progress: ProgressFn | None = None,
                 on_losses: LossesFn | None = None):
        self.backbone, self.settings, self.progress = backbone, settings, progress or no_progress
        self.on_losses = on_losses  # e.g. a node drawing the loss curve while it trains
        self.device = backbone.device
        self.on_cuda = self.device.type == "cuda"
        self.weight_dtype = next(backbone.unet.parameters()).dtype
        self.precision = choose_precision(settings.precision, self.device, backbone.supports_bf16, self.weight_dtype)
        self.compute_dtype, self.use_autocast = compute_plan(self.precision, self.weight_dtype, settings.amp_mode)
        self.steps, self.batch = settings.steps, int(settings.batch_size)
        self.views = 2 if settings.flip else 1
        self.timings: dict = {}
        self.notes: list = []
        self.losses: list[float] = []
        self.gen = torch.Generator(device=self.device).manual_seed(int(settings.seed))
        self.scaler = None
        self.graph = None
        self.nhwc = False

    # 1. latents of every image (and its mirror), once, a few images per VAE call
    def cache_latents(self, images: torch.Tensor) -> None:
        n = images.shape[0]
        self.n, self.total = n, self.steps + n * self.views  # progress: each view of each image, then each step
        # on a CPU a call of several 512 px images takes seconds: one at a time there keeps the bar and Cancel live
        budget = memory_table()["encode_pixels_per_call" if self.on_cuda else "encode_pixels_per_call_cpu"]
        per_call = max(1, int(budget) // (images.shape[1] * images.shape[2]))
        latents, done = [], 0
        with torch.no_grad():
            for view in range(self.views):
                for i in range(0, n, per_call):
                    chunk = images[i:i + per_call]
                    chunk = chunk.flip(2) if view else chunk
                    latents.append(self.backbone.encode_images(chunk).to(device=self.device, dtype=torch.float32)
                                   .clone())
                    done += chunk.shape[0]
                    self.progress(done, self.total, "encoding images")
        self.latents = torch.cat(latents)  # [views * n, 4, h, w]

    # 2. captions: cached embeddings when the text encoder is frozen
    def cache_text(self, captions: list[str]) -> None:
        unique = sorted(set(captions))
        self.captions = captions
        self.caption_index = torch.tensor([unique.index(c) for c in captions], device=self.device)
        self.cached_cond = None
        if not self.settings.train_text_encoder:
            with torch.no_grad():
                self.cached_cond = {k: v.to(self.device).clone()
                                    for k, v in self.backbone.encode_text(unique).items()}

    def text_encoders(self) -> list[torch.nn.Module]:
        text_encoders = list(self.backbone.text_encoders) if self.settings.train_text_encoder else []
        if self.settings.train_text_encoder and not text_encoders:
            raise FaceChainError("This model's text encoder cannot be trained here: turn 'train text encoder' off.")
        return text_encoders

    def enter_adapters(self, stack: ExitStack, text_encoders: list) -> tuple[list, list]:
        """The host's patches, borrowed weights, LoRA adapters and checkpointing, undone when ``stack`` closes
        (in reverse order, on success, error or Cancel alike). Returns (UNet params, text encoder params)."""
        s, b = self.settings, self.backbone
        # the LoRA product: left to autocast where it runs; else merged into the weight or fused into the base
        # layers' matrix multiplies (lora_compute "merged", "fused"), or in the activations' half precision when
        # asked ("activations"), else peft casts the activations to the factors' float32
        if self.use_autocast:
            product = "autocast"
        elif s.lora_compute in ("merged", "fused") and (self.compute_dtype is not None
                                                         or self.weight_dtype == torch.float32):
            product = s.lora_compute
        elif self.compute_dtype is not None and s.lora_compute == "activations":
            product = "activations"
        else:
            product = "fp32"
        if b.training_context:
            stack.enter_context(b.training_context(s.train_text_encoder))
        fast = {}
        if s.fast_frozen_layers and b.fast_layers:
            fast = stack.enter_context(b.fast_layers(group_norm_kernels=s.group_norm_kernels,
                                                     geglu_kernels=s.geglu_kernels,
                                                     layer_norm_kernels=s.layer_norm_kernels,
                                                     block_merge=s.block_merge,
                                                     concat_kernels=s.concat_kernels)) or {}
        if self.on_cuda:  # after the fast layers, which say whether GroupNorm keeps the layout
            nhwc = self.channels_last(fast.get("group_norms", 0))
            self.nhwc = stack.enter_context(speed.channels_last(b.unet, nhwc, self.device)) > 0
        stack.enter_context(borrowed_weights(b.unet, *b.text_encoders, *b.extra_frozen))
        unet_params = stack.enter_context(lora_adapters(b.unet, s.unet_targets, s.rank, s.lora_alpha, s.seed,
                                                        product, b.plain_linear))
        stack.enter_context(gradient_checkpointing(
            b.unet, s.gradient_checkpointing or s.high_res_checkpoint_tokens > 0, s.checkpoint_blocks,
            0 if s.gradient_checkpointing else s.high_res_checkpoint_tokens))
        te_params = []
        for k, te in enumerate(text_encoders):
            te_params += stack.enter_context(lora_adapters(te, s.text_encoder_targets, s.rank, s.lora_alpha,
                                                           s.seed + 1 + k, product, b.plain_linear))
        return unet_params, te_params

    def channels_last(self, group_norms: int) -> bool:
        """NHWC convolutions: as set, or with "auto" when the GroupNorms (``group_norms`` of them taken over by
        the fast layers) will run by the pack's layout-keeping kernels: not under autocast, and only where the
        kernels work on this device and dtype. PyTorch's own GroupNorm gives NCHW back, and cuDNN would then
        convert around every convolution."""
        s = self.settings
        if s.channels_last != "auto":
            return bool(s.channels_last)
        return bool(group_norms > 0 and not self.use_autocast
                    and group_norm.works(self.device, self.compute_dtype or self.weight_dtype))

    def enter_speed_switches(self, stack: ExitStack) -> None:
        """Attention kernel, cuDNN's autotuning and the on-disk compile cache, as the settings ask (CUDA only)."""
        s = self.settings
        if not self.on_cuda:
            return
        stack.enter_context(speed.attention_backend(s.attention_backend))
        stack.enter_context(speed.cudnn_benchmark(s.cudnn_benchmark))
        if s.compile:
            stack.enter_context(speed.compile_cache(s.compile_cache))

    # 3. the optimizer, its schedule and loss scaling; the compiled forward
    def build_optimizer(self, unet_params: list, te_params: list) -> None:
        s = self.settings
        groups = [{"params": unet_params, "lr": s.effective_lr}]
        if te_params:
            groups.append({"params": te_params, "lr": s.effective_lr * s.text_encoder_lr_ratio})
        opt_kwargs = dict(betas=tuple(s.adam_betas), eps=s.adam_eps, weight_decay=s.weight_decay)
        if self.on_cuda:
            opt_kwargs["fused"] = True
        self.optimizer = torch.optim.AdamW(groups, **opt_kwargs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(s, self.steps))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None
        self.params = unet_params + te_params
        self.forward = self.backbone.predict_noise
        if s.compile:
            if self.on_cuda:
                self.forward = torch.compile(self.forward, mode=s.compile_mode)
            else:
                self.notes.append("compile: skipped on the CPU")

    def sample_order(self, order_gen: torch.Generator) -> None:
        """The whole sample order (epochs of permutations) goes to the device once: a per-step copy from host
        memory would make the CPU wait for the GPU at every step."""
        steps, batch, n = self.steps, self.batch, self.n
        order = torch.cat([torch.randperm(n, generator=order_gen)
                           for _ in range(math.ceil(steps * batch / n))])[: steps * batch]
        self.order = order.view(steps, batch).to(self.device)

    def step_inputs(self, step: int) -> dict:
        idx, batch, gen, device = self.order[step], self.batch, self.gen, self.device
        if self.views == 2:
            flip = torch.randint(0, 2, (batch,), generator=gen, device=device)
            x0 = self.latents[idx + self.n * flip]
        else:
            x0 = self.latents[idx]
        noise = torch.randn(x0.shape, generator=gen, device=device, dtype=x0.dtype)
        t = torch.randint(0, self.alphas.shape[0], (batch,), generator=gen, device=device)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if self.cached_cond is not None:
            cond = _index_cond(self.cached_cond, self.caption_index[idx])
        else:
            cond = {"captions": [self.captions[i] for i in idx.tolist()]}
        return {"x_t": x_t, "t": t, "noise": noise, "cond": cond}

    def forward_backward(self, inp: dict, autocast_cache: bool = True) -> torch.Tensor:
        compute_dtype = self.compute_dtype
        with torch.autocast(self.device.type, dtype=compute_dtype, enabled=self.use_autocast,
                            cache_enabled=autocast_cache):
            cond = inp["cond"]
            if self.cached_cond is None:
                cond = {k: v.to(self.device) for k, v in self.backbone.encode_text(cond["captions"]).items()}
            x_t = inp["x_t"]
            if self.nhwc:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            if compute_dtype is not None and not self.use_autocast:
                x_t = x_t.to(compute_dtype)
                cond = {k: v.to(compute_dtype) for k, v in cond.items()}
            eps = self.forward(x_t, inp["t"], cond)
        loss = torch.nn.functional.mse_loss(eps.float(), inp["noise"])
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach()

    def capture_graph(self) -> None:
        """On CUDA with cached text: record the step as a CUDA graph (falls back to eager steps)."""
        s = self.settings
        own_graphs = s.compile and s.compile_mode == "reduce-overhead"  # torch.compile records its own
        if not (s.cuda_graphs and self.on_cuda and self.cached_cond is not None and not own_graphs):
            return
        try:
            self.graph, self.static_in, self.static_loss, capture_s = _capture(
                self.forward_backward, self.step_inputs(0), self.optimizer, self.device)
            self.timings["capture_s"] = capture_s
            if s.compile:  # the compile happens in the capture's warm-up passes
                self.timings["compile_s"] = capture_s
        except Exception as e:  # e.g. a host patch that syncs: train eagerly instead
            self.graph = None
            self.optimizer.zero_grad(set_to_none=True)
            self.notes.append(f"CUDA graphs unavailable ({type(e).__name__}: {str(e)[:120]}); eager steps")

    # 4. one step, eager or a graph replay; returns the loss (not read yet)
    def one_step(self, step: int) -> torch.Tensor:
        inp = self.step_inputs(step)
        if self.graph is not None:
            for k in ("x_t", "t", "noise"):
                self.static_in[k].copy_(inp[k])
            for k, v in inp["cond"].items():
                self.static_in["cond"][k].copy_(v)
            self.graph.replay()
            loss = self.static_loss.clone()
        else:
            loss = self.forward_backward(inp)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm, foreach=self.on_cuda or None)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.graph is None:
            self.optimizer.zero_grad(set_to_none=True)
        # (a graph's backward overwrites the same gradient tensors at every replay)
        self.scheduler.step()
        return loss

    # 5. the loop: the loss is read one step late, so the GPU never waits for the Python side
    def loop(self) -> None:
        steps, losses = self.steps, self.losses
        pending = None
        t_train = time.perf_counter()
        t_first = None
        for step in range(steps):
            loss = self.one_step(step)
            if pending is not None:
                losses.append(pending.item())
                if t_first is None:
                    t_first = time.perf_counter()
            pending = loss
            info = f"step {step + 1}/{steps} loss {losses[-1]:.4f}" if losses else f"step {step + 1}/{steps}"
            self.progress(self.n * self.views + step + 1, self.total, info)
            if self.on_losses is not None:
                self.on_losses(losses, steps)
        losses.append(pending.item())
        if self.on_losses is not None:
            self.on_losses(losses, steps)
        if self.on_cuda:
            torch.cuda.synchronize(self.device)
        t_end = time.perf_counter()
        self.timings["train_s"] = t_end - t_train
        if t_first is not None and steps > 2:
            self.timings["steady_step_s"] = (t_end - t_first) / (steps - 1)
        if self.settings.compile and self.on_cuda and self.graph is None and t_first is not None and steps > 2:
            # the first step (compilation) minus what a steady step costs
            steady = (t_end - t_first) / (steps - 1)
            self.timings["compile_s"] = max(0.0, (t_first - t_train) - 2 * steady)

    # 6. save: the trained layers as a kohya state dict, with the run's numbers
    def result(self, unet_layers, te_layers) -> TrainResult:
        if self.on_cuda:
            self.timings["peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        lora = kohya_state_dict(unet_layers, te_layers, self.backbone.arch, self.backbone.unet_naming,
                                self.backbone.num_res_blocks, dtype=getattr(torch, self.settings.save_dtype))
        how = "autocast over " + str(self.weight_dtype).replace("torch.", "") + " weights" if self.use_autocast \
            else "weights and activations"
        mode = f"{self.precision} ({how})" if self.compute_dtype is not None else "fp32"
        return TrainResult(lora=lora, steps=self.steps, samples=self.steps * self.batch, losses=self.losses,
                           timings=self.timings, precision=mode, notes=self.notes)

    def run(self, images: torch.Tensor, captions: list[str]) -> TrainResult:
        backbone, settings = self.backbone, self.settings
        with torch.inference_mode(False):
            t0 = time.perf_counter()
            self.cache_latents(images)
            self.cache_text(captions)
            if backbone.prepare:  # e.g. load the UNet in full, after the VAE and text encoder are done
                backbone.prepare(settings.train_text_encoder)
            self.timings["cache_s"] = time.perf_counter() - t0
            if self.on_cuda:  # the peak reported (and planned for) is training's, not the VAE's batch
                torch.cuda.reset_peak_memory_stats(self.device)
            text_encoders = self.text_encoders()
            self.alphas = backbone.alphas_cumprod.to(device=self.device, dtype=torch.float32)
            order_gen = torch.Generator().manual_seed(int(settings.seed))
            with ExitStack() as stack:
                self.enter_speed_switches(stack)
                self.build_optimizer(*self.enter_adapters(stack, text_encoders))
                self.sample_order(order_gen)
                self.capture_graph()
                self.timings["setup_s"] = time.perf_counter() - t0 - self.timings["cache_s"]
                self.loop()
                layers = (lora_weights(backbone.unet), [lora_weights(te) for te in text_encoders])
                self.graph = self.static_in = self.static_loss = None
        return self.result(*layers)


def train_lora(backbone: Backbone, images: torch.Tensor, captions: Sequence[str], settings: TrainSettings,
               progress: ProgressFn | None = None, memory: str = "as set",
               free_bytes: Callable[[int], int] | None = None, on_losses: LossesFn | None = None) -> TrainResult:
    """Train a face LoRA; returns the kohya state dict (nothing is written here).

    ``images``: [N, H, W, 3] floats 0..1 (ComfyUI's IMAGE layout). ``captions``: one per image.
    ``progress(done, total, info)`` is called at least once per step and may raise to cancel; on any
    exception the host's modules are restored and no result exists. ``memory``: "auto (fit the card)" picks
    the batch size and recomputation from the free GPU memory before any work (an error if nothing fits),
    "as set" keeps the settings and only warns; ``free_bytes(needed)`` is the host's reading of free memory.
    ``on_losses(losses, steps)`` is called after each step with the losses read so far (one step late) and once
    more after the loop with all of them, e.g. to draw the loss curve while training runs.
    """
    settings.validate()
    captions = list(captions)
    _check_images(images, captions, backbone)
    settings, sizing = size_to_card(settings, backbone.arch, (images.shape[1], images.shape[2]), backbone.device,
                                    memory, backbone.unet, free_bytes)
    trainer = LoRATrainer(backbone, settings, progress, on_losses)
    trainer.notes.append(sizing)
    return trainer.run(images, captions)
