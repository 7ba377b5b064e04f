"""Small pictures of what a step did, for the editor: thumbnails (kept, or greyed with the reason) and the
training loss curve. Drawn with OpenCV in a few milliseconds; no ComfyUI import (the nodes write the files).
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .data_files import settings
from .images import save_png_atomic
from .threads import parallel_map

FONT = cv2.FONT_HERSHEY_SIMPLEX


def look() -> dict:
    """Sizes, colours and the curve's redraw interval (data/previews.json)."""
    return settings("previews.json")


def _colour(name: str) -> tuple[int, int, int]:
    return tuple(int(c) for c in look()["colours"][name])


def _side(side: int | None) -> int:
    return int(side or look()["thumb_side"])


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """The image's RGB scaled by ``scale`` (area averaging to shrink, linear to grow)."""
    h, w = image.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    how = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(image[..., :3]), size, interpolation=how)


def thumbnail(image: np.ndarray, side: int | None = None) -> np.ndarray:
    """An HxWx3 uint8 image scaled so its long side is ``side``: large photos shrink, small crops grow, so
    that every thumbnail's labels are the same size in the node."""
    return _scaled(image, _side(side) / max(image.shape[:2]))


def short_reason(why: str) -> str:
    """The first clause of a reason ("2 faces, none matches the set's identity (...); ..." -> up to the
    bracket): what fits on a thumbnail; the report keeps the whole sentence."""
    for stop in ("(", ";", ":"):
        why = why.split(stop, 1)[0]
    return why.strip(" ,.")


def _wrap(text: str, width_px: int, scale: float) -> list[str]:
    """Words of ``text`` in lines that fit ``width_px`` at font ``scale``."""
    lines: list[str] = []
    for word in text.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(trial, FONT, scale, 1)[0][0] <= width_px:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines


def _line_height(scale: float) -> int:
    return int(round(40 * scale))


def _tile(picture: np.ndarray, lines: Sequence[tuple[str, float]], colour, side: int | None = None,
          look=None) -> np.ndarray:
    """A square tile: the picture fitted above a caption strip of white text ``lines`` ((text, font scale),
    on ``colour``), framed in ``colour``. Every tile of a node has the same size, so the editor lays them out
    as an even grid, and the caption never hides the face. ``look``: applied to the fitted picture (one resize
    from the image, whatever its size)."""
    side = _side(side)
    strip = sum(_line_height(sc) for _, sc in lines) + 8
    tile = np.full((side, side, 3), 235, np.uint8)
    h, w = picture.shape[:2]
    small = _scaled(picture, min((side - 6) / w, (side - strip - 3) / h))
    if look is not None:
        small = look(small)
    sh, sw = small.shape[:2]
    x0, y0 = (side - sw) // 2, 3 + (side - strip - 3 - sh) // 2
    tile[y0:y0 + sh, x0:x0 + sw] = small
    tile[side - strip:] = colour
    y = side - strip + 4
    for text, sc in lines:
        y += _line_height(sc)
        cv2.putText(tile, text, (7, y - int(_line_height(sc) * 0.25)), FONT, sc, (255, 255, 255), 1, cv2.LINE_AA)
    cv2.rectangle(tile, (0, 0), (side - 1, side - 1), colour, 3)
    return tile


def kept_thumbnail(image: np.ndarray, label: str, colour: str = "kept", side: int | None = None) -> np.ndarray:
    """A tile of a kept (or returned) image framed in ``colour`` (a name in previews.json), ``label`` below."""
    width = _side(side) - 14
    return _tile(image, [(t, 0.55) for t in _wrap(label, width, 0.55)[:2]], _colour(colour), side)


def marked_thumbnail(image: np.ndarray, word: str, reason: str = "", side: int | None = None) -> np.ndarray:
    """A tile of an image that was left out: greyed and faded, framed in red, ``word`` (e.g. SKIPPED) and the
    short reason below it."""
    def greyed(small: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(grey, 0.55, np.full_like(grey, 255), 0.45, 0)

    width = _side(side) - 14
    reason_lines = _wrap(short_reason(reason), width, 0.45)
    if len(reason_lines) > 2:
        reason_lines = reason_lines[:1] + [reason_lines[1] + " ..."]
    return _tile(image, [(word.upper(), 0.6)] + [(t, 0.45) for t in reason_lines], _colour("skipped"), side,
                 greyed)


def _curve_points(values: Sequence[float], total: int, box: tuple[int, int, int, int], lo: float, hi: float):
    x0, y0, x1, y1 = box
    n = len(values)
    xs = x0 + (x1 - x0) * (np.arange(n) + 1) / max(total, n, 1)
    ys = y1 - (y1 - y0) * (np.clip(np.asarray(values, float), lo, hi) - lo) / max(hi - lo, 1e-12)
    return np.stack([xs, ys], axis=1).round().astype(np.int32).reshape(-1, 1, 2)


def smoothed(values: Sequence[float], span: int) -> np.ndarray:
    """Mean of the last ``span`` values at each step (the trend a noisy diffusion loss hides)."""
    v = np.asarray(values, float)
    if not len(v):
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, len(v) + 1)
    start = np.maximum(0, idx - span)
    return (c[idx] - c[start]) / (idx - start)


def loss_curve(losses: Sequence[float], total_steps: int, width: int | None = None,
               height: int | None = None) -> np.ndarray:
    """The loss so far, drawn over the whole run's width: the curve grows to the right as training goes on.
    Light: each step's loss; dark: its running mean. Text: the step and the latest mean loss."""
    cfg = look()
    w, h = int(width or cfg["curve_width"]), int(height or cfg["curve_height"])
    img = np.full((h, w, 3), 255, np.uint8)
    box = (34, 22, w - 8, h - 22)  # plot area: x0, y0, x1, y1
    axis, text = _colour("axis"), _colour("text")
    cv2.line(img, (box[0], box[1]), (box[0], box[3]), axis, 1)
    cv2.line(img, (box[0], box[3]), (box[2], box[3]), axis, 1)
    total = max(int(total_steps), len(losses), 1)
    finite = [float(v) for v in losses if math.isfinite(v)]
    title = "loss"
    if finite:
        mean = smoothed(finite, max(5, len(finite) // 15))
        lo, hi = np.percentile(finite, 2), np.percentile(finite, 98)
        lo, hi = (lo, hi) if hi > lo else (lo - 0.5, hi + 0.5)
        cv2.polylines(img, [_curve_points(finite, total, box, lo, hi)], False, _colour("curve_raw"), 1, cv2.LINE_AA)
        cv2.polylines(img, [_curve_points(mean, total, box, lo, hi)], False, _colour("curve"), 2, cv2.LINE_AA)
        title = f"loss {mean[-1]:.4f}"
        for value, y in ((hi, box[1]), (lo, box[3])):
            cv2.putText(img, f"{value:.2f}", (2, y + 4), FONT, 0.32, text, 1, cv2.LINE_AA)
    cv2.putText(img, title, (box[0] + 4, 15), FONT, 0.45, text, 1, cv2.LINE_AA)
    cv2.putText(img, f"step {len(losses)}/{total}", (box[0] + 4, h - 6), FONT, 0.4, text, 1, cv2.LINE_AA)
    return img


def curve_extent(picture: np.ndarray) -> int:
    """The rightmost column that holds the curve's own colour (how far a drawn curve reaches), -1 if none.
    Tests read the progress previews with it."""
    ink = np.abs(picture[..., :3].astype(int) - np.array(_colour("curve"))).sum(axis=2) < 60
    cols = np.flatnonzero(ink.any(axis=0))
    return int(cols[-1]) if len(cols) else -1


def write_png(path: str | Path, picture: np.ndarray) -> Path:
    """A preview picture as a PNG (quick compression), written under a temporary name and renamed."""
    return save_png_atomic(picture, path, compression=1)


# What each step shows: its results first, then what it left out (greyed, with the reason).

def aligned_pictures(crops: Sequence[tuple[str, np.ndarray]], photos: Sequence[tuple[str, np.ndarray]],
                     skipped: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    """FaceAlign: the kept crops with their photo's name, then each skipped photo greyed with why."""
    by_name = dict(reversed(list(photos)))  # the first photo of a name
    shown = [kept_thumbnail(crop, name) for name, crop in crops]
    return shown + [marked_thumbnail(by_name[name], "skipped", why) for name, why in skipped if name in by_name]


def quality_pictures(crops: Sequence[np.ndarray], scores: Sequence[float], dropped: dict[int, str],
                     template: int) -> list[np.ndarray]:
    """Template Face: every crop with its quality score, the template marked, the dropped ones greyed."""
    shown = []
    for i, crop in enumerate(crops):
        if i in dropped:
            shown.append(marked_thumbnail(crop, "dropped", dropped[i]))
        elif i == template:
            shown.append(kept_thumbnail(crop, f"TEMPLATE {scores[i]:.2f}", "template"))
        else:
            shown.append(kept_thumbnail(crop, f"quality {scores[i]:.2f}"))
    return [shown[template]] + [s for i, s in enumerate(shown) if i != template]


def ranked_pictures(images: Sequence[np.ndarray], order: Sequence[int], likeness: Sequence[float],
                    accepted: Sequence[bool], rejected: Sequence[tuple[int, str]]) -> list[np.ndarray]:
    """RTSRank: the returned images in rank order with likeness and accept/reject on them, then the
    images not returned, greyed with the reason."""
    tiles = [partial(kept_thumbnail, images[i], f"#{rank} {pct:.0f}% {'accept' if ok else 'reject'}",
                     "kept" if ok else "skipped")
             for rank, (i, pct, ok) in enumerate(zip(order, likeness, accepted), start=1)]
    room = max(0, int(look()["max_tiles"]) - len(tiles))  # many generated images: the first rejected ones only
    tiles += [partial(marked_thumbnail, images[i], "rejected", why) for i, why in rejected[:room]]
    return list(parallel_map(lambda make: make(), tiles))  # side by side: resizing and drawing leave the GIL
