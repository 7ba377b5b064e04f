"""Reading photos and checking image arrays before any numeric work touches them.

Arrays in the library are RGB ``uint8`` of shape (H, W, 3) unless a function says otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import FaceChainError
from .files import write_atomic

PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Above this a photo is refused before decoding: 40 MP is more than any phone camera delivers and a
# decoded float copy of it in ComfyUI already takes ~0.5 GB.
MAX_PIXELS = 40_000_000
MIN_SIDE = 32


def check_size(width: int, height: int, name: str) -> None:
    if width * height > MAX_PIXELS:
        raise FaceChainError(
            f"Photo '{name}' is {width}x{height} ({width * height / 1e6:.0f} MP), above the "
            f"{MAX_PIXELS / 1e6:.0f} MP limit. Downscale it (a long side of 2048 px is plenty) and try again."
        )


def flatten_alpha(img: Image.Image) -> Image.Image:
    """RGB on white: transparent parts of a PNG become white, as FaceChain's white fill expects."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def wide_gray_to_uint8(img: Image.Image) -> np.ndarray:
    """A grayscale image of more than 8 bits (PIL modes I;16, I;16L, I;16B, I, F) as HxW uint8.

    PIL's own convert("RGB") clips such values at 255, so a 16-bit photo comes out almost all white. 16-bit
    modes are scaled by 255/65535; 32-bit integer and float data by their own range: values up to 1 (float)
    are fractions, up to 255 are 8-bit, up to 65535 are 16-bit, anything larger is scaled to its maximum."""
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        full = 65535.0
    else:
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
        top = float(a.max()) if a.size else 0.0
        full = 1.0 if img.mode == "F" and top <= 1.0 else 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
    return np.clip(a * (255.0 / full) + 0.5, 0, 255).astype(np.uint8)


WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


@dataclass
class Photo:
    image: np.ndarray  # RGB uint8
    note: str = ""  # how it was decoded when that is worth saying (first frame of an animation, 16-bit)


def read_photo(path: str | os.PathLike) -> Photo:
    """One photo as RGB uint8, EXIF rotation applied, alpha flattened on white, wide grayscale scaled to
    8 bits; an animation gives its first frame. The note says which of the last two happened."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            check_size(img.width, img.height, path.name)
            frames = int(getattr(img, "n_frames", 1) or 1)
            img.seek(0)
            img = ImageOps.exif_transpose(img)
            img.load()
            notes = []
            if frames > 1:
                notes.append(f"first frame of {frames} (animated {img.format or path.suffix.lstrip('.').upper()})")
            if img.mode in WIDE_GRAY_MODES:
                notes.append(f"{img.mode} grayscale scaled to 8 bits")
                gray = wide_gray_to_uint8(img)
                return Photo(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)), "; ".join(notes))
            return Photo(np.array(flatten_alpha(img), dtype=np.uint8), "; ".join(notes))  # writable, for torch
    except FaceChainError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise FaceChainError(
            f"Photo '{path.name}' could not be read ({type(e).__name__}: {e}). "
            f"Replace it with a JPEG or PNG file, or remove it from the folder."
        ) from None


def load_photo(path: str | os.PathLike) -> np.ndarray:
    """One photo as RGB uint8 (see ``read_photo``)."""
    return read_photo(path).image


def list_photos(folder: str | os.PathLike) -> list[Path]:
    return scan_folder(folder)[0]


def _is_photo_file(path: str) -> bool:
    name = os.path.basename(path)
    return (Path(name).suffix.lower() in PHOTO_EXTENSIONS and not name.startswith(".")
            and os.path.isfile(path) and not os.path.islink(path))


def photo_folders(root: str | os.PathLike, max_depth: int = 6, max_folders: int = 5000) -> list[str]:
    """The folders under ``root`` (relative posix names such as ``people/obama``) that hold at least one
    photo directly, in name order. Links are not followed and hidden folders are skipped, so every name
    listed is a real folder inside ``root``; the walk stops after ``max_folders`` folders or ``max_depth``
    levels, so a huge input directory costs a bounded time when the editor asks for the list."""
    root = Path(root)
    found, seen = [], 0
    for here, dirs, files in os.walk(root, followlinks=False):
        rel = Path(here).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(here, d)))
        if len(rel.parts) >= max_depth:
            dirs[:] = []
        seen += 1
        if rel.parts and any(_is_photo_file(os.path.join(here, f)) for f in files):
            found.append(rel.as_posix())
        if seen >= max_folders:
            break
    return sorted(found)


def scan_folder(folder: str | os.PathLike, within: str | os.PathLike | None = None,
                place: str = "the photo folder") -> tuple[list[Path], list[tuple[str, str]]]:
    """The photo files of a folder in name order, and (name, why) for every other file in it. With
    ``within``, a file that resolves outside it (a link to elsewhere) is refused, never read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FaceChainError(f"Folder '{folder.name}' does not exist.")
    base = Path(within).resolve() if within is not None else None
    files, others = [], []
    for p in sorted(folder.iterdir()):
        if base is not None and base not in p.resolve().parents:
            others.append((p.name, f"a link to a file outside {place}; copy the photo in instead"))
        elif p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS:
            files.append(p)
        elif p.is_file():
            others.append((p.name, f"not a photo type ({', '.join(sorted(PHOTO_EXTENSIONS))})"))
        else:
            others.append((p.name, "a folder, not a photo"))
    if not files:
        raise FaceChainError(
            f"Folder '{folder.name}' holds no photos ({', '.join(sorted(PHOTO_EXTENSIONS))}). "
            f"Put 3-20 photos of one person in it."
        )
    return files, others


def as_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Accept HxW, HxWx1, HxWx3, HxWx4, float 0..1 or uint8; return HxWx3 uint8, or say what is wrong."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise FaceChainError(f"{name} has shape {tuple(np.shape(image))}; expected height x width x 3 (RGB).")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise FaceChainError(f"{name} is empty ({a.shape[1]}x{a.shape[0]}).")
    if a.dtype != np.uint8:
        a = np.clip(np.nan_to_num(a.astype(np.float32), nan=0.0) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        rgb, alpha = a[:, :, :3].astype(np.float32), a[:, :, 3:4].astype(np.float32) / 255.0
        a = (rgb * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    return np.ascontiguousarray(a)


def save_png_atomic(image: np.ndarray, path: str | os.PathLike, compression: int = 6) -> Path:
    """An RGB uint8 image as a PNG, written under a temporary name and renamed. OpenCV encodes it (outside the
    GIL, so pools of threads write side by side); ``compression`` 0-9 (1: quick, for previews)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    return write_atomic(path, lambda tmp: tmp.write_bytes(data.tobytes()))
