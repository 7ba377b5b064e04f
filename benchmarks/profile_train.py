"""Where a training step's time goes: kernels by kind, GPU busy time against wall time, share of peak.

Runs the node's path (ComfyUI's SD1.5 UNet class, fp16 random weights, the trainer's defaults) under
torch.profiler for a few steps and groups the CUDA kernels: matrix multiplies, convolutions, attention,
normalisation, the optimizer, and the rest (element-wise, copies). Eager steps are profiled (a CUDA graph
replay hides its kernels from some profiler versions); the graph's own step time is printed beside it.

Usage: python benchmarks/profile_train.py --comfyui ComfyUI [--batch 4] [--set channels_last=true ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_train as bt  # noqa: E402
from facechain_core.pipeline_cli import setting_value  # noqa: E402
from facechain_core.train import TrainSettings, train_lora  # noqa: E402

# kernel-name patterns, first match wins
KINDS = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn_generated_fort_native_sdpa"),
    ("optimizer", r"adam|multi_tensor|foreach|norm_kernel_cuda_impl|clip"),
    # the pack's GroupNorm (_fwd_sums ... _bwd_apply) and LayerNorm (_ln_fwd, _ln_bwd) kernels too
    ("norm", r"group_norm|GroupNorm|layer_norm|LayerNorm|welford|RowwiseMoments|ComputeFusedParams|^_ln_|"
             r"^_(fwd|bwd)_(sums|finish|apply|whole)$"),
    ("conv", r"conv|implicit_convolve|xmma_fprop|xmma_dgrad|xmma_wgrad|nhwc|nchw|dgrad|wgrad|fprop"),
    ("matmul", r"gemm|sm90_xmma|cutlass|cublas|matmul|splitK|nvjet"),  # nvjet: cuBLAS's own Hopper kernels
    ("copy/cast", r"copy|(?<!no)cast|convert|transpose|permute|contiguous"),  # not PyTorch's "_nocast" kernels
]
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense fp16/bf16 tensor-core peak
UNET_TFLOP_PER_SAMPLE = 1.6  # forward 0.80 TFLOP at 64x64 latents plus the backward to the inputs


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "element-wise/other"


SOURCES = ("comfy/", "peft/", "facechain_core/", "nodes/", "diffusers/")  # frames a kernel is charged to


def by_source(events, active: int, on_cuda: bool) -> list:
    """Kernel time per step charged to (the innermost frame of the host's or this pack's code, the op): ops
    run by autograd's engine have no Python frames and are charged to their backward function instead."""
    out = defaultdict(float)
    for e in events:
        t = (getattr(e, "self_device_time_total", 0) if on_cuda else e.self_cpu_time_total) or 0
        if not t or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        frames, event = [], e
        while len(frames) < 2 and event is not None:  # the op's two innermost frames of those sources
            if event.name.startswith("autograd::engine::evaluate_function:"):
                frames.append("backward " + event.name.split(":")[-1].strip())
                break
            # Python frames are the op's parent events (with_stack)
            frames += [f for f in [event.name, *(event.stack or [])] if any(s in f for s in SOURCES)][:2 - len(frames)]
            event = event.cpu_parent
        key = f"{' < '.join(frames) or '?'} | {e.name}"
        out[key] += t / 1000 / active
    return sorted(out.items(), key=lambda kv: -kv[1])[:120]


def profile(backbone, images, settings: TrainSettings, wait: int, active: int, stacks: bool = False,
            shapes: bool = False, top_n: int = 40) -> dict:
    """Profile ``active`` eager steps after ``wait`` steps; returns ms per step by kind and the top kernels
    (``stacks``: also by source line, ``by_source``; ``shapes``: the top operators by their inputs' shapes,
    ``by_shape``)."""
    captions = [bt.CAPTIONS[i % len(bt.CAPTIONS)] for i in range(images.shape[0])]
    schedule = torch.profiler.schedule(wait=wait, warmup=2, active=active, repeat=1)
    on_cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_cuda else [])
    prof = torch.profiler.profile(activities=activities, schedule=schedule, with_stack=stacks, record_shapes=shapes)
    caching = len(images) * (2 if settings.flip else 1)
    marks = []

    def progress(done, total, info):
        if done > caching:  # one call per training step
            prof.step()
            marks.append(time.perf_counter())

    with prof:
        train_lora(backbone, images, captions, settings, progress=progress)
    by_kind, by_name = defaultdict(float), defaultdict(float)
    launches = 0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.device_type == torch.autograd.DeviceType.CUDA and t and not e.key.startswith("ProfilerStep"):
            by_kind[kind_of(e.key)] += t / 1000 / active
            by_name[e.key] += t / 1000 / active
            launches += e.count
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:top_n]
    out = {"ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
           "gpu_ms_per_step": sum(by_kind.values()), "top_kernels": top,
           "kernels_per_step": launches / active}  # kernels, copies and memsets the GPU ran
    if stacks:
        out["by_source"] = by_source(prof.events(), active, on_cuda)
    if shapes:
        rows = []
        for e in prof.key_averages(group_by_input_shape=True):
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if e.device_type == torch.autograd.DeviceType.CPU and t and e.key.startswith("aten::"):
                rows.append((f"{e.key} {e.input_shapes}", t / 1000 / active))
        out["by_shape"] = sorted(rows, key=lambda kv: -kv[1])[:60]
    return out


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        out[key] = setting_value(value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", required=True)
    ap.add_argument("--batch", type=int, default=TrainSettings().batch_size)
    ap.add_argument("--set", nargs="*", default=[], help="training settings, e.g. channels_last=true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--stacks", action="store_true", help="also charge kernel time to source lines")
    ap.add_argument("--shapes", action="store_true", help="also list the top operators by their inputs' shapes")
    ap.add_argument("--top", type=int, default=40, help="how many kernels to list by name")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN times its algorithms per shape "
                    "(as the profiles before round four did); off by default, as the node trains")
    args = ap.parse_args()
    print("command:", " ".join([sys.executable] + sys.argv), flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    images = bt.synthetic_faces(10, 512)
    backbone = bt.Backbones(args.comfyui).get("comfy_fp16")["backbone"]
    changes = {"batch_size": args.batch, **parse_sets(args.set)}
    eager = TrainSettings().with_(**changes, cuda_graphs=False, samples=args.batch * 12)
    prof = profile(backbone, images, eager, wait=4, active=5, stacks=args.stacks, shapes=args.shapes,
                   top_n=args.top)
    graphs = bt.run_ours(backbone, images, TrainSettings().with_(**changes, samples=args.batch * 40))
    ms = graphs["ms_per_sample"]
    share = UNET_TFLOP_PER_SAMPLE / (ms / 1000) / PEAK_TFLOPS
    print(f"settings {changes}: eager GPU time {prof['gpu_ms_per_step']:.1f} ms/step "
          f"({prof['gpu_ms_per_step'] / args.batch:.2f} ms/sample); CUDA-graph step {ms:.2f} ms/sample, "
          f"peak {graphs['peak_gib']:.2f} GiB; ~{UNET_TFLOP_PER_SAMPLE / (ms / 1000):.0f} TFLOP/s = "
          f"{100 * share:.0f} % of {PEAK_TFLOPS:.0f}; {prof['kernels_per_step']:.0f} kernels a step, the graph's "
          f"step {ms * args.batch - prof['gpu_ms_per_step']:+.2f} ms beyond their summed time")
    for kind, t in prof["ms_per_step_by_kind"].items():
        print(f"  {kind:20s} {t:7.2f} ms/step  {100 * t / prof['gpu_ms_per_step']:5.1f} %")
    for name, t in prof["top_kernels"]:
        print(f"    {t:7.3f} ms  {name[:110]}")
    for name, t in prof.get("by_source", []) + prof.get("by_shape", []):
        print(f"    {t:7.3f} ms  {name[-150:]}")
    if args.json:
        out = {"settings": changes, "cudnn_benchmark": args.cudnn_benchmark, "profile": prof, "graphs": graphs}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
