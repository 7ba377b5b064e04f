"""The main job: start a real ComfyUI with this pack, run a bundled API workflow on a folder of photos.

    .venv/bin/python scripts/run_example.py [--photos DIR] [--checkpoint FILE] [--workflow FILE] [--out DIR]

Defaults: the photos in ../shared/faces/obama, the train-and-generate workflow (or the most complete one
bundled), and a tiny random-weight SD1.5 checkpoint built on the spot when no checkpoint is given (it
shows the graph runs; real portraits need a real SD1.5 checkpoint). Output images land in --out, with a one-page
report of the run (--out/report.html and the contact sheet --out/report.png; see scripts/run_report.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import run_report  # noqa: E402
import tiny_checkpoint  # noqa: E402
from comfy_host import CACHE, ComfyClient, ComfyServer, install_comfyui  # noqa: E402

# With no checkpoint given, the tiny random-weight model runs the graph on a CPU in a minute or two: these
# inputs (by node type) keep it that small. A real checkpoint runs the workflow's own settings.
TINY_MODEL_INPUTS = {
    "FaceChainFaceAlign": {"size": 256},
    "FaceChainTrainFaceLoRA": {"samples": 40, "batch_size": 4},
    "EmptyLatentImage": {"width": 128, "height": 128, "batch_size": 4},
    "KSampler": {"steps": 10},
}
# Every run of the example trains the same name again.
EXAMPLE_INPUTS = {"FaceChainTrainFaceLoRA": {"name": "example_face", "overwrite": True}}

TINY_MODEL_NOTE = ("The portraits are noise: no --checkpoint was given, so this run used a tiny random-weight "
                   "SD1.5-shaped model that only shows the graph runs offline. Run again with --checkpoint "
                   "FILE.safetensors (a real SD1.5 checkpoint) for real portraits; everything before sampling "
                   "(crops, masks, retouching, captions, template face) is already real.")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}

PREFERRED = ["facechain_train_generate_api.json", "facechain_generate_api.json",
             "facechain_preprocess_api.json", "facechain_align_api.json"]


def default_workflow() -> Path:
    for name in PREFERRED:
        if (REPO / "workflows" / "api" / name).is_file():
            return REPO / "workflows" / "api" / name
    raise SystemExit("no API workflow found in workflows/api/")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, default=REPO.parent / "shared" / "faces" / "obama")
    ap.add_argument("--checkpoint", type=Path, help="an SD1.5 .safetensors checkpoint (default: tiny test model)")
    ap.add_argument("--workflow", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "example_output")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=JSON",
                    help="override a workflow input, e.g. --set 2.size=256")
    args = ap.parse_args()
    workflow = args.workflow or default_workflow()
    prompt = json.loads(workflow.read_text())

    base = CACHE / "example_host"
    server = ComfyServer(base)
    server.prepare()
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = CACHE / "tiny_sd15.safetensors"
        tiny_checkpoint.ensure(ckpt)
    ckpt_link = base / "models" / "checkpoints" / ckpt.name
    if not ckpt_link.exists():
        ckpt_link.symlink_to(ckpt.resolve())
    photos_dir = base / "input" / "facechain_example"
    shutil.rmtree(photos_dir, ignore_errors=True)
    shutil.copytree(args.photos, photos_dir)

    overrides = dict(EXAMPLE_INPUTS)
    if args.checkpoint is None:
        for cls, values in TINY_MODEL_INPUTS.items():
            overrides[cls] = {**overrides.get(cls, {}), **values}
    for node in prompt.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            if name in node["inputs"]:
                node["inputs"][name] = value
        if node["class_type"] == "FaceChainLoadPhotos":
            node["inputs"]["folder"] = photos_dir.name
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt.name
    for item in args.set:
        key, value = item.split("=", 1)
        node_id, name = key.split(".", 1)
        prompt[node_id]["inputs"][name] = json.loads(value)

    install_comfyui()
    print(f"starting ComfyUI (log: {server.log_path}) ...", flush=True)
    with server:
        client = ComfyClient(server.url)
        t = time.time()
        print(f"running {workflow.name} on {len(list(photos_dir.iterdir()))} photos from {args.photos} ...", flush=True)
        entry = client.run(prompt, timeout=3600)
        args.out.mkdir(parents=True, exist_ok=True)
        saved = 0
        for node_id, out in entry["outputs"].items():
            for text in out.get("text", []):
                print(f"[{prompt[node_id]['class_type']}]\n{text}")
            in_node = prompt[node_id]["class_type"].startswith("FaceChain")  # the editor's in-node thumbnails
            for img in [] if in_node else out.get("images", []):
                data = client.view(img["filename"], img.get("subfolder", ""), img.get("type", "output"))
                target = args.out / f"{node_id}_{img['filename'].replace('/', '_')}"
                tmp = target.with_name("." + target.name + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, target)
                saved += 1
        print(f"done in {time.time() - t:.1f} s: {saved} images in {args.out}")
        photos = sorted(p for p in photos_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        run = run_report.collect(prompt, entry, lambda img: client.view(img["filename"], img.get("subfolder", ""),
                                                                        img.get("type", "output")), photos,
                                 title=f"FaceChain run: {workflow.stem} on {len(photos)} photos from {args.photos}")
        if args.checkpoint is None:
            run.notes.append(TINY_MODEL_NOTE)
        page, sheet = run_report.write(run, args.out)
        print(f"report: {page} (contact sheet {sheet})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
