"""The brow measures of tests/fusion_measures.py, in process (no server), on real photos.

Fused brows looked made-up (dark, drawn-on brows and a pale fringe above them) while every other measure
passed. The measures must be zero on an untouched photo, catch each defect made on purpose, catch the
made-up look of the template's eyes and brows pasted without the colour work, and pass the fusion's blend.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import FACES
from facechain_core import face_mesh as fm
from facechain_core import fusion as fu
from facechain_core import fusion_geometry as fg
from facechain_core.fusion import FusionSettings, Template, target_shape
from facechain_core.images import load_photo
from facechain_core.threads import detect_faces_per_thread
from fusion_measures import DARKENING_MAX, FRINGE_MAX, brow_measures, naturalness


@pytest.fixture(scope="module")
def rose():
    rgb = load_photo(FACES / "rose_leslie" / "rose2.jpg")
    face = detect_faces_per_thread(rgb)[0]
    return rgb, face, fm.face_mesh(rgb, face.keypoints).points


def _lab_edit(rgb: np.ndarray, mask: np.ndarray, dl: float) -> np.ndarray:
    """``rgb`` with L* moved by ``dl`` inside ``mask``."""
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    lab[..., 0] = np.clip(lab[..., 0] + dl * mask, 0, 100)
    return np.clip(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def test_an_untouched_photo_measures_zero(rose):
    rgb, _, points = rose
    assert brow_measures(rgb, rgb.copy(), points) == (0.0, 0.0)


def test_a_pale_band_along_the_brows_upper_edge_is_caught(rose):
    rgb, _, points = rose
    iod = fg.FaceShape.of(points).iod
    band = np.zeros(rgb.shape[:2], np.float32)
    for name in ("right_brow", "left_brow"):
        upper = np.round(fm.contour(points, name)[:5] - [0, 0.04 * iod]).astype(np.int32)
        cv2.polylines(band, [upper], False, 1.0, max(2, int(0.04 * iod)))
    fringe, darkening = brow_measures(rgb, _lab_edit(rgb, band, 12.0), points)
    assert fringe > FRINGE_MAX and darkening < DARKENING_MAX, (fringe, darkening)


def test_drawn_on_brows_are_caught(rose):
    rgb, _, points = rose
    brows = (fm.fill_contours(rgb.shape, points, ["right_brow", "left_brow"]) > 0).astype(np.float32)
    fringe, darkening = brow_measures(rgb, _lab_edit(rgb, brows, -18.0), points)
    assert darkening > DARKENING_MAX and fringe < FRINGE_MAX, (fringe, darkening)


def _eyes_brows_blended(rgb, warped, tgt, roi, s: FusionSettings) -> np.ndarray:
    """The image with the warped template's eyes and brows blended in at strength 1, as a fusion try does."""
    patch = fu._blend_patch(rgb, tgt, roi, "eyes_brows", 1.0, fu.shared_parts(rgb, warped, tgt, roi, s))
    return fu._in_image(rgb, roi, *patch)[0]


@pytest.mark.parametrize("rel", ["rose_leslie/rose1.jpg", "rose_leslie/rose2.jpg", "biden/biden2.jpg"])
def test_a_raw_paste_of_another_persons_brows_fails_and_the_fusion_blend_passes(rel):
    """obama1's eyes and brows on another person: pasted as they are (no colour work) they fail the brow
    measures; through the fusion's blend (region colour, brows redrawn on the target's skin, lids) they pass."""
    template = load_photo(FACES / "obama" / "obama1.jpg")
    tpl = Template.of(template, detect_faces_per_thread(template)[0])
    rgb = load_photo(FACES / rel)
    tgt = target_shape(rgb, detect_faces_per_thread(rgb)[0])
    roi = fu._roi(tgt.points, tgt.iod, rgb.shape[:2])
    warped = fg.warp_patch(template, tpl.shape.points, tgt.points, tpl.triangles, roi)
    raw = _eyes_brows_blended(rgb, warped, tgt, roi, FusionSettings(colour_match=False))
    fused = _eyes_brows_blended(rgb, warped, tgt, roi, FusionSettings())
    bad, good = naturalness(rgb, raw), naturalness(rgb, fused)
    assert bad.brow_darkening > DARKENING_MAX and bad.brow_fringe > FRINGE_MAX, bad
    assert not good.problems(), good.problems()
