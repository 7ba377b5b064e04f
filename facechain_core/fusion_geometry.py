"""The geometry of FaceFusion: the 468-point mesh of two faces, the warp between them, and the guards.

The template face is warped onto the target triangle by triangle (a Delaunay mesh over the template's
468 points), so every feature of the template lands on the target's own feature: the target keeps its
outline, jaw and pose. Before any pixel is blended the two meshes are compared (head pose, mouth and
eyes, the warp's triangles); what fails decides how much is fused (``data/fusion.json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from . import face_mesh as fm
from .data_files import load
LEVELS = ("full", "reduced", "eyes_brows", "brows", "skip")  # from the most fused to the least
REGIONS = ("inner", "eyes_brows", "brows")  # what each level blends ('reduced' is a strength, not a region)


def settings_data() -> dict:
    """``data/fusion.json``: the inner face, the blend and the guards' thresholds."""
    return load("fusion.json")


def _idx(name: str) -> int:
    return fm.topology()["points"][name]


@dataclass
class FaceShape:
    """One face's mesh and the measures the guards compare, lengths in inter-ocular distances (IOD)."""

    points: np.ndarray  # (468, 2)
    presence: float
    iod: float
    yaw: float  # nose tip across the face, -0.5..0.5 of the cheek-to-cheek width (0: facing the camera)
    pitch: float  # nose tip down from the eye line, as a share of the eye-to-mouth distance
    mouth_open: float  # inner lips apart, IOD
    mouth_width: float  # corner to corner, IOD
    eye_open: float  # mean eyelid gap over eye width
    _memo: dict = field(default_factory=dict, repr=False, compare=False)  # centre, and outside_inner by scale

    @classmethod
    def of(cls, points: np.ndarray, presence: float = 1.0) -> "FaceShape":
        p = np.asarray(points, np.float64)
        r_eye = fm.contour(p, "right_eye").mean(axis=0)
        l_eye = fm.contour(p, "left_eye").mean(axis=0)
        iod = float(np.linalg.norm(l_eye - r_eye)) or 1.0
        right = (l_eye - r_eye) / iod
        down = np.array([-right[1], right[0]])
        eyes = (r_eye + l_eye) / 2
        mouth = (p[_idx("mouth_right")] + p[_idx("mouth_left")]) / 2
        if np.dot(mouth - eyes, down) < 0:
            down = -down
        nose = p[_idx("nose_tip")]
        cheeks = p[_idx("right_cheek")], p[_idx("left_cheek")]
        width = abs(float(np.dot(cheeks[1] - cheeks[0], right))) or 1.0
        yaw = float(np.dot(nose - (cheeks[0] + cheeks[1]) / 2, right)) / width
        pitch = float(np.dot(nose - eyes, down)) / (abs(float(np.dot(mouth - eyes, down))) or 1.0)
        mouth_open = float(np.linalg.norm(p[13] - p[14])) / iod
        mouth_width = float(np.linalg.norm(p[_idx("mouth_right")] - p[_idx("mouth_left")])) / iod
        eye_open = (np.linalg.norm(p[159] - p[145]) / (np.linalg.norm(p[33] - p[133]) or 1.0)
                    + np.linalg.norm(p[386] - p[374]) / (np.linalg.norm(p[263] - p[362]) or 1.0)) / 2
        return cls(p, presence, iod, yaw, pitch, mouth_open, mouth_width, float(eye_open))

    @property
    def centre(self) -> np.ndarray:
        """Midway between the eye centres and the mouth centre: the point the inner face shrinks toward."""
        if "centre" not in self._memo:
            p = self.points
            eyes = (fm.contour(p, "right_eye").mean(axis=0) + fm.contour(p, "left_eye").mean(axis=0)) / 2
            mouth = (p[_idx("mouth_right")] + p[_idx("mouth_left")]) / 2
            self._memo["centre"] = (eyes + mouth) / 2
        return self._memo["centre"].copy()

    def inner_polygon(self, scale: float) -> np.ndarray:
        """The face oval pulled toward the face's centre: brows, eyes, nose, mouth, cheeks."""
        oval = fm.contour(self.points, "face_oval").astype(np.float64)
        c = self.centre
        return c + (oval - c) * scale

    def outside_inner(self, scale: float) -> np.ndarray:
        """Indices of the mesh points outside the inner face (outline, jaw, forehead, temples); found once per
        face and scale (the guards ask before the blend, the after-check after it)."""
        if scale not in self._memo:
            poly = self.inner_polygon(scale).astype(np.float32)
            self._memo[scale] = np.flatnonzero(~inside_polygon(self.points, poly)).astype(np.int32)
        return self._memo[scale].copy()


def inside_polygon(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Per point: inside ``poly`` or on its edge (as ``cv2.pointPolygonTest(...) >= 0``), for all points at
    once (even-odd crossings in float32, as OpenCV tests them; one OpenCV call per point queued a pool's
    threads on the GIL)."""
    pts = np.asarray(points, np.float32)
    a = np.asarray(poly, np.float32)
    b = np.roll(a, -1, axis=0)
    x, y = pts[:, :1], pts[:, 1:]
    ax, ay, bx, by = a[:, 0], a[:, 1], b[:, 0], b[:, 1]
    straddles = (ay > y) != (by > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        cross_x = ax + (y - ay) * (bx - ax) / (by - ay)
    inside = np.count_nonzero(straddles & (x < cross_x), axis=1) % 2 == 1
    # on an edge: collinear with it and between its ends
    cross = (bx - ax) * (y - ay) - (by - ay) * (x - ax)
    within = ((np.minimum(ax, bx) <= x) & (x <= np.maximum(ax, bx))
              & (np.minimum(ay, by) <= y) & (y <= np.maximum(ay, by)))
    return inside | np.any((cross == 0) & within, axis=1)


@dataclass
class Verdict:
    """How much of the template a target can take, and why (empty reasons: all checks passed)."""

    level: str = "full"
    reasons: list[str] = field(default_factory=list)
    reduced: bool = False  # blend with a lower strength (combines with any region)

    def lower(self, level: str, reason: str) -> None:
        self.reasons.append(reason)
        if level == "reduced":
            self.reduced = True
        if LEVELS.index(level) > LEVELS.index(self.level):
            self.level = level

    @property
    def region(self) -> str:
        """'inner' (brows, eyes, nose, mouth, cheeks), 'eyes_brows', 'brows' or 'none'."""
        return {"skip": "none", "eyes_brows": "eyes_brows", "brows": "brows"}.get(self.level, "inner")


def compare_faces(tpl: FaceShape, tgt: FaceShape) -> Verdict:
    """Pose and expression guards: the template's face against the target's."""
    g = settings_data()["guards"]
    v = Verdict()
    for shape, who in ((tpl, "template"), (tgt, "target")):
        if shape.presence < g["min_presence"]:
            v.lower("skip", f"the {who}'s face mesh is unsure (presence {shape.presence:.2f})")
    dyaw, dpitch = abs(tpl.yaw - tgt.yaw), abs(tpl.pitch - tgt.pitch)
    if dyaw > g["yaw_skip"]:
        v.lower("skip", f"head turned too differently (yaw apart {dyaw:.2f})")
    elif dyaw > g["yaw_reduce"]:
        v.lower("reduced", f"head turned differently (yaw apart {dyaw:.2f})")
    if dpitch > g["pitch_skip"]:
        v.lower("skip", f"head tilted too differently (pitch apart {dpitch:.2f})")
    elif dpitch > g["pitch_reduce"]:
        v.lower("reduced", f"head tilted differently (pitch apart {dpitch:.2f})")
    dmouth = abs(tpl.mouth_open - tgt.mouth_open)
    wratio = max(tpl.mouth_width, tgt.mouth_width) / max(1e-6, min(tpl.mouth_width, tgt.mouth_width))
    if dmouth > g["mouth_open_diff"]:
        v.lower("eyes_brows", f"mouth {'open' if tgt.mouth_open > tpl.mouth_open else 'closed'} in the image, "
                              f"not in the template (gap apart {dmouth:.2f} IOD)")
    elif wratio > g["mouth_width_ratio"]:
        v.lower("eyes_brows", f"smile differs (mouth widths {wratio:.2f}x apart)")
    deye = abs(tpl.eye_open - tgt.eye_open)
    if deye > g["eye_open_diff"]:
        v.lower("reduced", f"eyes open differently (eyelid gap apart {deye:.2f})")
    return v


def triangulate(points: np.ndarray) -> np.ndarray:
    """Delaunay triangles (index triples) over ``points``."""
    lo = np.floor(points.min(axis=0)) - 2
    hi = np.ceil(points.max(axis=0)) + 2
    div = cv2.Subdiv2D((int(lo[0]), int(lo[1]), int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1))
    div.insert([(float(x), float(y)) for x, y in points])
    # Subdiv2D answers with corner coordinates (float32): each back to the first point there, all at once
    keys = _point_keys(np.asarray(points, np.float32))
    order = np.argsort(keys, kind="stable")  # stable: the first of equal points comes first
    corners = _point_keys(div.getTriangleList().reshape(-1, 2).astype(np.float32))
    at = np.clip(np.searchsorted(keys[order], corners), 0, len(keys) - 1)
    found = keys[order][at] == corners
    idx = np.where(found, order[at], -1).reshape(-1, 3)
    # corners at the outer bounding vertices are left out, as are triangles with a corner twice
    keep = (idx >= 0).all(axis=1) & (idx[:, 0] != idx[:, 1]) & (idx[:, 1] != idx[:, 2]) & (idx[:, 0] != idx[:, 2])
    return idx[keep].astype(np.int32).reshape(-1, 3)


def _point_keys(xy: np.ndarray) -> np.ndarray:
    """One int64 per float32 point, equal exactly when both coordinates are (-0.0 taken as 0.0)."""
    xy = np.ascontiguousarray(xy + np.float32(0.0), np.float32)
    bits = xy.view(np.uint32).astype(np.int64)
    return (bits[:, 0] << 32) | bits[:, 1]


def signed_areas(points: np.ndarray, tris: np.ndarray) -> np.ndarray:
    a, b, c = points[tris[:, 0]], points[tris[:, 1]], points[tris[:, 2]]
    return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])


def check_warp(tpl: FaceShape, tgt: FaceShape, tris: np.ndarray, region: np.ndarray, verdict: Verdict,
               level_if_bad: str) -> None:
    """Flipped, degenerate or oddly scaled triangles among those whose three corners lie in ``region``
    (a boolean per mesh point): the warp would tear or smear there."""
    sel = tris[region[tris].all(axis=1)]
    if len(sel) == 0:
        return
    g = settings_data()["guards"]
    a_src = signed_areas(tpl.points, sel) / tpl.iod ** 2
    a_dst = signed_areas(tgt.points, sel) / tgt.iod ** 2
    tiny = 1e-5
    flipped = int(np.sum((np.sign(a_src) != np.sign(a_dst)) & (np.abs(a_dst) > tiny) & (np.abs(a_src) > tiny)))
    degenerate = int(np.sum((np.abs(a_dst) <= tiny) != (np.abs(a_src) <= tiny)))
    ok = (np.abs(a_src) > tiny) & (np.abs(a_dst) > tiny)
    scale = np.sqrt(np.abs(a_dst[ok]) / np.abs(a_src[ok]))
    odd = 0
    if len(scale):
        rel = scale / np.median(scale)
        odd = int(np.sum((rel > g["scale_tolerance"]) | (rel < 1 / g["scale_tolerance"])))
    bad = flipped + degenerate + odd
    if bad > g["scale_outlier_fraction"] * len(sel):
        verdict.lower(level_if_bad, f"the warp would fold or stretch {bad} of {len(sel)} triangles "
                                    f"({flipped} flipped, {degenerate} degenerate, {odd} scaled far from the mean)")


def triangle_labels(points: np.ndarray, tris: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) int32 map of the triangle whose inside (edges included) holds each pixel's centre; -1 where
    none does. All triangles at once, row span by row span, in a few numpy passes: drawing them one by
    one (~900 OpenCV calls an image) let a pool's threads queue on the GIL between the calls, and the
    drawing's rounded corners gave edge pixels to a neighbour that does not hold them."""
    h, w = shape
    label = np.full((h, w), -1, np.int32)
    if len(tris) == 0 or h == 0 or w == 0:
        return label
    pts = np.asarray(points, np.float64)
    p = pts[tris]  # (T, 3, 2), corners sorted top to bottom next
    p = np.take_along_axis(p, np.argsort(p[:, :, 1], axis=1, kind="stable")[:, :, None], axis=1)
    (x0, y0), (x1, y1), (x2, y2) = (p[:, i].T for i in range(3))
    first = np.maximum(np.ceil(y0), 0).astype(np.int64)
    rows = np.maximum(np.minimum(np.floor(y2), h - 1).astype(np.int64) - first + 1, 0)
    rows[signed_areas(pts, tris) == 0] = 0  # a flat triangle holds no pixel (nor a map)
    k = np.repeat(np.arange(len(tris)), rows)  # one entry per (triangle, pixel row)
    y = (np.arange(int(rows.sum())) - np.repeat(np.cumsum(rows) - rows, rows) + first[k]).astype(np.float64)

    def along(xa, ya, xb, yb, fallback):  # x on the edge a->b at row y (fallback share when it is flat)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(yb > ya, (y - ya) / (yb - ya), fallback)
        return xa + (xb - xa) * t

    long_edge = along(x0[k], y0[k], x2[k], y2[k], 0.0)
    short_edge = np.where(y < y1[k], along(x0[k], y0[k], x1[k], y1[k], 1.0), along(x1[k], y1[k], x2[k], y2[k], 0.0))
    lo = np.maximum(np.ceil(np.minimum(long_edge, short_edge) - 1e-9), 0).astype(np.int64)
    hi = np.minimum(np.floor(np.maximum(long_edge, short_edge) + 1e-9), w - 1).astype(np.int64)
    width = np.maximum(hi - lo + 1, 0)
    span = np.repeat(np.arange(len(y)), width)  # one entry per pixel
    x = np.arange(int(width.sum())) - np.repeat(np.cumsum(width) - width, width) + lo[span]
    label[y[span].astype(np.int64), x] = k[span]
    return label


def warp_patch(src: np.ndarray, src_pts: np.ndarray, dst_pts: np.ndarray, tris: np.ndarray,
               roi: tuple[int, int, int, int]) -> np.ndarray:
    """Piecewise-affine warp of ``src`` so that ``src_pts`` land on ``dst_pts``; returns the ``roi``
    (x0, y0, x1, y1) patch of the target frame. Pixels no triangle covers take the whole face's similarity
    fit (they lie outside the mesh, where no blend reaches)."""
    x0, y0, x1, y1 = roi
    w, h = x1 - x0, y1 - y0
    local = dst_pts.astype(np.float64) - [x0, y0]
    label = triangle_labels(local, tris, (h, w))
    # Every triangle's affine map from the target to the template, solved at once: [x y 1] M^T = src.
    dst_h = np.concatenate([local[tris], np.ones((len(tris), 3, 1))], axis=2)
    with np.errstate(all="ignore"):
        maps = np.linalg.solve(dst_h + np.eye(3) * 1e-9, src_pts[tris].astype(np.float64)).transpose(0, 2, 1)
    whole, _ = cv2.estimateAffinePartial2D(local, src_pts.astype(np.float64))
    # the whole face's fit last: label -1 (no triangle) picks it; each pixel's coefficients in float32 (a
    # hundredth of remap's 1/32-pixel steps), gathered one at a time
    coef = np.concatenate([np.nan_to_num(maps), whole[None]]).reshape(-1, 6).astype(np.float32)
    xx = np.arange(w, dtype=np.float32)[None, :]
    yy = np.arange(h, dtype=np.float32)[:, None]
    map_x = coef[:, 0][label] * xx + coef[:, 1][label] * yy + coef[:, 2][label]
    map_y = coef[:, 3][label] * xx + coef[:, 4][label] * yy + coef[:, 5][label]
    return cv2.remap(src, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)


def outline_shift(before: FaceShape, after_points: np.ndarray, scale: float) -> float:
    """The largest move of a mesh point outside the inner face, in IOD."""
    idx = before.outside_inner(scale)
    if len(idx) == 0:
        return 0.0
    return float(np.max(np.linalg.norm(after_points[idx] - before.points[idx], axis=1)) / before.iod)
