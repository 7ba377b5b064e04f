"""Names a user types, and paths in what the user reads.

Two rules for everything the pack shows or opens on a user's behalf:

* A name a user gives (a folder, a file, a LoRA name) is checked before it touches the file system: no
  NUL or control characters, no part longer than file systems allow. A bad one is a ``FaceChainError``
  saying what is wrong, never ``ValueError: embedded null byte`` or ``OSError: File name too long``.
* Messages never show the server's absolute paths. The host registers its folders once
  (``set_roots({"input": ..., "output": ..., "models": ...})``); ``shown(path)`` writes a path relative
  to them (``input/obama/x.jpg``) and ``scrub(text)`` does the same inside any text.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import FaceChainError

MAX_PART = 200  # bytes of one file or folder name; most file systems allow 255, suffixes need the rest
MAX_TOTAL = 1024  # characters of a whole relative name
_roots: dict[str, Path] = {}


def set_roots(roots: dict[str, str | os.PathLike]) -> None:
    """Register folders by the label users know them by (``input``, ``output``, ``models``, ...)."""
    for label, path in roots.items():
        if path:
            _roots[label] = Path(path).resolve()


def check_name(name: str, what: str = "name") -> str:
    """``name`` stripped, or a clear error if no file system could take it."""
    if not isinstance(name, str):
        raise FaceChainError(f"The {what} must be text, not {type(name).__name__}.")
    name = name.strip()
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        raise FaceChainError(f"The {what} contains a control character (such as a NUL byte or a line break); "
                             f"type it again with letters, digits, spaces, '-', '_' or '.'.")
    if len(name) > MAX_TOTAL:
        raise FaceChainError(f"The {what} is {len(name)} characters long; keep it under {MAX_TOTAL}.")
    for part in re.split(r"[\\/]", name):
        if len(part.encode("utf-8")) > MAX_PART:
            raise FaceChainError(f"The {what} has a part of {len(part)} characters ('{part[:24]}...'); "
                                 f"a file or folder name must stay under {MAX_PART} bytes. Choose a shorter one.")
    return name


def relative_name(name: str, what: str = "name", place: str = "") -> str:
    """``name`` stripped, if it is a plain relative path: no '..' part, not absolute, no drive letter. Stricter
    than ``within`` on purpose: '../input/x' or an absolute path that happens to land inside ``place`` is
    refused too, as the editor's upload button refuses them before anything is sent (the button also refuses
    empty and hidden parts, which the node can read)."""
    name = check_name(name, what)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in re.split(r"[\\/]", name):
        raise FaceChainError(f"The {what} '{name}' points outside {place or 'its folder'}: '..' parts and absolute "
                             f"paths are not taken. Type a name inside it, such as people/anna.")
    return name


def within(base: str | os.PathLike, name: str, what: str = "name", place: str = "") -> Path:
    """``base/name`` resolved, links followed; an error if it leaves ``base`` (``..``, absolute, a link)."""
    name = check_name(name, what)
    base = Path(base).resolve()
    try:
        target = (base / name).resolve()
    except (OSError, RuntimeError) as e:  # a link loop, say
        raise FaceChainError(f"The {what} '{name}' cannot be opened ({type(e).__name__}).") from None
    if target != base and base not in target.parents:
        raise FaceChainError(f"The {what} '{name}' points outside {place or shown(base)}; use a name inside it.")
    return target


def shown(path: str | os.PathLike) -> str:
    """A path as the user should read it: relative to the registered folder that holds it."""
    p = Path(path)
    try:
        p = p.resolve()
    except (OSError, RuntimeError):
        pass
    best = None
    for label, root in _roots.items():
        if p == root or root in p.parents:
            rel = p.relative_to(root)
            if best is None or len(rel.parts) < len(best[1].parts):
                best = (label, rel)
    if best is None:
        return p.name or str(p)
    label, rel = best
    return label if not rel.parts else f"{label}/{rel.as_posix()}"


def scrub(text: str) -> str:
    """Every registered folder inside ``text`` replaced by its label (longest folder first)."""
    for label, root in sorted(_roots.items(), key=lambda kv: -len(str(kv[1]))):
        text = text.replace(str(root) + os.sep, label + "/").replace(str(root), label)
    return text


def file_name_from(text: str, fallback: str = "face") -> str:
    """A plain file name from a folder-like text: its last part, characters a file name cannot take as '_'."""
    last = [p for p in re.split(r"[\\/]", (text or "").strip()) if p not in ("", ".", "..")]
    name = re.sub(r"[^\w\-. ]", "_", last[-1] if last else fallback).strip(" .") or fallback
    return name[:100]
