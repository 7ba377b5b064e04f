"""The ``portraits`` and ``batch`` subcommands of ``python -m facechain_core``.

Every setting defaults to the bundled API workflow's value (facechain_core/pipeline.py); the flags below change
the usual ones, ``--set NodeType.input=JSON`` any other (e.g. ``--set KSampler.cfg=5``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .errors import FaceChainError

# flag -> the workflow inputs it sets
SIZE_FLAGS = {
    "size": ("FaceChainFaceAlign.size",),
    "samples": ("FaceChainTrainFaceLoRA.samples",),
    "batch_size": ("FaceChainTrainFaceLoRA.batch_size",),
    "images": ("EmptyLatentImage.batch_size",),
    "image_size": ("EmptyLatentImage.width", "EmptyLatentImage.height"),
    "steps": ("KSampler.steps",),
    "top": ("FaceChainRTSRank.top_n",),
}


def _common(p) -> None:
    from .pipeline import workflow_settings

    p.add_argument("--checkpoint", required=True, help="SD1.5 single-file checkpoint (.safetensors)")
    style = workflow_settings()["FaceChainApplyStyleLoRA"]["style"]
    p.add_argument("--style", default=style, help=f"a style name or file stem (workflow: {style})")
    p.add_argument("--out", required=True, help="output folder")
    help_text = {"size": "training crop side (a multiple of 64 for SD1.5)", "samples": "training samples",
                 "batch_size": "training batch size", "images": "portraits generated per person",
                 "image_size": "portrait side in pixels", "steps": "sampling steps",
                 "top": "portraits kept after ranking"}
    for flag, keys in SIZE_FLAGS.items():
        node, _, field = keys[0].partition(".")
        value = workflow_settings()[node][field]
        p.add_argument("--" + flag.replace("_", "-"), type=int, help=f"{help_text[flag]} (workflow: {value})")
    p.add_argument("--set", action="append", default=[], metavar="NodeType.input=JSON", help="any other setting")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--loras", action="append", default=None, metavar="DIR",
                   help="folder holding style LoRAs (as ComfyUI's models/loras; default $FACECHAIN_LORAS or "
                        "./models/loras)")


def overrides_from(args) -> dict:
    out = {}
    for flag, keys in SIZE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.update({k: value for k in keys})
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise FaceChainError(f"--set {item}: write NodeType.input=VALUE, e.g. KSampler.cfg=5")
        out[key] = setting_value(value)
    return out


def setting_value(text: str):
    """A ``--set`` value: JSON where it parses (numbers, true, lists), else the plain text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def portraits_command(args) -> int:
    from .pipeline import make_portraits

    m = make_portraits(args.photos, args.checkpoint, args.style, args.out, overrides_from(args), args.device,
                       args.loras, log=lambda text: print(text, flush=True))
    times = ", ".join(f"{k} {v:.1f} s" for k, v in m["timings"].items())
    if m["status"] != "done":
        print(f"error ({m.get('stage')}): {m['error']}\nmanifest: {Path(args.out) / 'manifest.json'}", file=sys.stderr)
        return 2
    for p in m["portraits"]:
        print(f"{p['rank']}. {p['file']}  score {p['score']:.3f}")
    print(f"{times}\nmanifest: {Path(args.out) / 'manifest.json'}")
    return 0


def batch_command(args) -> int:
    from .batch import run_batch

    comfy = [u.strip() for u in args.comfy.split(",") if u.strip()] if args.comfy else None
    summary = run_batch(args.people, args.out, args.scheduler, args.checkpoint, args.style, overrides_from(args),
                        args.device, args.workers, args.loras, comfy, log=lambda text: print(text, flush=True))
    print(f"{summary['done']} done, {len(summary['failed'])} failed, {len(summary['skipped'])} skipped in "
          f"{summary['wall_s']:.1f} s ({summary['people_per_min']:.2f} people/min); {Path(args.out) / 'batch.json'}")
    return 0 if not summary["failed"] else 1


def add_portraits_parser(sub) -> None:
    p = sub.add_parser("portraits", help="photos of one person -> ranked portraits, without ComfyUI")
    p.add_argument("--photos", required=True, help="folder of photos of one person")
    _common(p)
    p.set_defaults(run=portraits_command)


def add_batch_parser(sub) -> None:
    p = sub.add_parser("batch", help="portraits for many people on Dask distributed (one task per person)")
    p.add_argument("--people", required=True, help="folder with one subfolder of photos per person")
    p.add_argument("--scheduler", default="local", help="'local' (a cluster on this machine) or a Dask "
                                                        "scheduler address such as tcp://10.0.0.5:8786")
    p.add_argument("--workers", type=int, help="local CPU workers (default: one per visible GPU)")
    p.add_argument("--comfy", help="URL[,URL]: submit the bundled API workflow to these ComfyUI servers instead "
                                   "(--checkpoint is then the name in their models/checkpoints)")
    _common(p)
    p.set_defaults(run=batch_command)
