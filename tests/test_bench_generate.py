"""benchmarks/bench_generate.py's FaceFusion + RTSRank part, run as the GPU run runs it (the pack's node classes
called as the host calls them, on real portraits), here on the CPU with two portraits: its numbers come from a
real run and it still works against the library it times."""

from __future__ import annotations

import json
import subprocess
import sys

from comfy_host import COMFY_DIR, install_comfyui
from conftest import FACES, REPO


def test_fusion_and_ranking_part_on_the_cpu():
    install_comfyui(COMFY_DIR)
    cmd = [sys.executable, "benchmarks/bench_generate.py", "--cpu", "--skip-sampling", "--comfy", str(COMFY_DIR),
           "--faces", str(FACES), "--images", "2", "--repeats", "1"]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["fusion_s"] > 0 and out["rank_s"] > 0 and len(out["fusion_runs_s"]) == 1
    assert out["nets_device"] == "cpu" and out["fused"].startswith("FaceFusion:") and "of 2 images" in out["fused"]
    assert set(out["fusion_plus_rank_by_workers_s"]) == {"1", "2", "4", "8", "16"}
