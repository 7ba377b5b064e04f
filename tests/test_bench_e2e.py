"""benchmarks/bench_e2e.py, run as the lead runs it on the GPU but on the CPU with the tiny checkpoint and tiny
sizes: a real ComfyUI host, the bundled train+generate graph through /prompt, a cold and a warm run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageOps

from comfy_host import device_args
from conftest import ARTIFACTS, FACES, REPO, tiny_checkpoint

import bench_e2e

from facechain_core.train import TrainResult  # noqa: E402


def test_train_split_reads_the_trainers_own_report():
    """The benchmark splits TrainFaceLoRA's time with the numbers the trainer prints: a change of that line
    must show here, not as caching silently counted as training."""
    summary = TrainResult(lora={}, steps=2, samples=8, losses=[1.0, 0.9],
                          timings={"cache_s": 1.54, "train_s": 22.8}).summary()
    assert bench_e2e.train_split(f"LoRA saved: facechain/x.safetensors\n{summary}") == (1.5, 22.8)
    assert bench_e2e.train_split("reused the saved file: it was trained from these photos") is None


def test_host_device_flags():
    assert device_args("cpu") == ["--cpu"] and device_args("cuda") == []
    assert device_args("cuda:1") == ["--cuda-device", "1"]
    with pytest.raises(ValueError, match="cpu, cuda or cuda:N"):
        device_args("gpu")


def test_photos_of_a_person_the_folder_lacks_are_named_not_a_traceback(tmp_path):
    listed = bench_e2e.prepare_photos(FACES, "obama", 5, tmp_path / "photos")
    assert len(listed) == 5 and sum(x["mirrored"] for x in listed) == 5 - len(list((FACES / "obama").glob("*.jp*g")))
    with pytest.raises(SystemExit, match="nobody"):
        bench_e2e.prepare_photos(FACES, "nobody", 10, tmp_path / "none")


@pytest.mark.host  # starts a real ComfyUI server (in a child process)
def test_bench_e2e_tiny_cpu_cold_and_warm(tmp_path):
    tiny_checkpoint()
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "benchmarks/bench_e2e.py", "--tiny", "--cpu", "--warm", "--faces", str(FACES),
           "--json", str(out), "--work", str(tmp_path / "base"),
           "--host-arg=--disable-cuda-malloc"]  # the GPU comparison's flag
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith(f"command: {' '.join(cmd)}\n")  # the exact command line, first
    assert "cold: TrainFaceLoRA said: LoRA saved: facechain/katy_perry.safetensors" in proc.stdout
    result = json.loads(out.read_text())
    assert result["command"] == " ".join(cmd) and result["device"] == "cpu"
    assert result["host_args"] == ["--disable-cuda-malloc"]
    assert result["settings"] == {"person": "katy_perry", "photos": 10, "images": 2, "size": 64, "steps": 3,
                                  "samples": 8, "align_size": 64}
    cold, warm = result["runs"]
    for run in (cold, warm):
        phases = run["phases"]
        assert set(phases) == set(bench_e2e.PHASE_ORDER) | {"total"}
        for key in ("preprocessing", "caching", "training", "sampling", "fusion+ranking", bench_e2e.SHOWING):
            assert phases[key] > 0, (run["label"], key, phases)
        assert abs(sum(v for k, v in phases.items() if k != "total") - phases["total"]) < 0.02
        assert 0 <= phases["other"] < 0.1 * phases["total"]  # the nodes account for the time
        assert phases["total"] <= run["client_wall_s"]
        assert run["train_samples"] == 8 and "8 samples" in run["train_report"] and run["align_size"] == 64
        assert {n["class_type"] for n in run["nodes"]} >= {"FaceChainFaceAlign", "FaceChainTrainFaceLoRA",
                                                           "KSampler", "FaceChainFaceFusion", "FaceChainRTSRank"}
        shown = {(n["class_type"], n["shows"]) for n in run["nodes"] if n["phase"] == bench_e2e.SHOWING}
        assert {("PreviewImage", "preprocessing"), ("PreviewImage", "sampling"),
                ("SaveImage", "fusion+ranking")} <= shown  # every preview belongs to a step
        assert len(run["portraits"]) == 2
        for path in run["portraits"]:
            with Image.open(path) as im:
                assert im.size == (64, 64)
    # cold: the checkpoint is loaded by its node; warm: served from the host's cache, every other step runs again
    loader = next(k for k, v in json.loads(bench_e2e.WORKFLOW.read_text()).items()
                  if v["class_type"] == "CheckpointLoaderSimple")
    assert cold["phases"]["model loading"] > 0 and loader not in cold["cached_nodes"]
    assert warm["phases"]["model loading"] == 0 and loader in warm["cached_nodes"]
    check_photos(result["photos"], tmp_path / "base" / "input" / "katy_perry")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(cold["contact_sheet"], ARTIFACTS / "bench_e2e_tiny_cold.png")


def check_photos(photos: list[dict], folder) -> None:
    """10 photos: katy_perry's 8 and two mirrored copies, each the mirror image of its source."""
    assert len(photos) == 10 and sum(p["mirrored"] for p in photos) == 2
    for p in photos:
        mine = np.asarray(Image.open(folder / p["file"]).convert("RGB"), dtype=np.float32)
        with Image.open(FACES / p["from"]) as im:
            source = ImageOps.exif_transpose(im).convert("RGB")
        expected = np.asarray(ImageOps.mirror(source) if p["mirrored"] else source, dtype=np.float32)
        assert mine.shape == expected.shape
        assert np.abs(mine - expected).mean() < 3  # JPEG re-encoding only


@pytest.mark.host  # starts a real ComfyUI server (in a child process)
def test_bench_e2e_says_what_the_host_refused(tmp_path):
    """A prompt the host refuses ends the benchmark with its message, the host's log and the JSON of what ran."""
    tiny_checkpoint()
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, "benchmarks/bench_e2e.py", "--tiny", "--cpu", "--warm", "--samples", "0",
           "--photos", "3", "--faces", str(FACES), "--json", str(out), "--work", str(tmp_path / "base")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "cold run failed: prompt refused" in proc.stdout and "samples" in proc.stdout
    assert "--- host log (last lines) ---" in proc.stdout and "warm run" not in proc.stdout
    result = json.loads(out.read_text())
    assert result["runs"] == [] and result["error"].startswith("cold run failed: prompt refused")
