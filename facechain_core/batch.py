"""Portraits for many people on Dask distributed: one task per person, one worker per GPU.

    python -m facechain_core batch --people DIR --scheduler local|ADDRESS --checkpoint FILE --style NAME --out DIR

Each subfolder of ``--people`` is one person (their photos). Each person's results go to ``--out/<person>/``
with its own ``manifest.json`` (status, timings per stage, likeness scores, errors); a failed person is
recorded and the others go on; a person whose manifest says ``done`` is skipped on the next run.
``--out/batch.json`` sums the run up (throughput in people per minute).

Workers: every task asks for one ``GPU`` resource, so a worker runs one person at a time. ``local`` starts
a cluster on this machine with one worker process per visible GPU (each sees only its own card through
CUDA_VISIBLE_DEVICES), or ``--workers N`` CPU workers (a "GPU" slot each: one person at a time). Elsewhere
start a scheduler and, on each GPU host, one worker per GPU:

    dask scheduler
    CUDA_VISIBLE_DEVICES=0 dask worker tcp://SCHEDULER:8786 --nthreads 1 --resources GPU=1
    CUDA_VISIBLE_DEVICES=1 dask worker tcp://SCHEDULER:8786 --nthreads 1 --resources GPU=1

(the pack on the workers' PYTHONPATH, the checkpoint and the people folders at the same paths: a shared or
object-store mount; see docs/scale-out.md). ``--comfy URL[,URL]`` sends each person to a pool of running
ComfyUI servers instead (the bundled API workflow, as scripts/facechain_client.py submits it).

Dask is optional: ``pip install "dask[distributed]"``.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

from .errors import FaceChainError
from .pipeline import REPO, make_portraits, read_manifest, write_json_atomic

INSTALL = 'pip install "dask[distributed]"'
RESOURCE = "GPU"


def require_dask():
    try:
        import distributed
    except ImportError:
        raise FaceChainError(f"Batch mode runs on Dask distributed, which is not installed here: {INSTALL} "
                             f"(on the workers too).") from None
    return distributed


def people_in(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceChainError(f"--people {folder} is not a folder; give a folder with one subfolder of photos per "
                             f"person.")
    people = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not people:
        raise FaceChainError(f"{folder} has no subfolders: put each person's photos in their own subfolder.")
    return people


# --- what a worker runs -------------------------------------------------------------------------------------

def person_task(photos: str, out: str, checkpoint: str, style: str, overrides: dict, device: str,
                lora_dirs: list[str] | None) -> dict:
    """One person through the standalone pipeline on this worker (its model stays loaded for the next)."""
    return make_portraits(photos, checkpoint, style, out, overrides, device, lora_dirs, log=lambda text: None)


def comfy_task(photos: str, out: str, servers: list[str], checkpoint: str, style: str, overrides: dict) -> dict:
    """One person through the bundled API workflow on the least busy ComfyUI server of the pool."""
    out_dir = Path(out)
    manifest = {"person": Path(photos).name, "status": "running", "mode": "comfy", "timings": {}, "error": None,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t0 = time.perf_counter()
    try:
        client = _client_script()
        server = client.Server(_least_busy(client, servers))
        manifest["server"] = server.url
        args = _client_args(Path(photos), checkpoint, style, overrides)
        prompt = client.build_prompt(args, server)
        manifest["timings"]["upload"] = round(time.perf_counter() - t0, 3)
        prompt_id = client.wait_polling(server, prompt)
        manifest["timings"]["queue_and_run"] = round(time.perf_counter() - t0 - manifest["timings"]["upload"], 3)
        saved = client.finish(server, prompt, prompt_id, out_dir)
        report = out_dir / "ranking.txt"
        manifest.update(status="done", prompt_id=prompt_id, portraits=[{"file": p.name, "rank": i + 1}
                                                                       for i, p in enumerate(saved)],
                        reports={"rank": report.read_text() if report.is_file() else ""})
    except SystemExit as e:  # the client script's way of saying what failed
        manifest.update(status="failed", error=str(e))
    except Exception as e:  # recorded: one person's failure must not stop the batch
        manifest.update(status="failed", error=f"{type(e).__name__}: {e}")
    manifest["timings"]["total"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _client_script():
    """scripts/facechain_client.py, the pack's API client (upload, submit, fetch), loaded as a module."""
    path = REPO / "scripts" / "facechain_client.py"
    spec = importlib.util.spec_from_file_location("facechain_client", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _least_busy(client, servers: list[str]) -> str:
    """The server with the fewest prompts running or waiting (ComfyUI queues the rest itself)."""
    loads = []
    for url in servers:
        try:
            q = client.Server(url).get("/queue")
            loads.append((len(q.get("queue_running", [])) + len(q.get("queue_pending", [])), url))
        except OSError:
            continue  # down: skip it
    if not loads:
        raise FaceChainError(f"No ComfyUI server of the pool answers ({', '.join(servers)}); start them first.")
    return min(loads)[1]


def _client_args(photos: Path, checkpoint: str, style: str, overrides: dict):
    """The client script's arguments: the overrides ("NodeType.input") become its --set NODE_ID.INPUT=JSON."""
    import json
    from types import SimpleNamespace

    from .pipeline import WORKFLOW, settings

    settings(overrides)  # an unknown setting fails here, before anything is uploaded
    prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    sets = [f"{nid}.{key.partition('.')[2]}={json.dumps(value)}" for key, value in overrides.items()
            for nid, node in prompt.items() if node["class_type"] == key.partition(".")[0]]
    return SimpleNamespace(photos=photos, face_lora=None, workflow=None, template=None,
                           checkpoint=Path(checkpoint).name, style=style, lora_name=None, samples=None, size=None,
                           count=None, steps=None, seed=None, top=None, set=sets, trigger="fcsks")


# --- the client side -----------------------------------------------------------------------------------------

def local_cluster(workers: int | None = None, comfy_pool: int = 0, gpus: int | None = None):
    """A cluster on this machine: one worker per visible GPU (the first ``gpus`` of them when given), or
    ``workers`` CPU workers, or one worker per ComfyUI server of a pool. Returns (cluster, GPUs used)."""
    require_dask()
    from distributed import Nanny, Scheduler, SpecCluster

    if not workers and not comfy_pool:
        import torch

        gpus = min(torch.cuda.device_count(), gpus or 1 << 20)
    else:
        gpus = 0
    count = comfy_pool or gpus or workers or 1
    threads = max(1, (os.cpu_count() or 1) // count)
    specs = {}
    for i in range(count):
        env = {"CUDA_VISIBLE_DEVICES": str(i)} if gpus else {"OMP_NUM_THREADS": str(threads)}
        specs[f"{'gpu' if gpus else 'worker'}{i}"] = {"cls": Nanny, "options": {
            "nthreads": 1, "resources": {RESOURCE: 1}, "memory_limit": 0, "env": env, "dashboard": False,
            "silence_logs": 40}}
    scheduler = {"cls": Scheduler, "options": {"dashboard": False, "dashboard_address": None, "port": 0,
                                               "host": "127.0.0.1"}}
    return SpecCluster(workers=specs, scheduler=scheduler, silence_logs=40), gpus


def run_batch(people_dir, out_dir, scheduler: str = "local", checkpoint: str = "", style: str = "Studio Headshot",
              overrides: dict | None = None, device: str = "auto", workers: int | None = None,
              lora_dirs: list[str] | None = None, comfy: list[str] | None = None, log=print, client=None) -> dict:
    """Run every person not yet done; returns (and writes to out/batch.json) the summary. ``client``: a
    connected ``distributed.Client`` to use instead of ``scheduler`` (the benchmark warms its workers first)."""
    distributed = require_dask()
    people = people_in(people_dir)
    out = Path(out_dir)
    todo, skipped = [], []
    for p in people:
        done = (read_manifest(out / p.name) or {}).get("status") == "done"
        (skipped if done else todo).append(p)
    if skipped:
        log(f"skipping {len(skipped)} already done: {', '.join(p.name for p in skipped)}")
    own = client is None
    cluster, gpus = local_cluster(workers, len(comfy or [])) if own and scheduler == "local" else (None, None)
    t0 = time.perf_counter()
    results = {}
    try:
        client = client or distributed.Client(cluster or scheduler)
        n_workers = len(client.nthreads())
        log(f"{n_workers} workers ({scheduler}{f', {gpus} GPUs' if gpus else ''}); {len(todo)} people to run")
        futures = {}
        for p in todo:
            if comfy:
                f = client.submit(comfy_task, str(p), str(out / p.name), comfy, checkpoint, style,
                                  dict(overrides or {}), key=f"comfy-{p.name}-{time.time_ns()}", pure=False)
            else:
                f = client.submit(person_task, str(p), str(out / p.name), str(checkpoint), style,
                                  dict(overrides or {}), device, lora_dirs, resources={RESOURCE: 1},
                                  key=f"person-{p.name}-{time.time_ns()}", pure=False)
            futures[f] = p
        for f in distributed.as_completed(futures):
            results[futures[f].name] = _outcome(f, futures[f], out, log)
    finally:
        if own and client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return _summary(out, people, results, skipped, time.perf_counter() - t0, scheduler, gpus)


def _outcome(future, person: Path, out: Path, log) -> dict:
    try:
        m = future.result()
    except Exception as e:  # the worker itself died (out of memory, a crash): recorded like any failure
        m = {"person": person.name, "status": "failed", "error": f"worker lost: {type(e).__name__}: {e}",
             "timings": {}}
        write_json_atomic(out / person.name / "manifest.json", m)
    t = m.get("timings", {}).get("total")
    log(f"{person.name}: {m['status']}" + (f" in {t:.1f} s" if t else "") +
        (f" ({m['error'].splitlines()[0]})" if m.get("error") else ""))
    return m


def _summary(out: Path, people: list[Path], results: dict, skipped: list[Path], wall: float, scheduler: str,
             gpus) -> dict:
    done = [n for n, m in results.items() if m["status"] == "done"]
    summary = {"scheduler": scheduler, "gpus": gpus, "wall_s": round(wall, 3), "ran": len(results),
               "done": len(done), "failed": sorted(n for n, m in results.items() if m["status"] != "done"),
               "skipped": [p.name for p in skipped], "people_per_min": round(60 * len(done) / wall, 3) if wall else 0,
               "people": {p.name: (results.get(p.name) or read_manifest(out / p.name) or {}).get("status")
                          for p in people}}
    write_json_atomic(out / "batch.json", summary)
    return summary
