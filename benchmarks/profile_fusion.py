"""Where FaceFusion + RTSRank spend their wall time, stage by stage, on the portraits bench_generate uses.

    python benchmarks/profile_fusion.py --faces ../shared/faces --repeats 5
    python benchmarks/profile_fusion.py --cv2-threads 1 --switch-interval 0.0001   # what-ifs

Stages (the library's own functions, in the order ``fusion.fuse_images`` runs them): ``template`` (the
template's face, mesh and vector), ``look_first_try`` (each image's faces, mesh and vector, guards, warp,
colour work, and the first rung with its after-check, one job per image), ``other_tries`` (the rungs after a
failed first), ``finish``, then ``rank`` (RTSRank on the results). Also the CPU seconds per wall second
(``cores_busy``) and where the embedded nets ran. No ComfyUI needed. Prints one JSON line.

``--timeline FILE``: every timed call of the last run as an event (thread, step, start, end in ms from the
run's start) written to FILE, and in the printed line a summary of the ``look_first_try`` stage per image (each
image's job runs in one thread): the job's own wall time, the part spent in each step (the nets, the helper
job, the tries) and the part in none of them; and how long the stage waited for the slowest image.
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
    names = ("face_mesh", "embed_face", "detect_faces_per_thread", "prepared_face", "_blend_patch", "_face_again",
             "_look", "start_fusing", "try_rung", "start_and_first_try")
    places = [(fusion, name, name) for name in names] + [
        (fusion.fg, "warp_patch", "warp_patch"), (fusion.fb, "sharpness", "sharpness"),
        (processes.ProcessPool, "run", "helper_job")]
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


NETS = ("detect_faces_per_thread", "embed_face", "face_mesh")
STEPS = NETS + ("helper_job", "try_rung")


def timeline_summary(events: list, stage: tuple[float, float]) -> dict:
    """Per image of the ``look_first_try`` stage (its ``start_and_first_try`` job): the job's wall time, the time
    in each step (a net's time inside ``try_rung`` counts as the net's, not the try's) and the time in none;
    medians over the images, in ms, and when the slowest job ended."""
    start, end = stage
    inside = [e for e in events if start <= e[2] and e[3] <= end]
    images = []
    for thread, name, j0, j1 in inside:
        if name != "start_and_first_try":
            continue
        calls = [(n, a, b) for th, n, a, b in inside if th == thread and j0 <= a and b <= j1 and n != name]
        row = {"job": j1 - j0, "starts": j0 - start}
        for step in STEPS:
            row[step] = sum(b - a for n, a, b in calls if n == step)
        row["try_rung"] -= sum(b - a for n, a, b in calls if n in NETS and any(
            m == "try_rung" and x <= a and b <= y for m, x, y in calls))
        row["none"] = row["job"] - sum(row[step] for step in STEPS)
        row["ends"] = j1 - start
        images.append(row)
    if not images:
        return {}
    med = {k: round(statistics.median(r[k] for r in images) * 1000, 1) for k in images[0]}
    med.update(images=len(images), stage=round((end - start) * 1000, 1),
               slowest_job_ends=round(max(r["ends"] for r in images) * 1000, 1))
    return med


def main(argv=None) -> None:
    import cv2

    from facechain_core import align, fusion, images, rank
    from facechain_core.onnx_torch import nets_device
    from facechain_core.threads import parallel_map

    args = parse_args(argv)
    if args.cv2_threads >= 0:
        cv2.setNumThreads(args.cv2_threads)
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    faces = Path(args.faces)
    crops, tpl_rgb = portrait_arrays(faces, len(PORTRAITS), 512, align, images, "crop")
    s = fusion.FusionSettings(workers=args.workers, processes=args.processes)
    spent, undo = time_functions(fusion)
    stages = []  # each run's look_first_try stage: (start, end)

    def once() -> dict:
        t = {}
        c0, w0 = time.process_time(), time.perf_counter()
        clock = time.perf_counter()

        def lap(name):
            nonlocal clock
            now = time.perf_counter()
            t[name] = now - clock
            clock = now

        tpl = fusion._look("tpl", tpl_rgb, s)
        lap("template")
        stage_start = time.perf_counter()
        started = list(parallel_map(lambda i: fusion.start_and_first_try(crops[i], tpl, s), list(range(len(crops))),
                                    s.workers))
        live = [j for j in started if isinstance(j, fusion._Fusing)]
        stages.append((stage_start, time.perf_counter()))
        lap("look_first_try")
        failed = [j for j in live if j.tries[0][0]]
        if (os.cpu_count() or 2) >= fusion.SPECULATE_CORES:  # as _fuse_side_by_side schedules them
            rest = [(j, i) for j in failed for i in range(1, len(j.ladder))]
            list(parallel_map(lambda job: fusion.try_rung(job[0], job[1], tpl, s), rest, s.workers))
        else:
            list(parallel_map(lambda j: fusion._tries_from(j, 1, tpl, s), failed, s.workers))
        lap("other_tries")
        out = [j if isinstance(j, fusion.FusedImage) else fusion.finish_fusing(j, tpl) for j in started]
        result = fusion.FusionResult(out)
        lap("finish")
        rank.rank_images([f.image for f in out], [tpl_rgb], rank.RankSettings(workers=args.workers),
                         detections=result.detections())
        lap("rank")
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
    stage = stages[-1]
    result = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    result["thread_seconds_per_run"] = {k: round(v / len(runs), 4) for k, v in sorted(spent.items())}
    result.update(nets=nets_device() or "cpu", cpu_cores=os.cpu_count(), cv2_threads=cv2.getNumThreads(),
                  switch_interval=sys.getswitchinterval(), workers=args.workers,
                  helper_processes=ready, helper_jobs=helpers.remote_jobs if helpers else 0)
    if events is not None:
        result["timeline"] = timeline_summary(events, stage)
        origin = stage[0]
        threads = {thread: i for i, thread in enumerate(dict.fromkeys(e[0] for e in events))}
        rows = [{"thread": threads[th], "step": name, "start_ms": round((a - origin) * 1000, 2),
                 "end_ms": round((b - origin) * 1000, 2)} for th, name, a, b in events]
        Path(args.timeline).write_text(json.dumps(rows))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
