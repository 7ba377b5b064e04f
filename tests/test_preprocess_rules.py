"""The preprocessing library without the host: FaceChain's caption rules, the head rule both parsing
backends share, the retouch's guarantee outside skin, quality measures, and empty input."""

import cv2
import numpy as np
import pytest

from conftest import FACES
from facechain_core.align import align_photo
from facechain_core.errors import FaceChainError
from facechain_core.images import load_photo
from facechain_core.face_regions import FaceFrame
from facechain_core.parse import head_mask, masks_from_parts, parse_crops
from facechain_core.quality import assess_faces, pose, resolution
from facechain_core.retouch import retouch_crop, retouch_crops
from facechain_core.tags import CaptionSet, caption_photos, filter_tags, rules, shared_tags, subject_phrase


@pytest.fixture(scope="module")
def obama1():
    aligned, why = align_photo(load_photo(FACES / "obama" / "obama1.jpg"), "obama1.jpg")
    assert aligned is not None, why
    return aligned.image, aligned.face.keypoints


def test_tag_filter_drops_features_body_and_gender_words():
    tags = ["short hair", "brown eyes", "eyelashes", "nose", "parted lips", "upper body", "1boy", "male focus",
            "solo", "smile", "necktie", "short hair"]
    assert filter_tags(tags) == ["short hair", "smile", "necktie"]


def test_shared_tags_need_more_than_half_and_a_face_word():
    per = [["short hair", "smile", "necktie"], ["short hair", "necktie"], ["short hair", "smile"], ["black hair"]]
    # smile: 2 of 4 is not more than half; necktie is common but names no hair/face/mouth/skin/smile
    assert shared_tags(per) == ["short hair"]
    assert shared_tags(per[:3]) == ["short hair", "smile"]
    assert shared_tags([]) == []


@pytest.mark.parametrize("gender,age,phrase", [
    (0, 1, "a boy"), (1, 0, "a girl"), (0, 3, "a handsome man"), (1, 4, "a beautiful woman"),
    (0, 5, "a mature man"), (1, 8, "a mature woman")])
def test_subject_phrase_from_gender_and_age(gender, age, phrase):
    g, a = np.zeros(2), np.zeros(9)
    g[gender], a[age] = 1.0, 1.0
    assert subject_phrase(g, a) == phrase
    assert phrase in {p for group in rules()["subject"]["phrases"].values() for p in group.values()}


def test_caption_set_subset_recomputes_shared_tags():
    caps = CaptionSet("fcsks", "a man", [["short hair", "smile"], ["short hair"], ["smile"]], ["a", "b", "c"])
    assert caps.captions[0] == "fcsks, a man, short hair, smile"
    assert caps.prompt == "fcsks, a man, short hair, smile"
    sub = caps.subset([1, 2])
    assert sub.names == ["b", "c"] and sub.shared_tags == []
    d = sub.to_dict()
    assert set(d) >= {"trigger", "subject", "captions", "shared_tags", "prompt"}
    assert CaptionSet.from_dict(d).captions == d["captions"]


def test_parser_parts_become_one_head_limited_to_the_person():
    shape = (128, 128)
    face = np.zeros(shape, np.float32)
    face[50:90, 45:85] = 1
    hair = np.zeros(shape, np.float32)
    hair[30:52, 40:90] = 1
    stray_hair = np.zeros(shape, np.float32)
    stray_hair[5:15, 5:15] = 1  # a second hair region far away: not the head
    human = np.zeros(shape, np.float32)
    human[25:128, 35:95] = 1
    weak_face = np.ones(shape, np.float32)  # below FaceChain's 0.8 score: ignored
    f, h, p = masks_from_parts([face, hair, human, weak_face, stray_hair], ["Face", "Hair", "Human", "Face", "Hair"],
                               [0.95, 0.9, 0.99, 0.5, 0.85], shape)
    assert f.sum() == face.sum() * 255 and h.sum() == hair.sum() * 255
    head = head_mask(f, h, p)
    assert head[60, 60] and head[35, 60], "face and hair belong to the head"
    assert not head[10, 10], "a region apart from the face is not the head"
    assert not head[:, :35].any() and not head[:25].any(), "the head stays within the person"
    union = np.maximum(f, h) > 0
    assert (head > 0).sum() > union.sum() and (head[union] > 0).all(), "the head is face + hair, grown a little"


def test_retouch_never_touches_pixels_outside_its_mask(obama1):
    img, kps = obama1
    out, mask = retouch_crop(img, kps, 1.0)
    assert out.shape == img.shape
    changed = np.any(out != img, axis=-1)
    assert not (changed & (mask == 0)).any()
    assert changed[mask > 0].mean() > 0.3
    same, _ = retouch_crop(img, kps, 0.0)
    assert (same == img).all()
    limit = np.zeros(img.shape[:2], np.uint8)
    limit[:, :256] = 255
    half, m = retouch_crop(img, kps, 1.0, limit=limit)
    assert not m[:, 256:].any() and (half[:, 256:] == img[:, 256:]).all()
    with pytest.raises(FaceChainError, match="64x64"):
        retouch_crop(img, kps, 0.5, limit=np.zeros((64, 64), np.uint8))


def test_quality_measures(obama1):
    img, kps = obama1
    assert resolution({"source_size": [427, 240]}) < 0.5 <= resolution({"source_size": [910, 1137]}) == 1.0
    box = [154, 110, 205, 205]  # a face of 205 px in the crop
    assert resolution({"source_face_px": 95.0, "box": box, "source_size": [427, 240]}) < 0.5
    assert resolution({"source_face_px": 380.0, "box": box, "source_size": [910, 1137]}) == 1.0
    frame = FaceFrame.from_keypoints(kps)
    assert pose(frame) > 0.9
    turned = np.array(kps, float)
    turned[2, 0] += 0.5 * frame.eye_distance  # nose half an eye distance to the side: a turned head
    assert pose(FaceFrame.from_keypoints(turned)) < 0.3
    face = {"name": "a", "keypoints": kps.tolist(), "score": 0.95, "source_size": [910, 1137]}
    blurred = cv2.GaussianBlur(img, (0, 0), 3)
    result = assess_faces([blurred, img], [dict(face, name="blurred"), face], min_quality=0.0)
    assert result.template == 1
    assert result.scores[0].measures["sharpness"] < result.scores[1].measures["sharpness"]


def test_empty_input_is_refused_with_a_clear_error():
    for call in (lambda: parse_crops([], []), lambda: retouch_crops([], []),
                 lambda: caption_photos([], [], "fcsks"), lambda: assess_faces([], [])):
        with pytest.raises(FaceChainError, match="got no images"):
            call()
