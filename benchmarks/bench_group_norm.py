"""GroupNorm (+SiLU) forward and backward: PyTorch's kernels against the pack's (facechain_core/train/group_norm.py)
on the feature maps of an SD1.5 UNet at 512x512, in NCHW and channels-last layouts. GPU only.

    python benchmarks/bench_group_norm.py [--batch 8] [--json out.json] [--split-or-whole]

Per shape and layout: the time of forward + backward (CUDA events, median of repeats after warm-up), the
largest difference from a float32 computation, and the layout of the output. With --split-or-whole: per
channels-last shape, the pack's split kernels against its whole-group ones, replayed from CUDA graphs, and which
the module picks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from facechain_core.train import group_norm as gn  # noqa: E402

# (channels, side, followed by SiLU): each kind of GroupNorm in SD1.5's UNet at 64x64 latents, once (ResBlocks:
# norm + SiLU; SpatialTransformers: norm alone). Times are eager calls, launches included: the trainer replays a
# CUDA graph, so bench_train and profile_train measure what training gets
SHAPES = [(320, 64, True), (320, 64, False), (640, 64, True), (960, 64, True), (320, 32, True),
          (640, 32, True), (640, 32, False), (960, 32, True), (1280, 32, True), (1920, 32, True),
          (640, 16, True), (1280, 16, True), (1280, 16, False), (1920, 16, True), (2560, 16, True),
          (1280, 8, True), (1280, 8, False), (2560, 8, True)]


def timed(fn, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def stock(x, w, b, silu):
    y = F.group_norm(x, 32, w, b, 1e-5)
    return F.silu(y) if silu else y


def graphed(fn, repeats: int = 20, copies: int = 10) -> float:
    """ms per call of ``fn`` replayed from a CUDA graph holding ``copies`` calls (no launch overhead, as the
    trainer runs them): median of ``repeats`` replays."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(copies):
            fn()
    return timed(graph.replay, repeats) / copies


def split_or_whole(args, dtype) -> None:
    """Each channels-last shape's forward + backward by the split kernels (three launches each way) and by the
    whole-group ones (one), replayed from CUDA graphs; and which the limits (WHOLE_POSITIONS, WHOLE_CHANNELS)
    pick."""
    rows, totals = [], {"split": 0.0, "whole": 0.0, "chosen": 0.0}
    for c, side, silu in SHAPES:
        x = (torch.randn(args.batch, c, side, side, device="cuda", dtype=dtype) * 2 + 0.5).contiguous(
            memory_format=torch.channels_last).requires_grad_()
        w = torch.randn(c, device="cuda", dtype=dtype)
        b = torch.randn(c, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        row = {"channels": c, "side": side, "silu": silu, "group": c // 32 * side * side,
               "whole_chosen": gn._whole(x, 32)}
        for whole in (False, True):
            def step(whole=whole):
                y = gn._GroupNormAct.apply(x, 32, w, b, 1e-5, silu, None, False, whole)
                torch.autograd.grad(y, x, dy)
            ms = graphed(step)
            row["whole_ms" if whole else "split_ms"] = round(ms, 4)
            totals["whole" if whole else "split"] += ms
        totals["chosen"] += row["whole_ms"] if row["whole_chosen"] else row["split_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"batch": args.batch, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
           "whole_limits": [gn.WHOLE_POSITIONS, gn.WHOLE_CHANNELS],
           "totals_ms": {k: round(v, 3) for k, v in totals.items()}, "rows": rows}
    print(json.dumps(out["totals_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--json")
    ap.add_argument("--split-or-whole", action="store_true",
                    help="the pack's split and whole-group kernels per channels-last shape, from CUDA graphs")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.split_or_whole:
        return split_or_whole(args, dtype)
    rows, totals = [], {}
    for c, side, silu in SHAPES:
        x0 = torch.randn(args.batch, c, side, side, device="cuda", dtype=dtype) * 2 + 0.5
        w = torch.randn(c, device="cuda", dtype=dtype)
        b = torch.randn(c, device="cuda", dtype=dtype)
        dy0 = torch.randn_like(x0)
        xr = x0.float().requires_grad_()
        ref = stock(xr, w.float(), b.float(), silu)
        ref.backward(dy0.float())
        row = {"channels": c, "side": side, "silu": silu}
        for layout in ("nchw", "nhwc"):
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            x = x0.clone(memory_format=fmt).requires_grad_()
            dy = dy0.contiguous(memory_format=fmt)
            for name, fn in (("torch", stock), ("pack", lambda *a: gn.group_norm(a[0], 32, a[1], a[2], 1e-5,
                                                                                 a[3]))):
                def step(fn=fn):
                    x.grad = None
                    fn(x, w, b, silu).backward(dy)

                ms = timed(step)
                x.grad = None
                y = fn(x, w, b, silu)
                y.backward(dy)
                y = y.detach()
                key = f"{name}_{layout}"
                row[key + "_ms"] = round(ms, 4)
                row[key + "_out"] = "nhwc" if (y.is_contiguous(memory_format=torch.channels_last)
                                               and not y.is_contiguous()) else "nchw"
                row[key + "_err"] = round(float((y.float() - ref).abs().max()), 4)
                row[key + "_grad_err"] = round(float((x.grad.float() - xr.grad).abs().max()
                                                     / xr.grad.abs().max()), 5)
                totals[key] = totals.get(key, 0.0) + ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"batch": args.batch, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
           "totals_ms": {k: round(v, 3) for k, v in totals.items()}, "rows": rows}
    print(json.dumps(out["totals_ms"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
