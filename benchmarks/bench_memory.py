"""Memory sized to the card: training under process memory caps of 6, 8, 12 and 24 GiB on one GPU.

At each cap (``torch.cuda.set_per_process_memory_fraction``) the trainer is asked to fit the card
("auto (fit the card)", as the node's default): the report line says which plan it chose, then a short run
(400 samples by default) must complete inside the cap. Prints the plan, ms/sample and peak per cap.
SD1.5 sizes with random weights, built as ``bench_train.py`` builds them: ComfyUI's UNet class with fp16
weights when ``--comfyui DIR`` is given (the node's path), else the diffusers UNet in fp16.

Usage: python benchmarks/bench_memory.py [--comfyui .cache/ComfyUI] [--caps 24,12,8,6] [--json OUT.json]
``--cpu-smoke`` runs the same code on the CPU (tiny UNet; no cap and no sizing there: the report says so).
On the lent GPU machine (torch only), as bench_train.py runs there: ``pip install --no-index --no-deps
.gpu/whl/*.whl`` (diffusers, peft), unpack ComfyUI's source (``.gpu/comfyui.tar.xz``) and give it as
``--comfyui``. Four caps of 400 samples each take well under 4 minutes with the model build.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402
import torch  # noqa: E402

from facechain_core.train import TrainSettings, train_lora  # noqa: E402
from facechain_core.train.memory import MEMORY_MODES  # noqa: E402

GiB = 2 ** 30


def capped_free(cap_bytes: int):
    """Free memory as the capped process sees it (mem_get_info reports the whole card, not the cap)."""
    def free(needed: int) -> int:
        return int(cap_bytes - torch.cuda.memory_allocated())
    return free


def run_cap(backbone, images, cap_gib: float | None, samples: int) -> dict:
    bt.reset_memory()
    if cap_gib is not None:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total))
    captions = [bt.CAPTIONS[i % len(bt.CAPTIONS)] for i in range(images.shape[0])]
    settings = TrainSettings().with_(samples=samples)
    free = capped_free(int(cap_gib * GiB)) if cap_gib is not None else None
    t0 = time.perf_counter()
    r = train_lora(backbone, images, captions, settings, memory=MEMORY_MODES[0], free_bytes=free)
    wall = time.perf_counter() - t0
    batch = r.samples // r.steps
    steady = r.timings.get("steady_step_s", r.timings["train_s"] / r.steps)
    sizing = next((n for n in r.notes if n.startswith(("memory", "no GPU"))), "")
    return {"cap_gib": cap_gib, "plan": sizing, "batch": batch, "steps": r.steps, "samples": r.samples,
            "ms_per_sample": 1000 * steady / batch, "train_s": r.timings["train_s"], "wall_s": wall,
            "peak_gib": r.timings.get("peak_gib", float("nan")), "loss_last": r.losses[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="24,12,8,6", help="GiB, comma-separated")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--comfyui", default=None, help="a ComfyUI folder: train ComfyUI's UNet class (the node's path)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu-smoke", action="store_true", help="check the script on the CPU (tiny UNet, no caps)")
    args = ap.parse_args()
    start = time.time()
    if args.cpu_smoke:
        bt.DEVICE = "cpu"
        args.size, args.images, args.samples, caps = 64, 3, 8, [None]
    else:
        assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU (or --cpu-smoke)"
        caps = [float(c) for c in args.caps.split(",") if c]
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    env = {"gpu": torch.cuda.get_device_name() if bt.DEVICE == "cuda" else "cpu", "torch": torch.__version__}
    print(json.dumps(env), flush=True)
    kind = "comfy_fp16" if args.comfyui else "diffusers_fp16"
    backbone = bt.Backbones(args.comfyui).get(kind)["backbone"]
    images = bt.synthetic_faces(args.images, args.size)
    rows = []
    for cap in caps:
        try:
            row = run_cap(backbone, images, cap, args.samples)
        except Exception as e:  # an out-of-memory or a refusal is the result for this cap
            traceback.print_exc()
            row = {"cap_gib": cap, "error": f"{type(e).__name__}: {e}"[:400]}
        rows.append(row)
        label = f"cap {cap:g} GiB" if cap is not None else "no cap (CPU)"
        if "error" in row:
            print(f"{label}: {row['error']}", flush=True)
        else:
            print(f"{label}: {row['plan']} -> {row['samples']} samples done, {row['ms_per_sample']:.2f} ms/sample, "
                  f"peak {row['peak_gib']:.2f} GiB, training {row['train_s']:.1f} s", flush=True)
    print(f"total {time.time() - start:.0f} s ({kind})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "kind": kind, "caps": rows}, indent=1))
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
