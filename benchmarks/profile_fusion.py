"""Where FaceFusion + RTSRank spend their wall time, stage by stage, on the portraits bench_generate uses.

    python benchmarks/profile_fusion.py --faces ../shared/faces --repeats 5
    python benchmarks/profile_fusion.py --cv2-threads 1 --switch-interval 0.0001   # what-ifs

Stages (the library's own functions, in the order ``fusion.fuse_images`` runs them): ``template`` (the
template's face, mesh and vector), ``look_first_try`` (each image's faces, mesh and vector, guards, warp,
colour work, and the first rung with its after-check, one job per image), ``other_tries`` (the rungs after a
failed first), ``finish``, then ``rank`` (RTSRank on the results). Also the CPU seconds per wall second
(``cores_busy``) and where the embedded nets ran. No ComfyUI needed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from bench_paths import SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)
from bench_generate import PORTRAITS, portrait_arrays  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", default=str(SHARED_FACES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=0, help="threads (0: the library's default)")
    ap.add_argument("--processes", type=int, default=-1,
                    help="helper processes for the warp and colour work (-1: the library's default, 0: none)")
    ap.add_argument("--cv2-threads", type=int, default=-1,
                    help="OpenCV's threads outside the pools (a pool divides them among its threads; -1: leave)")
    ap.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (0: leave)")
    return ap.parse_args()


def time_functions(fusion) -> dict:
    """Wrap the costly steps fusion calls (by its module's names) to add up their seconds over all threads."""
    import threading

    spent: dict = {}
    lock = threading.Lock()
    names = ("face_mesh", "embed_face", "detect_faces_per_thread", "prepared_face", "_blend_patch", "_face_again")
    for name in names:
        setattr(fusion, name, _wrap(getattr(fusion, name), name, spent, lock))
    fusion.fg.warp_patch = _wrap(fusion.fg.warp_patch, "warp_patch", spent, lock)
    fusion.fb.sharpness = _wrap(fusion.fb.sharpness, "sharpness", spent, lock)
    return spent


def _wrap(fn, name, spent, lock):
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            with lock:
                spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
    return timed


def main() -> None:
    from pathlib import Path

    import cv2

    from facechain_core import align, fusion, images, rank
    from facechain_core.onnx_torch import nets_device
    from facechain_core.threads import parallel_map

    args = parse_args()
    if args.cv2_threads >= 0:
        cv2.setNumThreads(args.cv2_threads)
    if args.switch_interval > 0:
        sys.setswitchinterval(args.switch_interval)
    faces = Path(args.faces)
    crops, tpl_rgb = portrait_arrays(faces, len(PORTRAITS), 512, align, images, "crop")
    s = fusion.FusionSettings(workers=args.workers, processes=args.processes)
    spent = time_functions(fusion)

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
        started = list(parallel_map(lambda i: fusion.start_and_first_try(crops[i], tpl, s), list(range(len(crops))),
                                    s.workers))
        live = [j for j in started if isinstance(j, fusion._Fusing)]
        lap("look_first_try")
        rest = [(j, i) for j in live if j.tries[0][0] for i in range(1, len(j.ladder))]
        list(parallel_map(lambda job: fusion.try_rung(job[0], job[1], tpl, s), rest, s.workers))
        lap("other_tries")
        out = [j if isinstance(j, fusion.FusedImage) else fusion.finish_fusing(j, tpl) for j in started]
        result = fusion.FusionResult(out)
        lap("finish")
        rank.rank_images([f.image for f in out], [tpl_rgb], rank.RankSettings(workers=args.workers),
                         detections=result.detections())
        lap("rank")
        t["total"] = time.perf_counter() - w0
        t["cores_busy"] = (time.process_time() - c0) / t["total"]
        t["tries"] = len(live) + len(rest)
        t["fused"] = sum(f.fused for f in out)
        return t

    once()  # models loaded in the pool's threads, CUDA graphs captured
    helpers = fusion.helper_pool(s)  # started by that first run, in the background (as in a host's first prompt)
    ready = helpers.wait(120) if helpers else 0
    spent.clear()
    runs = [once() for _ in range(args.repeats)]
    result = {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}
    result["thread_seconds_per_run"] = {k: round(v / args.repeats, 4) for k, v in sorted(spent.items())}
    result.update(nets=nets_device() or "cpu", cpu_cores=os.cpu_count(), cv2_threads=cv2.getNumThreads(),
                  switch_interval=sys.getswitchinterval(), workers=args.workers,
                  helper_processes=ready, helper_jobs=helpers.remote_jobs if helpers else 0)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
