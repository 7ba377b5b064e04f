"""FaceFusion's quicker forms give the answers of their plain forms, on real photos.

Threads fusing side by side queued on the GIL: every OpenCV, numpy or torch call gives it up and must take
it back. So the eye-detail bisection tries its gains in two batches, an image's blend parts are made once for
all its tries, the embedded nets' files are not looked up on every call, and a pool shares out OpenCV's
threads while it runs. None of this may change a pixel or a decision.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from conftest import FACES
from facechain_core import fusion_blend as fb
from facechain_core import onnx_torch
from facechain_core.images import load_photo
from facechain_core.threads import detect_faces_per_thread, parallel_map

PHOTOS = ["obama/obama2.jpg", "biden/biden1.jpg", "rose_leslie/rose1.jpg", "katy_perry/img44.jpg"]


def _face_and_eyes(rel: str):
    rgb = load_photo(FACES / rel)
    face = detect_faces_per_thread(rgb)[0]
    x, y, w, h = (int(v) for v in face.box)
    crop = np.ascontiguousarray(rgb[max(0, y):y + h, max(0, x):x + w])
    ex, ey = (face.keypoints[:2] - [max(0, x), max(0, y)]).T
    r = int(0.25 * abs(ex[1] - ex[0])) + 4
    boxes = [(int(cx) - r, int(cy) - r, int(cx) + r, int(cy) + r) for cx, cy in zip(ex, ey)]
    return crop, boxes


@pytest.fixture(scope="module", params=PHOTOS)
def face(request):
    return _face_and_eyes(request.param)


def _bisected(warped, target, boxes, min_ratio, max_gain):
    """match_detail's sharpening as a plain 8-step bisection, one OpenCV measure per gain."""
    want = min_ratio * fb.sharpness(target, boxes)
    f = warped.astype(np.float32)
    high = f - cv2.GaussianBlur(f, (0, 0), 1.0)
    lo, hi = 0.0, max_gain
    for _ in range(8):
        g = (lo + hi) / 2
        if fb.sharpness(np.clip(f + g * high + 0.5, 0, 255).astype(np.uint8), boxes) < want:
            lo = g
        else:
            hi = g
    return np.clip(f + hi * high + 0.5, 0, 255).astype(np.uint8)


def test_the_batched_detail_measure_is_opencvs(face):
    crop, boxes = face
    sharpened = [np.clip(crop.astype(np.float32) * k, 0, 255).astype(np.uint8) for k in (0.7, 1.0, 1.3)]
    cuts = fb._box_slices(crop.shape, boxes)
    assert len(cuts) == 2
    batched = fb._details([np.stack([im[sl] for im in sharpened]) for sl in cuts])
    one_by_one = [fb.sharpness(im, boxes) for im in sharpened]
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-12)
    assert len(set(np.round(batched, 3))) == 3  # three different images, three different measures


@pytest.mark.parametrize("sigma", [0.8, 1.6, 2.6])
@pytest.mark.parametrize("ratio", [0.8, 1.0])
def test_the_two_round_bisection_lands_where_the_plain_one_does(face, sigma, ratio):
    """A face softer than the target (as a warp that enlarged it makes it) is sharpened to the target's detail
    at the gain the plain bisection finds, to the last bit."""
    crop, boxes = face
    soft, target = cv2.GaussianBlur(crop, (0, 0), sigma), cv2.GaussianBlur(crop, (0, 0), 0.7 * sigma)
    want = ratio * fb.sharpness(target, boxes)
    assert fb.sharpness(soft, boxes) < want
    ours = fb.match_detail(soft, target, boxes, ratio, np.inf, 2.0)
    assert np.array_equal(ours, _bisected(soft, target, boxes, ratio, 2.0))
    f = soft.astype(np.float32)
    at_cap = np.clip(f + 2.0 * (f - cv2.GaussianBlur(f, (0, 0), 1.0)) + 0.5, 0, 255).astype(np.uint8)
    if fb.sharpness(at_cap, boxes) >= want:  # reachable: reached, and not overshot by much
        assert want <= fb.sharpness(ours, boxes) < 1.1 * want
    else:  # out of reach: the cap
        assert np.array_equal(ours, at_cap)


def test_the_blend_of_prepared_bands_is_the_plain_two_band_mix(face):
    crop, _ = face
    other = np.ascontiguousarray(crop[:, ::-1])  # another face over the same pixels: the mirror image
    h, w = crop.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    alpha = np.clip(1.2 - np.hypot((xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)), 0, 1).astype(np.float32)
    alpha[alpha < 1 / 255] = 0
    sigma = 0.06 * w
    for strength in (0.5, 1.0):
        a = alpha * strength
        ours = fb.two_band_blend(fb.two_bands(crop, other, sigma), a, strength)
        t, f = crop.astype(np.float32), other.astype(np.float32)
        lo_t, lo_f = cv2.GaussianBlur(t, (0, 0), sigma), cv2.GaussianBlur(f, (0, 0), sigma)
        shape = a / a.max()
        a_hi = np.clip((shape - 0.35) / 0.3, 0, 1)
        a_hi = a_hi * a_hi * (3 - 2 * a_hi) * np.clip((strength - 0.25) / 0.5, 0, 1) * (a > 0)
        plain = lo_t * (1 - a[..., None]) + lo_f * a[..., None] + (t - lo_t) * (1 - a_hi[..., None]) + \
            (f - lo_f) * a_hi[..., None]
        plain = np.clip(plain + 0.5, 0, 255).astype(np.uint8)
        diff = np.abs(ours.astype(int) - plain)  # the same sum in another order: at most a rounding apart
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
        assert np.array_equal(ours[a == 0], crop[a == 0])  # outside the mask: the target's own pixels


def test_a_pool_shares_out_opencvs_threads_and_gives_them_back():
    before = cv2.getNumThreads()
    cv2.setNumThreads(4)
    try:
        seen = list(parallel_map(lambda _: cv2.getNumThreads(), list(range(6)), 2))
        assert set(seen) == {2}
        assert cv2.getNumThreads() == 4
        with pytest.raises(ZeroDivisionError):  # a job that fails gives them back too
            list(parallel_map(lambda i: 1 / (i - 3), list(range(6)), 2))
        assert cv2.getNumThreads() == 4
    finally:
        cv2.setNumThreads(before)


def test_a_held_net_is_looked_up_again_only_after_a_while(monkeypatch):
    """Its file and licence are checked at most every RECHECK_S, not on each of the hundreds of calls a
    batch makes; a net is made once. (torch runs it on the CPU here, as the GPU would.)"""
    from facechain_core import model_store

    lookups = []
    real = model_store.embedded_path
    monkeypatch.setattr(model_store, "embedded_path", lambda name: lookups.append(name) or real(name))
    monkeypatch.setattr(onnx_torch, "nets_device", lambda: "cpu")
    clock = [1000.0]
    monkeypatch.setattr(onnx_torch.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(onnx_torch, "_recent", {})
    first = onnx_torch.gpu_net("sface")
    assert isinstance(first, onnx_torch.TorchNet)
    for _ in range(50):
        assert onnx_torch.gpu_net("sface") is first
    assert lookups == ["sface"]
    clock[0] += onnx_torch.RECHECK_S + 0.1
    assert onnx_torch.gpu_net("sface") is first  # the same file: the held net, not a new one
    assert lookups == ["sface", "sface"]


def test_a_template_looked_at_once_is_not_looked_at_again_and_keeps_no_reference(monkeypatch):
    """The template's face, mesh and vector are kept by its pixels (a graph fuses every batch with the same
    template): a second fusion meshes only the images' faces, and the person's photos given to the first
    fusion as its reference do not stay on the template the second one gets."""
    from facechain_core import fusion

    template = load_photo(FACES / "obama/obama1.jpg")
    images = [load_photo(FACES / rel) for rel in ("obama/obama2.jpg", "biden/biden1.jpg")]
    refs = [load_photo(FACES / "obama/obama3.jpg")]
    fusion._templates = fusion.Recent(4)
    meshed = []
    real = fusion.face_meshes
    monkeypatch.setattr(fusion, "face_meshes",
                        lambda pairs, workers=0, same_batch=False: meshed.append(len(pairs)) or real(pairs, workers,
                                                                                            same_batch))
    settings = fusion.FusionSettings(workers=1, processes=0)
    first = fusion.fuse_images(images, template, settings, references=refs)
    assert "person's 1 photo" in " ".join(f.note for f in first.images if f.fused)
    assert meshed[0] == 3  # the template and both images
    meshed.clear()
    again = fusion.fuse_images(images, template, settings)
    assert meshed[0] == 2  # the images only
    fusion._templates = fusion.Recent(4)
    fresh = fusion.fuse_images(images, template, settings)
    for a, b in zip(again.images, fresh.images):
        assert a.note == b.note and "photo" not in a.note
        assert np.array_equal(a.image, b.image)


def test_after_checks_together_decide_as_each_alone_and_either_schedule_picks_the_same_try(monkeypatch):
    """The after-check of several fused images at once (each net once for all of them) gives each image what
    its check alone gives; and run_tries, every remaining rung at once or one rung at a time, ends each image
    on the try that fusing it alone (fuse_one) ends on."""
    from facechain_core import fusion

    s = fusion.FusionSettings(workers=2, processes=0)
    template = load_photo(FACES / "obama/obama1.jpg")
    rels = ["obama/obama2.jpg", "obama/obama3.jpg", "biden/biden1.jpg", "biden/biden2.jpg", "rose_leslie/rose1.jpg"]
    images = [load_photo(FACES / rel) for rel in rels]
    looked = fusion._looks(["tpl"] + ["img"] * len(images), [template] + images, s)
    tpl, found = looked[0], looked[1:]
    checks = []
    for rgb, (faces, tgt, vec) in zip(images, found):
        job = fusion.start_fusing(rgb, faces, tpl, s, tgt, vec)
        for i in range(len(getattr(job, "ladder", []))):
            out, _ = fusion._in_image(rgb, job.roi, *job.patch(i, s.strength * job.ladder[i][1]))
            checks.append(fusion._Check(rgb, out, faces[0], tgt, job.before, job.ladder[i][0] != "brows"))
    assert len(checks) >= 6
    together = fusion._after_checks(checks, tpl, workers=2)
    assert {why == "" for why, _, _ in together} == {True, False}  # some pass, some fail: both paths taken
    for c, (why, after, vec) in zip(checks, together):
        why1, after1, vec1 = fusion._after_checks([c], tpl)[0]
        assert (why, after) == (why1, after1) and (vec is None) == (vec1 is None)
    asked = []  # the checks ask each net for one batch size whatever the company (TorchNet.run_many's same_batch)
    for name in ("detect_faces_many", "embed_faces", "face_meshes"):
        monkeypatch.setattr(fusion, name, lambda *a, _f=getattr(fusion, name), _n=name, **k: (
            asked.append((_n, k.get("same_batch"))), _f(*a, **k))[1])
    fusion._after_checks(checks, tpl, workers=2)
    assert {n for n, _ in asked} == {"detect_faces_many", "embed_faces", "face_meshes"}, asked
    assert all(same is True for _, same in asked), asked
    alone = [fusion.fuse_one(rgb, f[0], tpl, s, f[1]) for rgb, f in zip(images, found)]
    for cores in (1, 64):
        monkeypatch.setattr(fusion.os, "cpu_count", lambda: cores)
        jobs = fusion.start_all(images, found, tpl, s)
        fusion.run_tries(jobs, tpl, s)
        got = [j if isinstance(j, fusion.FusedImage) else fusion.finish_fusing(j, tpl) for j in jobs]
        for a, b in zip(alone, got):
            assert a.note == b.note and np.array_equal(a.image, b.image), cores
