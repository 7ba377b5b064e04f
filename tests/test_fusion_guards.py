"""FaceFusion's guards in process (no server): real meshes of real photos, changed the way a bad pairing is.

A mouth opened in the target fuses the eyes and brows only; a head turned far is left unfused; a warp that
folds triangles over is caught; the same face against itself passes every check. Milliseconds per case.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FACES
from facechain_core import face_mesh as fm
from facechain_core.fusion import Template, fuse_one, judge, rungs, FusionSettings
from facechain_core.fusion_geometry import FaceShape, Verdict, compare_faces, settings_data
from facechain_core.images import load_photo
from facechain_core.threads import detect_faces_per_thread


@pytest.fixture(scope="module")
def obama():
    rgb = load_photo(FACES / "obama" / "obama3.jpg")
    face = detect_faces_per_thread(rgb)[0]
    return rgb, face, Template.of(rgb, face)


def test_the_same_face_passes_every_guard(obama):
    _, _, tpl = obama
    verdict = judge(tpl, tpl.shape)
    assert verdict.level == "full" and not verdict.reduced and not verdict.reasons


def test_an_open_mouth_against_a_closed_one_fuses_the_eyes_and_brows_only(obama):
    _, _, tpl = obama
    pts = tpl.shape.points.copy()
    lower = fm.topology()["contours"]["lips_inner"][1:10]  # the inner lower lip, and point 14 in it
    pts[lower] += [0, 0.3 * tpl.shape.iod]
    pts[14] += [0, 0.3 * tpl.shape.iod]
    verdict = compare_faces(tpl.shape, FaceShape.of(pts))
    assert verdict.level == "eyes_brows" and "mouth open in the image" in verdict.reasons[0]


def test_a_head_turned_far_is_left_unfused(obama):
    _, _, tpl = obama
    pts = tpl.shape.points.copy()
    nose = fm.topology()["points"]["nose_tip"]
    shift = (settings_data()["guards"]["yaw_skip"] + 0.1) * abs(pts[454, 0] - pts[234, 0])
    pts[nose] += [shift, 0]
    verdict = compare_faces(tpl.shape, FaceShape.of(pts))
    assert verdict.level == "skip" and any("head turned too differently" in r for r in verdict.reasons)


def test_a_folded_warp_is_caught_and_the_image_comes_back_unchanged(obama):
    rgb, face, tpl = obama
    pts = tpl.shape.points.copy()
    # mirror the brows and eyes about the nose line: every triangle there flips over
    eyes = sorted({i for n in ("right_eye", "left_eye", "right_brow", "left_brow")
                   for i in fm.topology()["contours"][n]})
    cx = pts[fm.topology()["points"]["nose_tip"], 0]
    pts[eyes, 0] = 2 * cx - pts[eyes, 0]
    verdict = judge(tpl, FaceShape.of(pts))
    assert verdict.level == "skip" and any("flipped" in r for r in verdict.reasons), verdict.reasons
    # through fuse_one the template is its own target: already the person's face, nothing to add
    fused = fuse_one(rgb, [face], tpl, FusionSettings())
    assert not fused.fused and np.array_equal(fused.image, rgb) and "left unfused" in fused.note


def test_the_ladder_starts_where_the_guards_allow_and_goes_down_to_the_brows():
    d = settings_data()
    ladder = [(region, float(k)) for region, k in d["ladder"]]
    assert rungs(Verdict()) == ladder[:d["max_tries"]] and ladder[0] == ("inner", 1.0)
    reduced = Verdict()
    reduced.lower("reduced", "head turned")
    assert rungs(reduced)[0][0] == "inner" and rungs(reduced)[0][1] < 1.0
    mouth = Verdict()
    mouth.lower("eyes_brows", "mouth open")
    assert rungs(mouth)[0] == ("eyes_brows", 1.0) and rungs(mouth)[-1][0] == "brows"
    assert {region for region, _ in rungs(mouth)} == {"eyes_brows", "brows"}
    skip = Verdict()
    skip.lower("skip", "head turned too far")
    assert rungs(skip) == []
