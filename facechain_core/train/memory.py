"""Memory sized to the card: before training, pick the fastest batch size and recomputation whose peak fits.

The plans (measured peaks and speeds, SD1.5 at 512 px) and the safety margin are data, in
``data/memory_plans.json``; ``plan_for_memory`` is a pure function of the free memory, so the CPU tests can
check the choice for any card. ``size_to_card`` reads the free memory and applies the plan to the settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import data_files
from ..errors import FaceChainError
from .settings import TrainSettings

GIB = 2 ** 30
MEMORY_MODES = ("auto (fit the card)", "as set")
RECOMPUTE_WORDS = {"none": "no recomputation", "high_res": "full-resolution blocks recomputed",
                   "full": "full recomputation (gradient checkpointing)"}


def table() -> dict:
    return data_files.settings("memory_plans.json")


@dataclass(frozen=True)
class Plan:
    batch_size: int
    recompute: str  # "none", "high_res" or "full"
    peak_gib: float  # expected peak for this architecture and image size (UNet weights included)
    need_gib: float  # peak plus the safety margin
    ms_per_sample: float  # at SD1.5 512 px (speeds are compared, not promised)
    estimated: bool = False

    def describe(self) -> str:
        est = " (estimated)" if self.estimated else ""
        return f"batch {self.batch_size}, {RECOMPUTE_WORDS[self.recompute]}, ~{self.peak_gib:.1f} GiB peak{est}"


def _tokens(image_size) -> int:
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    return max(1, (int(h) // 8) * (int(w) // 8))


def plans(arch: str, image_size) -> list[Plan]:
    """Every plan of the table scaled to ``arch`` and ``image_size`` (pixels, int or (h, w)), fastest first."""
    t = table()
    a = t["archs"].get(arch, t["archs"]["sdxl"])
    scale = a["activation_scale"] * _tokens(image_size) / t["reference_tokens"]
    base = t["archs"]["sd15"]["unet_weights_gib"]
    out = []
    for p in t["plans"]:
        peak = a["unet_weights_gib"] + (p["peak_gib"] - base) * scale
        need = peak * (1 + t["margin_fraction"]) + t["margin_gib"]
        est = bool(p.get("estimated") or a.get("estimated") or scale != 1.0)
        out.append(Plan(p["batch_size"], p["recompute"], peak, need, p["ms_per_sample"], est))
    return sorted(out, key=lambda p: p.ms_per_sample)


def plan_for(settings: TrainSettings, arch: str, image_size) -> Plan:
    """The plan the settings describe as set (for the 'as set' check)."""
    if settings.gradient_checkpointing:
        recompute = "full"
    else:
        recompute = "high_res" if settings.high_res_checkpoint_tokens > 0 else "none"
    same = [p for p in plans(arch, image_size) if p.recompute == recompute]
    ref = min(same, key=lambda p: abs(p.batch_size - settings.batch_size))
    per_sample = (ref.peak_gib - table()["archs"].get(arch, table()["archs"]["sdxl"])["unet_weights_gib"]) \
        / ref.batch_size
    peak = ref.peak_gib + per_sample * (settings.batch_size - ref.batch_size)
    t = table()
    return Plan(int(settings.batch_size), recompute, peak, peak * (1 + t["margin_fraction"]) + t["margin_gib"],
                ref.ms_per_sample, True)


def plan_for_memory(free_bytes: int, arch: str, image_size, requested: Optional[TrainSettings] = None) -> Plan:
    """The fastest plan whose peak plus the safety margin fits in ``free_bytes``.

    ``requested``: the user's settings; when they ask for gradient checkpointing, only full-recomputation
    plans are considered (an explicit choice is kept). Raises a FaceChainError naming what is needed when
    nothing fits."""
    free = free_bytes / GIB
    candidates = plans(arch, image_size)
    if requested is not None and requested.gradient_checkpointing:
        candidates = [p for p in candidates if p.recompute == "full"]
    for plan in candidates:
        if plan.need_gib <= free:
            return plan
    smallest = min(candidates, key=lambda p: p.need_gib)
    raise FaceChainError(
        f"Not enough GPU memory to train: {free:.1f} GiB free, the smallest plan ({smallest.describe()}) needs "
        f"{smallest.need_gib:.1f} GiB with its safety margin. Use a smaller image size, close other programs "
        f"that use the GPU (other ComfyUI models, browsers, games), or train on the CPU (slow).")


def apply_plan(settings: TrainSettings, plan: Plan, image_size) -> TrainSettings:
    high_res = _tokens(image_size) if plan.recompute == "high_res" else 0
    return settings.with_(batch_size=plan.batch_size, gradient_checkpointing=plan.recompute == "full",
                          high_res_checkpoint_tokens=high_res)


def _resident_bytes(module: torch.nn.Module, device: torch.device) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device == device)


def cuda_free_bytes(device: torch.device) -> int:
    """Free memory on the card plus what this process's allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def size_to_card(settings: TrainSettings, arch: str, image_size, device: torch.device, memory: str,
                 unet: torch.nn.Module, free_bytes: Optional[Callable[[int], int]] = None
                 ) -> tuple[TrainSettings, str]:
    """(settings to train with, a report line). ``memory``: one of MEMORY_MODES ("auto..." or "as set").
    ``free_bytes(needed)``: the free memory after the host freed what it can towards ``needed`` bytes
    (default: what CUDA reports). The UNet weights already on the card count as available: the peaks
    include them."""
    if device.type != "cuda":
        return settings, "no GPU: no memory sizing"
    auto = str(memory).startswith("auto")
    if memory not in MEMORY_MODES and not auto:
        raise FaceChainError(f"memory must be one of {', '.join(MEMORY_MODES)} (got {memory!r}).")
    fastest = plans(arch, image_size)[0]
    free = free_bytes(int(fastest.need_gib * GIB)) if free_bytes else cuda_free_bytes(device)
    available = free + _resident_bytes(unet, device)
    gib = available / GIB
    if not auto:
        mine = plan_for(settings, arch, image_size)
        if mine.need_gib <= gib:
            return settings, f"memory: as set ({mine.describe()}; {gib:.1f} GiB available)"
        return settings, (f"memory WARNING: as set ({mine.describe()}) may not fit in {gib:.1f} GiB available "
                          f"(~{mine.need_gib:.1f} GiB needed with margin): choose memory 'auto (fit the card)', "
                          f"a smaller batch or gradient checkpointing if it runs out")
    plan = plan_for_memory(available, arch, image_size, settings)
    return apply_plan(settings, plan, image_size), f"memory: {gib:.1f} GiB available: {plan.describe()}"
