"""Where FaceFusion + RTSRank spend their wall time, stage by stage, on the portraits bench_generate uses.

    python benchmarks/profile_fusion.py --faces ../shared/faces --repeats 5
    python benchmarks/profile_fusion.py --cv2-threads 1 --switch-interval 0.0001   # what-ifs

Stages (the library's own functions, in the order ``fusion.fuse_images`` runs them): ``look`` (the template's and
the images' faces, meshes and vectors, each net once for all: ``_looks``), ``start`` (each image's guards, warp,
colour work and blends handed to the helpers or made side by side: ``start_all``), ``check`` (each rung checked as
its blend comes: ``run_tries``), ``finish``, then ``rank`` (RTSRank on the results).
Also the CPU seconds per wall second (``cores_busy``) and where the embedded nets ran. No ComfyUI needed. Prints
one JSON line.

``--timeline FILE``: every timed call of the last run as an event (thread, step, start, end in ms from the run's
start) written to FILE, and in the printed line, per stage, its wall time and how long some call of each step
was running in it (the nets, the helper jobs, the blends), in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from bench_paths import SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)
from bench_generate import PORTRAITS, portrait_arrays  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", default=str(SHARED_FACES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0, help="threads (0: the library's default)")
    ap.add_argument("--processes", type=int, default=-1,
                    help="helper processes for the warp and colour work (-1: the library's default, 0: none)")
    ap.add_argument("--cv2-threads", type=int, default=-1,
                    help="OpenCV's threads outside the pools (a pool divides them among its threads; -1: leave)")
    ap.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (0: leave)")
    ap.add_argument("--timeline", default=None, help="write the last run's timed calls here (JSON)")
    return ap.parse_args(argv)


def time_functions(fusion) -> tuple[dict, Callable[[], None]]:
    """Wrap the costly steps fusion calls (by its module's names) to add up their seconds over all threads;
    returns the seconds by step and what puts the functions back."""
    from facechain_core import processes

    spent: dict = {}
    lock = threading.Lock()
    names = ("detect_faces_many", "embed_faces", "face_meshes", "prepared_face", "_blend_patch", "_looks",
             "start_fusing", "judge", "try_rungs", "_after_checks")
    places = [(fusion, name, name) for name in names] + [
        (fusion.fg, "warp_patch", "warp_patch"), (fusion.fb, "sharpness", "sharpness"),
        (processes.ProcessPool, "run_parts", "helper_send"), (processes, "wait_any", "helper_wait")]
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in places]
    for owner, attr, step in places:
        setattr(owner, attr, _wrap(getattr(owner, attr), step, spent, lock))

    def undo():
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
    return spent, undo


EVENTS: list | None = None  # (thread, step, start, end) of each timed call, while a timeline is recorded


def _wrap(fn, name, spent, lock):
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            end = time.perf_counter()
            with lock:
                spent[name] = spent.get(name, 0.0) + end - t
                if EVENTS is not None:
                    EVENTS.append((threading.get_ident(), name, t, end))
    return timed


STEPS = ("detect_faces_many", "embed_faces", "face_meshes", "helper_send", "helper_wait", "judge", "_blend_patch",
         "sharpness")


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the spans."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def timeline_summary(events: list, stages: dict) -> dict:
    """Per stage (name -> (start, end)): its wall time and, for each step, how long some call of it ran inside
    the stage (the union of its calls' spans, cut to the stage), in ms."""
    out = {}
    for name, (start, end) in stages.items():
        row = {"wall": round((end - start) * 1000, 1)}
        for step in STEPS:
            spans = [(max(a, start), min(b, end)) for _, n, a, b in events if n == step and a < end and b > start]
            if spans:
                row[step] = round(_covered(spans) * 1000, 1)
        out[name] = row
    return out


def main(argv=None) -> None:
    import cv2

    from facechain_core import align, fusion, images, rank
    from facechain_core.onnx_torch import nets_device

    args = parse_args(argv)
    if args.cv2_threads >= 0:
        cv2.setNumThreads(args.cv2_threads)
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    faces = Path(args.faces)
    crops, tpl_rgb = portrait_arrays(faces, len(PORTRAITS), 512, align, images, "crop")
    s = fusion.FusionSettings(workers=args.workers, processes=args.processes)
    spent, undo = time_functions(fusion)
    stages: list[dict] = []  # each run's stages: name -> (start, end)

    def once() -> dict:
        t, spans = {}, {}
        c0, w0 = time.process_time(), time.perf_counter()
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            t[name], spans[name] = now - clock, (clock, now)
            clock = now

        looked = fusion._looks(["tpl"] + ["img"] * len(crops), [tpl_rgb] + crops, s)
        tpl, found = looked[0], looked[1:]
        lap("look")
        jobs = fusion.start_all(crops, found, tpl, s)
        lap("start")
        fusion.run_tries(jobs, tpl, s)
        lap("check")
        out = [j if isinstance(j, fusion.FusedImage) else fusion.finish_fusing(j, tpl) for j in jobs]
        result = fusion.FusionResult(out)
        lap("finish")
        rank.rank_images([f.image for f in out], [tpl_rgb], rank.RankSettings(workers=args.workers),
                         detections=result.detections())
        lap("rank")
        stages.append(spans)
        live = [j for j in jobs if isinstance(j, fusion._Fusing)]
        t["total"] = time.perf_counter() - w0
        t["cores_busy"] = (time.process_time() - c0) / t["total"]
        t["tries"] = sum(len(j.tries) for j in live)
        t["fused"] = sum(f.fused for f in out)
        return t

    global EVENTS
    try:
        once()  # models loaded in the pool's threads, CUDA graphs captured
        helpers = fusion.helper_pool(s)  # started by that first run, in the background (as a host's first prompt)
        ready = helpers.wait(120) if helpers else 0
        spent.clear()
        runs = [once() for _ in range(max(1, args.repeats) - 1)]
        if args.timeline:
            EVENTS = []
        runs.append(once())
    finally:
        events, EVENTS = EVENTS, None
        undo()
    result = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    result["total_runs_s"] = [round(r["total"], 4) for r in runs]
    result["thread_seconds_per_run"] = {k: round(v / len(runs), 4) for k, v in sorted(spent.items())}
    result.update(nets=nets_device() or "cpu", cpu_cores=os.cpu_count(), cv2_threads=cv2.getNumThreads(),
                  switch_interval=sys.getswitchinterval(), workers=args.workers,
                  helper_processes=ready, helper_jobs=helpers.remote_jobs if helpers else 0)
    if events is not None:
        result["timeline"] = timeline_summary(events, stages[-1])
        origin = stages[-1]["look"][0]
        threads = {thread: i for i, thread in enumerate(dict.fromkeys(e[0] for e in events))}
        rows = [{"thread": threads[th], "step": name, "start_ms": round((a - origin) * 1000, 2),
                 "end_ms": round((b - origin) * 1000, 2)} for th, name, a, b in events]
        Path(args.timeline).write_text(json.dumps(rows))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
