"""The pixels of FaceFusion: which part of the face is blended, its colour and light, its detail.

All functions work on the region of interest around the target face (``local`` points are in its
pixels). Colour and light are matched region by region (a mask-weighted low-pass of the target minus
the warped template, added back), so a cheek in shadow stays in shadow and no patch of another colour
appears; the eyes keep at least the target's sharpness; the mask's edge is feathered inside the inner face.
"""

from __future__ import annotations

import cv2
import numpy as np

from . import face_mesh as fm


def _feathered(hard: np.ndarray, width: float) -> np.ndarray:
    """0..1 mask that is 1 deep inside ``hard`` (0/255) and falls to 0 at its edge over ``width`` pixels."""
    r = max(1, int(round(width / 2)))
    core = cv2.erode(hard, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    soft = cv2.GaussianBlur(core.astype(np.float32) / 255.0, (0, 0), max(0.5, width / 4))
    soft[hard == 0] = 0.0
    soft[soft < 1.0 / 255.0] = 0.0
    return np.clip(soft, 0.0, 1.0)


def region_mask(shape: tuple[int, int], local: np.ndarray, inner_poly: np.ndarray, level: str, iod: float,
                d: dict) -> np.ndarray:
    """The feathered blend mask of one level: the inner face, or the eyes and brows only."""
    hard = np.zeros(shape, np.uint8)
    if level in ("eyes_brows", "brows"):
        grow = d["eyes_brows_grow"] * iod
        for eye, brow in (("right_eye", "right_brow"), ("left_eye", "left_brow")):
            pts = fm.contour(local, brow)
            if level == "eyes_brows":
                pts = np.vstack([fm.contour(local, eye), pts])
            hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2)
            c = hull.mean(axis=0)
            grown = c + (hull - c) * (1 + grow / max(1.0, np.linalg.norm(hull - c, axis=1).mean()))
            cv2.fillPoly(hard, [np.round(grown).astype(np.int32)], 255)
        # keep the grown eye zones inside the inner face
        inner = np.zeros(shape, np.uint8)
        cv2.fillPoly(inner, [np.round(inner_poly).astype(np.int32)], 255)
        hard = cv2.bitwise_and(hard, inner)
    else:
        cv2.fillPoly(hard, [np.round(inner_poly).astype(np.int32)], 255)
    return _feathered(hard, d["feather"] * iod)


def _lowpass(img: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """Mask-weighted Gaussian low-pass: the local mean of ``img`` over the pixels where ``weight`` > 0."""
    k = max(1, int(sigma // 4))
    h, w = weight.shape
    small = (max(1, w // k), max(1, h // k))
    ws = cv2.resize(weight, small, interpolation=cv2.INTER_AREA)
    xs = cv2.resize(img * weight[..., None], small, interpolation=cv2.INTER_AREA)
    num = cv2.GaussianBlur(xs, (0, 0), sigma / k)
    den = cv2.GaussianBlur(ws, (0, 0), sigma / k)[..., None] + 1e-6
    return cv2.resize(num / den, (w, h), interpolation=cv2.INTER_LINEAR)


def match_colour(warped: np.ndarray, target: np.ndarray, support: np.ndarray, sigma: float) -> np.ndarray:
    """``warped`` (RGB uint8) given the target's colour and light region by region: in Lab, the
    target's local mean replaces the template's local mean; detail finer than ``sigma`` stays the template's."""
    w = cv2.cvtColor(warped.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    t = cv2.cvtColor(target.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    weight = support.astype(np.float32)
    out = w + _lowpass(t, weight, sigma) - _lowpass(w, weight, sigma)
    out[..., 0] = np.clip(out[..., 0], 0, 100)
    rgb = cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _box(pts: np.ndarray, pad: int, shape) -> tuple[slice, slice] | None:
    h, w = shape[:2]
    lo = np.maximum(np.floor(pts.min(axis=0)) - pad, 0).astype(int)
    hi = np.minimum(np.ceil(pts.max(axis=0)) + pad, [w, h]).astype(int)
    return None if np.any(hi - lo < 4) else (slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _skin_field(lab: np.ndarray, weight: np.ndarray, sigma: float) -> np.ndarray:
    """The skin's own colour at every pixel: a low-pass over the pixels ``weight`` calls skin."""
    return _lowpass(lab, weight.astype(np.float32), sigma)


def _distance_from(shape: tuple[int, int], points: np.ndarray, names: list[str]) -> np.ndarray:
    """Pixels from the named contours (0 inside them): every grown copy of them is one threshold of it."""
    inside = fm.fill_contours(shape, points, names)
    return cv2.distanceTransform(255 - inside, cv2.DIST_L2, 3)


def _around(local: np.ndarray, names: tuple, margin: int, shape: tuple):
    """For each named feature: (box around its contour grown by ``margin``, the mesh points in the box's
    pixels, each box pixel's distance from the feature). Features whose box falls outside are left out."""
    for name in names:
        box = _box(fm.contour(local, name), margin, shape)
        if box is None:
            continue
        size = (box[0].stop - box[0].start, box[1].stop - box[1].start)
        pts = local - [box[1].start, box[0].start]
        yield box, pts, _distance_from(size, pts, [name])


def _lab(rgb: np.ndarray, box) -> np.ndarray:
    return cv2.cvtColor(rgb[box].astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def _put_lab(out: np.ndarray, box, lab: np.ndarray) -> None:
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    out[box] = np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def match_brows(face: np.ndarray, target: np.ndarray, local: np.ndarray, iod: float, grow: float) -> np.ndarray:
    """The template's brows redrawn on the target's skin, in the target's brow colour and no denser.

    Around each brow both faces are split into a skin field (a low-pass of the skin beside the brow, bridged
    across it) and each pixel's darkness below it. The result is the target's skin field, darkened by the
    template's darkness (the brow's shape and hairs) scaled to the target's brow density, its colour moving
    toward the target's hair colour as it darkens. What is lighter than the template's skin (its brow ridge
    and the pale or grey band beside its brows) is kept at ``lighter_kept`` only, so it leaves no fringe.
    The eyes are left out; the change fades out over the zone's edge."""
    out = face.copy()
    g = max(1, int(round(grow * iod)))
    for box, pts, away in _around(local, ("right_brow", "left_brow"), 4 * g, face.shape):
        lashes = _distance_from(away.shape, pts, ["right_eye", "left_eye"]) <= g
        brow = away <= g
        zone = (away <= 3 * g) & ~lashes
        if brow.sum() < 12 or (zone & ~brow).sum() < 12:
            continue
        fl, tl = _lab(out, box), _lab(target, box)
        skin_f, skin_t = (_skin_field(lab, zone & ~brow, 1.5 * g) for lab in (fl, tl))
        dark_f, dark_t = skin_f[..., 0] - fl[..., 0], skin_t[..., 0] - tl[..., 0]
        core = away == 0
        mean_f = float(np.clip(dark_f[core], 0, None).mean())
        mean_t = float(np.clip(dark_t[core], 0, None).mean())
        if mean_f < 1.0:
            continue
        density = min(1.0, mean_t / mean_f)  # light or sparse brows (grey, blonde) stay light and sparse
        hair_w = np.clip(dark_t, 0, None) * core
        hair_t = (tl * hair_w[..., None]).sum(axis=(0, 1)) / max(1e-6, float(hair_w.sum()))
        full = max(1.0, float(np.percentile(dark_f[core], 85)))
        hairiness = np.clip(dark_f / full, 0.0, 1.0)[..., None]  # 0: the template's skin, 1: its brow hair
        hair = skin_t.copy()
        hair[..., 0] -= dark_f * density
        hair[..., 1:] += hairiness * density * (hair_t[1:] - skin_t[..., 1:])
        # Where the template's hair (at the target's density) is darker than the target's pixel it is drawn;
        # elsewhere the target stays as it is: its skin, texture and its own hairs where they reach further
        # (no brow is thinned into a pale edge).
        step = np.clip((dark_f * density - dark_t) / 4.0, 0.0, 1.0)
        drawn = (step * step * (3 - 2 * step))[..., None]
        redrawn = tl + (hair - tl) * drawn
        grown = (away <= 2 * g) & zone
        fade = cv2.GaussianBlur(grown.astype(np.float32), (0, 0), max(1.0, g / 2)) * grown
        _put_lab(out, box, fl + (redrawn - fl) * fade[..., None])
    return out


def match_lids(face: np.ndarray, target: np.ndarray, local: np.ndarray, iod: float, grow: float) -> np.ndarray:
    """The skin around each eye (lids, crease, lash line) given the target's colour and contrast: in Lab, the
    template's mean and spread of lightness there replaced by the target's, the hue the target's own (a
    grey-brown crease on a pink lid would look like make-up). The eye itself is left as it is; the change fades
    out over the band's edges."""
    out = face.copy()
    g = max(1, int(round(grow * iod)))
    for box, _, away in _around(local, ("right_eye", "left_eye"), 3 * g, face.shape):
        band = (away <= g) & (away > 0)
        if band.sum() < 12:
            continue
        fl, tl = _lab(out, box), _lab(target, box)
        mean_f, mean_t = fl[band].mean(axis=0), tl[band].mean(axis=0)
        spread = np.clip(tl[band].std(axis=0) / np.maximum(fl[band].std(axis=0), 1e-3), 0.5, 1.5)
        moved = (fl - mean_f) * spread + mean_t
        # hue from the target's own lids (a crease of another skin tone turns grey or blue on a pink lid);
        # the template's shading stays in the lightness
        moved[..., 1:] = _skin_field(tl, band, max(1.0, g / 2))[..., 1:] + 0.3 * (fl[..., 1:] - mean_f[1:])
        fade = cv2.GaussianBlur(band.astype(np.float32), (0, 0), max(1.0, g / 3))
        _put_lab(out, box, fl + (moved - fl) * fade[..., None])
    return out


def match_lips(face: np.ndarray, target: np.ndarray, local: np.ndarray, iod: float) -> np.ndarray:
    """The template's lips take the target's lip colour (Lab mean inside the lip contour; lipstick stays the
    image's), faded out over a few pixels at the lips' edge."""
    box = _box(fm.contour(local, "lips_outer"), 4, face.shape)
    if box is None:
        return face
    shape = (box[0].stop - box[0].start, box[1].stop - box[1].start)
    lips = fm.fill_contours(shape, local - [box[1].start, box[0].start], ["lips_outer"]) > 0
    if lips.sum() < 12:
        return face
    fl, tl = _lab(face, box), _lab(target, box)
    soft = cv2.GaussianBlur(lips.astype(np.float32), (0, 0), max(1.0, 0.02 * iod)) * lips
    out = face.copy()
    _put_lab(out, box, fl + (tl[lips].mean(axis=0) - fl[lips].mean(axis=0)) * soft[..., None])
    return out


def eye_boxes(points: np.ndarray, pad: float = 0.15) -> list[tuple[int, int, int, int]]:
    """x0, y0, x1, y1 around each eye's contour, padded by ``pad`` inter-ocular distances."""
    r, le = fm.contour(points, "right_eye"), fm.contour(points, "left_eye")
    iod = float(np.linalg.norm(le.mean(axis=0) - r.mean(axis=0)))
    boxes = []
    for eye in (r, le):
        lo, hi = eye.min(axis=0) - pad * iod, eye.max(axis=0) + pad * iod
        boxes.append((int(np.floor(lo[0])), int(np.floor(lo[1])), int(np.ceil(hi[0])), int(np.ceil(hi[1]))))
    return boxes


def _box_slices(shape: tuple, boxes: list[tuple[int, int, int, int]]) -> list[tuple[slice, slice]]:
    """The boxes clipped to the image, those at least 3 pixels wide and high."""
    h, w = shape[:2]
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if x1 - x0 >= 3 and y1 - y0 >= 3:
            out.append((slice(y0, y1), slice(x0, x1)))
    return out


def _detail(crops: list[np.ndarray]) -> float:
    """Mean Laplacian variance of the grey RGB uint8 ``crops``. OpenCV's variance: numpy's takes the GIL for
    every step, which a pool's threads queued on."""
    vals = [float(cv2.meanStdDev(cv2.Laplacian(cv2.cvtColor(np.ascontiguousarray(c), cv2.COLOR_RGB2GRAY),
                                               cv2.CV_64F))[1][0, 0] ** 2) for c in crops]
    return sum(vals) / len(vals) if vals else 0.0


def sharpness(rgb: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> float:
    """Mean Laplacian variance of the grey image inside the boxes (clipped to the image); each box alone is
    made grey and filtered, as cut from a grey image."""
    return _detail([rgb[sl] for sl in _box_slices(rgb.shape, boxes)])


def _details(stacks: list[np.ndarray]) -> np.ndarray:
    """``_detail`` of many candidates at once: ``stacks`` holds one (K, h, w, 3) uint8 array per box (K
    candidates); the answer is each candidate's mean Laplacian variance over the boxes, as OpenCV computes it
    (OpenCV's grey of all K at once, then the 3x3 Laplacian with a mirrored border per candidate). A handful
    of whole-array steps instead of three OpenCV calls per box and candidate: each call gives up the GIL and
    waits to take it back while a pool's other threads hold it."""
    out = np.zeros(len(stacks[0]), np.float64)
    for stack in stacks:
        k, h, w = stack.shape[:3]
        grey = cv2.cvtColor(np.ascontiguousarray(stack).reshape(k * h, w, 3), cv2.COLOR_RGB2GRAY)
        g = np.pad(grey.reshape(k, h, w).astype(np.int16), ((0, 0), (1, 1), (1, 1)), mode="reflect")
        lap = g[:, :-2, 1:-1] + g[:, 2:, 1:-1] + g[:, 1:-1, :-2] + g[:, 1:-1, 2:] - 4 * g[:, 1:-1, 1:-1]
        out += lap.reshape(k, -1).var(axis=1, dtype=np.float64)
    return out / len(stacks)


def _midpoints(lo: float, hi: float, depth: int) -> list[float]:
    """Every gain a bisection of [lo, hi] could try in its next ``depth`` steps, in order, each computed as the
    bisection computes it."""
    if depth == 0:
        return []
    g = (lo + hi) / 2
    return _midpoints(lo, g, depth - 1) + [g] + _midpoints(g, hi, depth - 1)


def match_detail(warped: np.ndarray, target: np.ndarray, boxes, min_ratio: float, max_ratio: float,
                 max_gain: float) -> np.ndarray:
    """Sharpen ``warped`` (unsharp mask) until its eye boxes carry at least ``min_ratio`` of the target's
    detail (a template face enlarged by the warp would look soft beside the image), or soften it to at most
    ``max_ratio`` (a crisp face pasted into a soft photo looks cut out)."""
    ref = sharpness(target, boxes)
    have = sharpness(warped, boxes)
    f = warped.astype(np.float32)
    if have > max_ratio * ref > 0:
        for sigma in (0.5, 0.7, 0.9, 1.1, 1.4, 1.8):
            soft = np.clip(cv2.GaussianBlur(f, (0, 0), sigma) + 0.5, 0, 255).astype(np.uint8)
            if sharpness(soft, boxes) <= max_ratio * ref:
                break
        return soft
    want = min_ratio * ref
    if have <= 0 or have >= want:
        return warped
    high = f - cv2.GaussianBlur(f, (0, 0), 1.0)
    cuts = _box_slices(f.shape, boxes)  # the tries need only the eye boxes (the same pixels as the whole)
    f_boxes, high_boxes = [f[sl][None] for sl in cuts], [high[sl][None] for sl in cuts]
    # An 8-step bisection of the gain (the Laplacian variance grows monotonically with it), run as two rounds
    # of 4 steps: each round tries the 15 gains its 4 steps could reach, all at once.
    lo, hi = 0.0, max_gain
    for _ in range(2):
        gains = _midpoints(lo, hi, 4)
        g = np.array(gains, np.float32)[:, None, None, None]  # float32, as a Python float meets float32 pixels
        enough = _details([np.clip(a + g * b + 0.5, 0, 255).astype(np.uint8)
                           for a, b in zip(f_boxes, high_boxes)]) >= want
        first = int(np.argmax(enough)) if enough.any() else len(gains)
        lo, hi = (gains[first - 1] if first else lo), (gains[first] if first < len(gains) else hi)
    return np.clip(f + hi * high + 0.5, 0, 255).astype(np.uint8)


def two_bands(target: np.ndarray, face: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ``two_band_blend`` mixes, made once per image (every try of the ladder mixes the same two faces):
    the target as float32, the face's broad shapes minus the target's (coarser than ``sigma``), and the
    face's fine detail minus the target's."""
    t = target.astype(np.float32)
    f = face.astype(np.float32)
    lo_t, lo_f = cv2.GaussianBlur(t, (0, 0), sigma), cv2.GaussianBlur(f, (0, 0), sigma)
    return t, lo_f - lo_t, (f - lo_f) - (t - lo_t)


def two_band_blend(bands: tuple[np.ndarray, np.ndarray, np.ndarray], alpha: np.ndarray,
                   strength: float) -> np.ndarray:
    """Blend without ghosting (``bands``: ``two_bands``'): the broad shapes are mixed by ``alpha``; the fine
    detail (lashes, pores, hair of the brows) comes from one image only, the template's where the mask shape
    is mostly in, so two sets of lashes or pores are never averaged into a soft double image. At low strength
    (below 0.25) the detail stays the target's, above 0.75 it is the template's, in between mixed."""
    t, d_lo, d_hi = bands
    shape = alpha / max(float(alpha.max()), 1e-6)
    a_hi = np.clip((shape - 0.35) / 0.3, 0.0, 1.0)
    a_hi = (a_hi * a_hi * (3 - 2 * a_hi)) * float(np.clip((strength - 0.25) / 0.5, 0.0, 1.0))
    a_hi[alpha <= 0] = 0.0
    out = t + d_lo * alpha[..., None] + d_hi * a_hi[..., None]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
