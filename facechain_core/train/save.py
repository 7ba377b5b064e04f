"""Where a trained LoRA goes, and how it gets there: a safe name, a temporary file, an atomic rename."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..errors import FaceChainError
from ..user_paths import shown

_NAME_OK = re.compile(r"^[\w\-. ]+$", re.UNICODE)


def lora_file(folder: str | os.PathLike, name: str) -> Path:
    """``folder/<name>.safetensors``; the name cannot leave ``folder`` or name a folder or hidden file."""
    raw = (name or "").strip()
    stem = raw[: -len(".safetensors")] if raw.lower().endswith(".safetensors") else raw
    if not stem:
        raise FaceChainError("No LoRA name given: type a file name such as 'face' or 'obama'.")
    if "/" in stem or "\\" in stem or stem in (".", "..") or stem.startswith(".") or not _NAME_OK.match(stem) \
            or len(stem) > 120:
        raise FaceChainError(f"LoRA name {raw!r} is not allowed: use letters, digits, spaces, '-', '_' or '.', "
                             f"no folders (the file always goes to the facechain LoRA folder), e.g. 'face'.")
    base = Path(folder).resolve()
    target = (base / f"{stem}.safetensors").resolve()
    if target.parent != base:
        raise FaceChainError(f"LoRA name {raw!r} points outside the LoRA folder; use a plain name such as 'face'.")
    return target


# what TrainFaceLoRA reports when it finds the LoRA already trained from the same inputs (the run report reads it)
REUSED = ("reused the saved file: it was trained from these photos, captions and settings on this base model "
          "(delete it, or change an input, to train again)")


def check_free(path: Path, overwrite: bool, reusable: bool = False) -> None:
    """Refuse to replace an existing LoRA unless asked; ``reusable``: unless it is one of ours, which the
    caller may find was trained from the same inputs (then it is reused, not replaced)."""
    if path.exists() and not overwrite and not (reusable and trained_from(path)):
        raise FaceChainError(f"A LoRA named '{path.name}' already exists in {shown(path.parent)}. Choose another name, "
                             f"or turn 'overwrite' on to replace it.")


TEMP_TAG = "facechain-partial"  # in every temporary file name, with the writer's process id


def _temp_name(path: Path) -> str:
    return f".{path.stem}.{TEMP_TAG}-{os.getpid()}-"


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed save left behind (their writer process no longer runs)."""
    removed = []
    for tmp in Path(folder).glob(f".*.{TEMP_TAG}-*.tmp"):
        match = re.search(rf"\.{TEMP_TAG}-(\d+)-", tmp.name)
        if match and not _process_alive(int(match.group(1))):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _host_file_mode(path: str) -> None:
    """mkstemp makes 0600 files; give the LoRA the mode any file the host writes gets (0666 less umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_lora(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], overwrite: bool) -> Path:
    """Write to a temporary file beside ``path``, then rename it into place (never half a file)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path.parent)
    check_free(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=_temp_name(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(state), tmp, metadata={k: str(v) for k, v in metadata.items()})
        _host_file_mode(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name appeared meanwhile: no overwrite even in a race
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FaceChainError(f"A LoRA named '{path.name}' appeared while training; choose another name "
                                     f"or turn 'overwrite' on.") from None
            except OSError:
                check_free(path, overwrite)
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


INPUTS_KEY = "facechain_inputs_sha256"  # metadata: what the LoRA was trained from (photos, captions, settings, base)


def inputs_fingerprint(images: torch.Tensor, captions: Iterable[str], settings: Mapping, base_hash: str) -> str:
    """A sha256 of everything a training run depends on: the photos as 8-bit pixels, the captions, the
    settings and the base model's fingerprint. Equal fingerprints train the same LoRA."""
    import json

    h = hashlib.sha256()
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255 + 0.5).to(torch.uint8).contiguous()
    h.update(str(tuple(pixels.shape)).encode())
    h.update(pixels.numpy().tobytes())
    h.update(json.dumps([list(captions), dict(settings), base_hash], sort_keys=True, default=str).encode())
    return h.hexdigest()


def trained_from(path: str | os.PathLike) -> str | None:
    """The inputs fingerprint stored in a saved LoRA, or None (no file, another tool's file, unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(INPUTS_KEY)
    except Exception:  # noqa: BLE001 - a foreign or broken file is simply not ours to reuse
        return None


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], prefix_strip: str = "") -> str:
    """A sha256 over every tensor's name, shape and 4096 evenly spaced values (as float16).

    Hashing a 2-7 GB UNet in full would cost seconds; sampled values tell base models apart just as well.
    Names are the original checkpoint's UNet names, so ComfyUI and the standalone trainer agree.
    """
    h = hashlib.sha256()
    for name, t in sorted(named_tensors, key=lambda kv: kv[0]):
        if not t.is_floating_point():
            continue
        name = name[len(prefix_strip):] if prefix_strip and name.startswith(prefix_strip) else name
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu", torch.float16).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
