"""FaceChain's face LoRA training without ComfyUI.

    python -m facechain_core train --images DIR --checkpoint FILE --out FILE [options]

DIR holds photos of one person: each is aligned as FaceAlign does (``--no-align``: the images are used as
they are, centre-cropped square and resized). FILE is an SD1.5 single-file checkpoint (.safetensors); the
model configs ship with the pack, nothing is downloaded. The LoRA is written with kohya key names (ComfyUI's
LoraLoader, A1111 and Forge load it), to a temporary name first; an existing file is kept unless
``--overwrite``. Ctrl-C stops within one step and writes nothing.

    python -m facechain_core portraits --photos DIR --checkpoint FILE --style NAME --out DIR
    python -m facechain_core batch --people DIR --scheduler local|ADDRESS --checkpoint FILE --out DIR

run the whole pipeline for one person, or for many on Dask (facechain_core/pipeline.py, batch.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .errors import FaceChainError


def _square(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.LANCZOS))


def prepare_images(folder: str, size: int, align: bool, detector: str) -> tuple[list[str], np.ndarray, str]:
    from .images import list_photos, load_photo

    files = list_photos(folder)
    photos = [(p.name, load_photo(p)) for p in files]
    if align:
        from .align import AlignSettings, align_photos

        result = align_photos(photos, AlignSettings(size=size, backend=detector))
        return [a.name for a in result.aligned], np.stack([a.image for a in result.aligned]), result.report_text()
    return [n for n, _ in photos], np.stack([_square(img, size) for _, img in photos]), \
        f"{len(photos)} images, centre-cropped to {size}x{size}"


def console_progress(every_s: float = 2.0):
    last = {"t": 0.0}

    def show(done, total, info=None):
        now = time.monotonic()
        if now - last["t"] >= every_s or done >= total:
            last["t"] = now
            print(f"\r[{done}/{total}] {info or ''}".ljust(60), end="" if done < total else "\n", flush=True)

    return show


def train_command(args) -> int:
    from . import standalone
    from .train import TrainSettings, check_free, resolve_captions

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise FaceChainError(f"--out must name a .safetensors file (got {out.name}).")
    check_free(out, args.overwrite)
    names, images, report = prepare_images(args.images, args.size, not args.no_align, args.detector)
    print(report)
    lines = Path(args.captions).read_text(encoding="utf-8") if args.captions else ""
    captions, trigger = resolve_captions(len(images), None, lines, args.trigger)
    device, dtype = standalone.choose_device(args.device, args.precision)
    print(f"loading {args.checkpoint} ({device}, {str(dtype).replace('torch.', '')})", flush=True)
    models = standalone.load_models(args.checkpoint, device, dtype)
    settings = TrainSettings().with_(rank=args.rank, learning_rate=args.lr, samples=args.samples,
                                     batch_size=args.batch_size, flip=not args.no_flip, seed=args.seed,
                                     train_text_encoder=args.train_text_encoder, precision=args.precision,
                                     gradient_checkpointing=args.gradient_checkpointing or None,
                                     compile=args.compile or None).validate()
    result = standalone.train_and_save(models, images, captions, trigger, settings, out, names, args.overwrite,
                                       console_progress(), "as set" if args.memory == "as-set" else "auto")
    print(f"LoRA saved: {out}\ntrigger: {trigger}\n{result.summary()}")
    return 0


def main(argv=None) -> int:
    from .train import defaults

    d = defaults()
    ap = argparse.ArgumentParser(prog="python -m facechain_core", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a face LoRA from photos and an SD1.5 checkpoint")
    t.add_argument("--images", required=True, help="folder of photos of one person")
    t.add_argument("--checkpoint", required=True, help="SD1.5 single-file checkpoint (.safetensors)")
    t.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    t.add_argument("--trigger", default="fcsks", help="the made-up word the LoRA learns as this person")
    t.add_argument("--captions", default=None, help="text file: one caption per image (name order) or one for all")
    t.add_argument("--size", type=int, default=512, help="training resolution (a multiple of 64)")
    t.add_argument("--no-align", action="store_true", help="use the images as they are (centre crop + resize)")
    t.add_argument("--detector", default="embedded", help="face detector for alignment")
    t.add_argument("--samples", type=int, default=d["samples"], help="total training samples seen")
    t.add_argument("--batch-size", type=int, default=d["batch_size"])
    t.add_argument("--rank", type=int, default=d["rank"])
    t.add_argument("--lr", type=float, default=d["learning_rate"], help="learning rate at batch size 1")
    t.add_argument("--seed", type=int, default=d["seed"])
    t.add_argument("--no-flip", action="store_true", help="no random mirroring")
    t.add_argument("--train-text-encoder", action="store_true")
    t.add_argument("--precision", default=d["precision"], choices=["auto", "bf16", "fp16", "fp32"])
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--compile", action="store_true", help="torch.compile the UNet (CUDA)")
    t.add_argument("--memory", default="auto", choices=["auto", "as-set"],
                   help="auto: pick the batch size and recomputation that fit the GPU's free memory (an error "
                        "before any work if nothing fits); as-set: --batch-size as given, a warning if it may not fit")
    t.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    from .pipeline_cli import add_batch_parser, add_portraits_parser

    add_portraits_parser(sub)
    add_batch_parser(sub)
    args = ap.parse_args(argv)
    try:
        return args.run(args) if hasattr(args, "run") else train_command(args)
    except FaceChainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        done = ": nothing written" if args.command == "train" else "; the manifests say where each person stopped"
        print(f"\ncancelled{done}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
