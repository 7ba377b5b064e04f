"""Where each model lives, where it comes from, and how it is fetched.

The catalogue is data (``data/models.json``). Two kinds of entry:

* ``embedded``: a file shipped inside a PyPI package (the offline defaults). Found on disk without
  importing the package.
* ``learned``: the FaceChain-grade models. They live under one *models root*: inside ComfyUI the
  ``models/facechain`` folder that the nodes register with ``folder_paths``; outside ComfyUI the
  ``FACECHAIN_MODELS`` environment variable, else ``~/.cache/facechain/models``. ``fetch`` downloads
  one (ModelScope or HuggingFace) into a temporary folder and renames it into place. Offline, asking for
  a missing one raises ``ModelMissingError`` naming the file, the folder and the command that fetches it.

Every entry carries its licence (``licences``); with ``FACECHAIN_COMMERCIAL_ONLY=1`` the store refuses models
whose licence does not allow commercial use.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from . import data_files, licences
from .errors import FaceChainError, ModelMissingError

CATALOGUE = data_files.DATA / "models.json"
_root_override: Path | None = None


def catalogue() -> dict:
    return data_files.load("models.json")


def set_models_root(path: str | os.PathLike | None) -> None:
    """Called by the ComfyUI nodes with ``<ComfyUI>/models/facechain``."""
    global _root_override
    _root_override = Path(path) if path else None


def models_root() -> Path:
    if _root_override is not None:
        return _root_override
    env = os.environ.get("FACECHAIN_MODELS")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "facechain" / "models"


def learned_names() -> list[str]:
    return sorted(catalogue()["learned"])


def _entry(name: str) -> dict:
    try:
        return catalogue()["learned"][name]
    except KeyError:
        raise FaceChainError(f"Unknown FaceChain model '{name}'. Known: {', '.join(learned_names())}.") from None


def fetch_command(name: str) -> str:
    return f"python install.py --models {name}"


def is_present(name: str) -> bool:
    entry = _entry(name)
    path = models_root() / entry["path"]
    if entry["kind"] == "file":
        return path.is_file()
    check = entry.get("check")
    return path.is_dir() and (not check or (path / check).exists())


def model_path(name: str) -> Path:
    """The local path of a learned model, or a ``ModelMissingError`` that says how to get it."""
    entry = _entry(name)
    licences.check_allowed(name)  # FACECHAIN_COMMERCIAL_ONLY=1: refused before anything else
    path = models_root() / entry["path"]
    if is_present(name):
        return path
    src = entry["source"]
    where = ", ".join(f"{hub}: {ref}" for hub, ref in src.items())
    raise ModelMissingError(
        f"The learned model '{name}' ({entry['task']}) is not installed: expected "
        f"{'file' if entry['kind'] == 'file' else 'folder'} '{path.name}' in '{path.parent}'. "
        f"Fetch it with `{fetch_command(name)}` from the comfyui-facechain folder (needs internet), "
        f"or download it yourself ({where}) and place it there. "
        f"Or choose the 'embedded' backend, which works offline."
    )


def modelscope_pipeline(name: str, task: str):
    """A ModelScope pipeline (``task``: a ``Tasks`` attribute) on the local snapshot of learned model ``name``.

    Raises ``ModelMissingError`` when the snapshot is not installed, and says what to install (the entry's
    ``needs``) when a package its pipeline imports is missing."""
    local = model_path(name)
    needs = _entry(name).get("needs", "ModelScope's vision extras (`pip install \"modelscope[cv]\"`)")
    try:
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks

        return pipeline(getattr(Tasks, task), model=str(local))
    except (ImportError, RuntimeError) as e:
        # ModelScope reports a missing package of a model's code as RuntimeError("Failed to import ...")
        if isinstance(e, RuntimeError) and "import" not in str(e).lower():
            raise
        missing = getattr(e, "name", None) or str(e).splitlines()[-1][:200]
        raise FaceChainError(
            f"The '{name}' backend needs {needs}; this Python lacks part of it ({missing}). "
            f"Install that, or choose the 'embedded' backend, which works offline.") from None


def embedded_path(name: str) -> Path:
    """A model file of an offline default: inside an installed registry package (found without importing
    the package), or taken out of a registry wheel into the pack's models folder (``embedded.py``)."""
    try:
        entry = catalogue()["embedded"][name]
    except KeyError:
        raise FaceChainError(f"Unknown embedded model '{name}'.") from None
    licences.check_allowed(name)
    if "wheel" in entry:
        from . import embedded

        return embedded.path(name)
    spec = importlib.util.find_spec(entry["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelMissingError(
            f"The embedded model '{name}' ({entry['task']}) comes with the Python package "
            f"'{entry['package']}', which is not installed. Install it with "
            f"`pip install -r requirements.txt` in the comfyui-facechain folder."
        )
    for base in spec.submodule_search_locations:
        path = Path(base) / entry["file"]
        if path.is_file():
            return path
    raise ModelMissingError(
        f"The package '{entry['package']}' is installed but lacks '{entry['file']}'; reinstall it with "
        f"`pip install --force-reinstall {entry['package']}`."
    )


def embedded_module():
    """``facechain_core.embedded`` (the embedded files install.py fetches), or None in a pack without it."""
    if importlib.util.find_spec(f"{__package__}.embedded") is None:
        return None
    return importlib.import_module(f"{__package__}.embedded")


def fetch(name: str, force: bool = False) -> Path:
    """Download a learned model into the models root (needs internet). Atomic: temp name, rename."""
    entry = _entry(name)
    licences.check_allowed(name)
    if is_present(name) and not force:
        return models_root() / entry["path"]
    target = models_root() / entry["path"]
    made = [p for p in (*reversed(target.parent.parents), target.parent) if not p.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    done = False
    try:
        if entry["kind"] == "modelscope_snapshot":
            from modelscope.hub.snapshot_download import snapshot_download

            snapshot_download(entry["source"]["modelscope"], local_dir=str(tmp))
            staged = tmp
        elif entry["kind"] == "file":
            staged = tmp / target.name
            _download_file(entry["source"], staged)
            for rel, src in entry.get("companions", {}).items():
                comp = models_root() / rel
                if not comp.exists():
                    part = tmp / Path(rel).name
                    _download_file(src, part)
                    comp.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(part, comp)
        else:
            raise FaceChainError(f"Model '{name}' has an unknown kind '{entry['kind']}' in {CATALOGUE}.")
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        os.replace(staged, target)
        done = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made if not done else []):  # a failed fetch leaves no empty folders either
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return target


def _download_file(source: dict, dest: Path) -> None:
    if "huggingface" in source:
        from huggingface_hub import hf_hub_download

        got = hf_hub_download(source["huggingface"], source["file"], local_dir=str(dest.parent / ".hf"))
        os.replace(got, dest)
    elif "modelscope" in source:
        from modelscope.hub.file_download import model_file_download

        got = model_file_download(source["modelscope"], source["file"], local_dir=str(dest.parent / ".ms"))
        os.replace(got, dest)
    elif "url" in source:
        import urllib.request

        with urllib.request.urlopen(source["url"], timeout=60) as r, open(dest, "wb") as out:
            shutil.copyfileobj(r, out)
    else:
        raise FaceChainError(f"No download source in {source}.")
