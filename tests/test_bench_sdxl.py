"""benchmarks/bench_train.py's SDXL configurations, checked on the CPU at a tiny SDXL-like UNet and 64 px: the
same code builds ComfyUI's SDXL model, CLIP (L + G) and VAE classes with random weights and trains them through
the node's comfy_backbone (the GPU run uses the full UNet at 1024x1024)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import COMFY_DIR, REPO


@pytest.mark.host  # slow layer: builds CLIP-G at full size on the CPU, no server
def test_sdxl_configs_build_and_train_on_the_cpu(tmp_path):
    out = tmp_path / "sdxl.json"
    cmd = [sys.executable, "benchmarks/bench_train.py", "--cpu-smoke", "--configs", "sdxl_node_defaults,sdxl_as_set",
           "--reference-steps", "0", "--comfyui", str(COMFY_DIR), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.startswith(f"command: {' '.join(cmd)}\n")
    result = json.loads(out.read_text())
    assert "reference" not in result and "diffusers" not in result["env"]  # SDXL runs need neither
    assert result["cudnn_benchmark"] is False  # as the node trains, unless --cudnn-benchmark
    for name, memory in (("sdxl_node_defaults", "auto (fit the card)"), ("sdxl_as_set", "as set")):
        r = result["configs"][name]
        assert "error" not in r, r
        assert (r["arch"], r["unet"], r["memory"], r["size"]) == ("sdxl", "UNetModel", memory, 64)
        assert r["batch"] == 4 and r["samples"] == 12 and r["ms_per_sample"] > 0 and r["cache_s"] > 0
        assert r["default_samples_s"] == pytest.approx(2000 * r["ms_per_sample"] / 1000)
        assert r["loss_first"] == r["loss_first"] and r["loss_last"] == r["loss_last"]  # not NaN
        assert name in proc.stdout and "ms/sample" in proc.stdout
