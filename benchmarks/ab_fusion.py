"""FaceFusion + RTSRank, two versions of the pack compared in pairs on one machine.

    git archive OLD_COMMIT | tar -x -C old_tree
    python benchmarks/ab_fusion.py --old old_tree --faces faces --pairs 6

GPU machines differ by up to 40 % between leases and drift by 10 % within one, so one run of each version
says little. This runs ``profile_fusion.py`` of the old tree and of this one in turns (old, new, new, old,
...: each version as often first as second), each run in its own process, and reports each version's median
and the median of the new/old ratios of the pairs. Prints one JSON line. The old tree finds the embedded
model files as this one does: set ``FACECHAIN_EMBEDDED_DIR`` when it has no ``models/embedded`` of its own
(a ``git archive`` has none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_paths import REPO, SHARED_FACES  # noqa: E402  (puts the checkout on sys.path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="the other version's checkout (e.g. from git archive)")
    ap.add_argument("--faces", type=Path, default=SHARED_FACES)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=7, help="runs inside each profile_fusion process (its median)")
    ap.add_argument("--workers", type=int, default=0)
    return ap.parse_args(argv)


def one_run(tree: Path, faces: Path, repeats: int, workers: int) -> dict:
    """profile_fusion.py of ``tree`` in a process of its own; its JSON line."""
    cmd = [sys.executable, str(tree / "benchmarks" / "profile_fusion.py"), "--faces", str(faces.resolve()),
           "--repeats", str(repeats), "--workers", str(workers)]
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree}:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def compare(old: list[float], new: list[float]) -> dict:
    """Each version's median, and the pairs' new/old ratios (below 1: the new version is quicker)."""
    ratios = [n / o for o, n in zip(old, new)]
    return {"old_s": round(statistics.median(old), 4), "new_s": round(statistics.median(new), 4),
            "ratio_median": round(statistics.median(ratios), 3), "ratio_min": round(min(ratios), 3),
            "ratio_max": round(max(ratios), 3), "pairs_new_quicker": sum(r < 1 for r in ratios),
            "pairs": len(ratios)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    old, new = [], []
    for i in range(args.pairs):
        order = [(args.old, old), (REPO, new)] if i % 2 == 0 else [(REPO, new), (args.old, old)]
        for tree, into in order:
            into.append(one_run(tree, args.faces, args.repeats, args.workers)["total"])
    result = {"old_tree": str(args.old), "old_runs_s": old, "new_runs_s": new, **compare(old, new)}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
