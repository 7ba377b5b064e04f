"""What FaceFusion + RTSRank add to the time the host spends sampling the portraits they work on.

    python benchmarks/bench_generate.py     # on a CUDA machine: full-size SD1.5, 8 x 512x512, 30 steps
    # smoke test:
    python benchmarks/bench_generate.py --cpu --checkpoint .cache/tiny_sd15.safetensors --size 64 --steps 3

Sampling: ComfyUI's own code (checkpoint loader, text encoder, `comfy.sample.sample` as KSampler calls it,
VAE decode) on an SD1.5-shaped checkpoint. Without --checkpoint one is built on the spot with the full
SD1.5 UNet, VAE and CLIP-L shapes and random weights (speed does not depend on the weights).

FaceFusion + RTSRank: the pack's own node classes, called as the host calls them, on 8 portraits of
512x512. A random-weight model draws no faces, and an image without a face costs the nodes almost
nothing, so the portraits here are real photos framed like FaceChain's output (FaceAlign crops of the
people in --faces): the worst case, where every image has a face to fuse, embed and rank.

Prints one JSON line with the medians and the ratio.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from bench_paths import REPO, SHARED_FACES  # noqa: E402  (puts the checkout and scripts/ on sys.path)
from comfy_host import import_comfy  # noqa: E402
from tiny_checkpoint import SD15_UNET, save_random_checkpoint  # noqa: E402  (the one home of the full UNet shape)

PORTRAITS = ["obama/obama1.jpg", "obama/obama2.jpg", "obama/obama3.jpg", "biden/biden1.jpg", "biden/biden2.jpg",
             "rose_leslie/rose1.jpg", "rose_leslie/rose2.jpg", "obama/obama4_240p.jpg"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", type=Path, default=REPO / ".cache" / "ComfyUI", help="ComfyUI's source folder")
    ap.add_argument("--checkpoint", type=Path, help="an SD1.5 checkpoint (default: build a random full-size one)")
    ap.add_argument("--faces", type=Path, default=SHARED_FACES, help="the shared photo folders")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU (smoke test)")
    ap.add_argument("--portrait-size", type=int, default=512, help="side of the portraits FaceFusion/RTSRank get")
    ap.add_argument("--template", choices=["crop", "photo"], default="crop",
                    help="template face as the workflows feed it (Template Face's 512 crop) or a whole photo")
    ap.add_argument("--skip-sampling", action="store_true", help="time FaceFusion + RTSRank only")
    ap.add_argument("--references", type=int, default=0,
                    help="also connect this many aligned crops of the template's person as the likeness reference "
                         "of both nodes, as the train+generate workflow connects the training crops (0: template only)")
    return ap.parse_args()


def boot_comfy(comfy_dir: Path, cpu: bool):
    import_comfy(comfy_dir, cpu)
    import comfy.sample  # noqa: F401
    import comfy.sd  # noqa: F401


def build_random_sd15(out: Path) -> Path:
    """A full-size SD1.5-shaped checkpoint with random weights, fp16 (scripts/tiny_checkpoint.py, full UNet)."""
    return save_random_checkpoint(out, SD15_UNET)


def time_sampling(ckpt: Path, n: int, size: int, steps: int, repeats: int) -> dict:
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:4]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("fcsks, a person, professional headshot"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("lowres, blurry"))
    latent = torch.zeros([n, 4, size // 8, size // 8])

    def sync():
        if torch.cuda.is_available() and not mm.cpu_mode():
            torch.cuda.synchronize()

    def sample(seed, k_steps):
        noise = comfy.sample.prepare_noise(latent, seed)
        return comfy.sample.sample(model, noise, k_steps, 7.0, "dpmpp_2m", "karras", pos, neg, latent,
                                   denoise=1.0, seed=seed, disable_pbar=True)

    sample(0, 2)  # load the weights onto the device, warm the kernels
    vae.decode(sample(0, 1)[:1])
    sync()
    runs, decodes = [], []
    samples = None
    for r in range(repeats):
        t = time.perf_counter()
        samples = sample(r + 1, steps)
        sync()
        runs.append(time.perf_counter() - t)
        t = time.perf_counter()
        vae.decode(samples)
        sync()
        decodes.append(time.perf_counter() - t)
    return {"sampling_s": statistics.median(runs), "sampling_runs_s": [round(x, 4) for x in runs],
            "vae_decode_s": statistics.median(decodes)}


def pack_module(name: str):
    """A module of the pack (``nodes.face_fusion``), imported as the host imports the pack (a package, so the
    nodes' relative imports work), but without the pack's nodes/__init__ (which would load every node's
    dependencies). ComfyUI must be importable first."""
    if "facechain_pack" not in sys.modules:
        pkg = types.ModuleType("facechain_pack")
        pkg.__path__ = [str(REPO)]
        sys.modules["facechain_pack"] = pkg
        sub = types.ModuleType("facechain_pack.nodes")
        sub.__path__ = [str(REPO / "nodes")]
        sys.modules["facechain_pack.nodes"] = sub
    return importlib.import_module(f"facechain_pack.{name}")


def import_pack_nodes():
    """The pack's FaceFusion and RTSRank node classes, and the library's align and images modules."""
    fusion = pack_module("nodes.face_fusion")
    rank = pack_module("nodes.rts_rank")
    return fusion.FaceFusion, rank.RTSRank, pack_module("facechain_core.align"), pack_module("facechain_core.images")


def portrait_arrays(faces: Path, n: int, size: int, align, images, template_kind: str = "crop"):
    """n real portraits framed like FaceChain's output (FaceAlign crops) as RGB uint8 arrays, and the template:
    the 512 crop that Template Face outputs in the bundled workflows ("crop"), or the whole photo ("photo")."""
    crops = []
    for rel in (PORTRAITS * (n // len(PORTRAITS) + 1))[:n]:
        crop, why = align.align_photo(images.load_photo(faces / rel), rel, align.AlignSettings(size=size))
        if crop is None:
            raise SystemExit(f"{rel}: {why}")
        crops.append(crop.image)
    photo = images.load_photo(faces / "obama" / "obama1.jpg")
    if template_kind == "crop":
        photo = align.align_photo(photo, "obama1.jpg", align.AlignSettings(size=512))[0].image
    return crops, photo


def portraits(faces: Path, n: int, size: int, align, images, template_kind: str = "crop"):
    """``portrait_arrays`` as IMAGE tensors: the batch and the template."""
    import numpy as np
    import torch

    crops, photo = portrait_arrays(faces, n, size, align, images, template_kind)
    batch = torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0)
    template = torch.from_numpy(photo.astype(np.float32) / 255.0)[None]
    return batch, template


def training_crops(faces: Path, k: int, align, images):
    """k aligned 512 crops of obama (the template's person), repeated as needed: the training crops."""
    import numpy as np
    import torch

    photos = sorted((faces / "obama").glob("*.jpg"))
    crops = [align.align_photo(images.load_photo(p), p.name, align.AlignSettings(size=512))[0].image
             for p in (photos * (k // len(photos) + 1))[:k]]
    return torch.from_numpy(np.stack(crops).astype(np.float32) / 255.0)


def time_fuse_rank(faces: Path, n: int, size: int, repeats: int, template_kind: str = "crop",
                   references: int = 0) -> dict:
    FaceFusion, RTSRank, align, images = import_pack_nodes()
    batch, template = portraits(faces, n, size, align, images, template_kind)
    refs = [training_crops(faces, references, align, images)] if references else None
    fusion, rank = FaceFusion(), RTSRank()
    cpu = []  # CPU seconds per wall second of each run (1 = one core busy throughout)
    remembered = importlib.import_module("facechain_pack.facechain_core.photo_embeddings")._cache

    def once():
        remembered.clear()  # each prompt embeds the references once (FaceFusion), RTSRank finds them remembered
        cpu.append(time.process_time())
        t0 = time.perf_counter()
        fused = fusion.fuse([batch], [template], [1.0], ["embedded"], reference=refs)["result"]
        t1 = time.perf_counter()
        ranked = rank.rank(fused[0], refs or [template], [4], ["embedded"], [0.12], [0.85], ["return unranked"],
                           detections=[fused[3]])["result"]
        t2 = time.perf_counter()
        cpu[-1] = (time.process_time() - cpu[-1]) / (t2 - t0)
        return t1 - t0, t2 - t1, fused[2], ranked[2]

    once()  # load YuNet and SFace in the worker threads, start the helper processes
    fusion_lib = importlib.import_module("facechain_pack.facechain_core.fusion")
    helpers = fusion_lib.helper_pool(fusion_lib.FusionSettings())
    ready = helpers.wait(120) if helpers else 0  # as in a host's later prompts
    f_runs, r_runs = [], []
    for _ in range(repeats):
        f, r, fusion_report, rank_report = once()
        f_runs.append(f)
        r_runs.append(r)
    # The same work through the library in a chosen number of threads and no helper processes: how the
    # default (threads and, on 8 or more cores, helpers) compares with threads alone.
    rank_lib = importlib.import_module("facechain_pack.facechain_core.rank")
    arrays = [(a * 255 + 0.5).astype("uint8") for a in batch.numpy()]
    tpl = (template[0].numpy() * 255 + 0.5).astype("uint8")
    sweep = {}
    for workers in (1, 2, 4, 8, 16):
        times = []
        for _ in range(repeats + 1):  # the first run of a new pool loads the models in its threads
            t = time.perf_counter()
            fused = fusion_lib.fuse_images(arrays, tpl, fusion_lib.FusionSettings(workers=workers, processes=0))
            rank_lib.rank_images([f.image for f in fused.images], [tpl], rank_lib.RankSettings(workers=workers),
                                 detections=fused.detections())
            times.append(time.perf_counter() - t)
        sweep[str(workers)] = round(statistics.median(times[1:]), 4)
    return {"fusion_s": statistics.median(f_runs), "rank_s": statistics.median(r_runs),
            "fusion_runs_s": [round(x, 4) for x in f_runs], "rank_runs_s": [round(x, 4) for x in r_runs],
            "fused": fusion_report.splitlines()[0], "ranked": rank_report.splitlines()[0],
            "cores_busy": round(statistics.median(cpu[1:]), 2),
            "nets_device": importlib.import_module("facechain_pack.facechain_core.onnx_torch").nets_device() or "cpu",
            "default_workers": importlib.import_module("facechain_pack.facechain_core.threads").default_workers(n),
            "helper_processes": ready, "fusion_plus_rank_by_workers_s": sweep}


def main() -> None:
    args = parse_args()
    boot_comfy(args.comfy, args.cpu)
    import torch

    fuse_rank = time_fuse_rank(args.faces, args.images, args.portrait_size, args.repeats, args.template,
                               args.references)
    if args.skip_sampling:
        print(json.dumps(fuse_rank), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint
        if ckpt is None:
            t = time.perf_counter()
            ckpt = build_random_sd15(Path(tmp) / "sd15_random.safetensors")
            print(f"built a random full-size SD1.5 checkpoint in {time.perf_counter() - t:.1f} s", flush=True)
        sampling = time_sampling(ckpt, args.images, args.size, args.steps, args.repeats)
    added = fuse_rank["fusion_s"] + fuse_rank["rank_s"]
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else "cpu",
        "cpu_cores": os.cpu_count(), "images": args.images, "size": args.size, "steps": args.steps,
        "portrait_size": args.portrait_size, "template": args.template, "references": args.references,
        **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in {**sampling, **fuse_rank}.items()},
        "fusion_plus_rank_s": round(added, 4),
        "added_to_sampling": round(added / sampling["sampling_s"], 4),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
