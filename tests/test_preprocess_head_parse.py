"""HumanParse's embedded parser in process (no server): another person behind the head stays out, the face mesh
fits the face it was given, long_hair=cut ends at the chin, black-and-white photos work, bad mesh data is
ignored rather than trusted."""

import cv2
import numpy as np
import pytest

from conftest import ARTIFACTS, FACES
from facechain_core.align import AlignSettings, align_photo
from facechain_core.errors import FaceChainError
from facechain_core.face_mesh import add_meshes, contour, face_mesh, mesh_from_list, point
from facechain_core.images import load_photo
from facechain_core.parse import parse_crop, parse_crops

PAIRS = [("jennifer_aniston/img53.jpg", "biden/biden2.jpg", 1), ("obama/obama1.jpg", "katy_perry/img45.jpg", -1),
         ("katy_perry/img43.jpg", "obama/obama3.jpg", 1), ("rose_leslie/rose2.jpg", "jennifer_aniston/img12.jpg", -1)]


def aligned(rel: str):
    a, why = align_photo(load_photo(FACES / rel), rel, AlignSettings())
    assert a is not None, why
    return a.image, a.face.keypoints


@pytest.fixture(scope="module")
def crops() -> dict:
    return {rel: aligned(rel) for pair in PAIRS for rel in pair[:2]}


def with_bystander(subject, other, side: int):
    """The subject's crop with another person's head and shoulders (3/4 size) pasted into the background
    beside and behind the head, touching the hair; returns the picture and the bystander's keypoints."""
    (a, ka), (b, kb) = subject, other
    s = 0.75
    small = cv2.resize(b, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
    width = 2.2 * np.linalg.norm(ka[1] - ka[0])
    shift = np.array([ka[:, 0].mean() + side * 1.25 * width, ka[:, 1].mean() + 0.1 * width]) - kb.mean(axis=0) * s
    m = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
    warped = cv2.warpAffine(small, m, (a.shape[1], a.shape[0]))
    inside = cv2.warpAffine(np.full(small.shape[:2], 255, np.uint8), m, (a.shape[1], a.shape[0])) > 0
    behind = inside & (parse_crop(a, ka).person == 0)
    out = a.copy()
    out[behind] = warped[behind]
    return out, kb * s + shift


def test_a_person_behind_the_head_stays_out(crops):
    tiles = []
    for subj, other, side in PAIRS:
        picture, kb = with_bystander(crops[subj], crops[other], side)
        alone = parse_crop(*crops[subj]).head > 0
        mixed = parse_crop(picture, crops[subj][1])
        head = mixed.head > 0
        (x0, y0), (x1, y1) = kb.min(axis=0).astype(int), kb.max(axis=0).astype(int)
        box = np.zeros(head.shape, bool)
        box[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = True
        assert box.sum() > 500, subj
        assert head[box].mean() < 0.02, (subj, other, head[box].mean())
        # the subject's own head is still there (some hair nearest the bystander may go)
        assert (head & alone).sum() > 0.8 * alone.sum(), subj
        tiles += [cv2.resize(picture, (256, 256)), cv2.resize(mixed.image, (256, 256))]
    ARTIFACTS.mkdir(exist_ok=True)
    sheet = np.vstack([np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles), 4)])
    cv2.imwrite(str(ARTIFACTS / "head_parse_bystanders.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def test_mesh_follows_the_face_it_is_given(crops):
    img, k = crops["obama/obama1.jpg"]
    mesh = face_mesh(img, k)
    assert mesh.points.shape == (468, 2) and mesh.presence > 0.9
    d = np.linalg.norm(k[1] - k[0])
    assert np.linalg.norm(point(mesh.points, "nose_tip") - k[2]) < 0.25 * d
    # the same face turned by 20 degrees: the points turn with it
    m = cv2.getRotationMatrix2D((256.0, 256.0), 20, 1.0)
    turned = cv2.warpAffine(img, m, (512, 512), borderValue=(255, 255, 255))
    kt = k @ m[:, :2].T + m[:, 2]
    moved = mesh.points @ m[:, :2].T + m[:, 2]
    err = np.linalg.norm(face_mesh(turned, kt).points - moved, axis=1)
    assert np.median(err) < 0.06 * d, np.median(err)
    # a crop with no face in it: the presence score says so
    blank = np.full((512, 512, 3), 200, np.uint8)
    assert face_mesh(blank, k).presence < 0.5


def test_cut_ends_at_the_chin_and_keep_adds_only_below_it(crops):
    img, k = crops["rose_leslie/rose2.jpg"]
    mesh = face_mesh(img, k).points
    keep, cut = parse_crop(img, k, mesh=mesh).head > 0, parse_crop(img, k, mesh=mesh, long_hair="cut").head > 0
    chin = point(mesh, "chin")[1]
    grow = np.sqrt(parse_crop(img, k, mesh=mesh).face.astype(bool).sum()) / 20 + 4
    assert not cut[int(chin + grow):].any()
    assert keep[int(chin + grow):].sum() > 0.05 * keep.sum()  # her long hair
    assert (cut & ~keep).sum() < 0.002 * cut.size


def test_grayscale_and_bad_mesh_data(crops):
    img, k = crops["katy_perry/img43.jpg"]
    gray = np.repeat(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[..., None], 3, axis=2)
    head = parse_crop(gray, k).head > 0
    colour = parse_crop(img, k).head > 0
    assert (head & colour).sum() > 0.8 * colour.sum()
    with pytest.raises(FaceChainError, match="grayscale"):
        parse_crop(gray, k, backend="classical")
    assert mesh_from_list([[1, 2]] * 467) is None and mesh_from_list("x") is None
    assert mesh_from_list([[float("nan"), 0.0]] * 468) is None
    eyes = contour(face_mesh(img, k).points, "right_eye")
    assert np.linalg.norm(eyes.mean(axis=0) - k[0]) < 0.2 * np.linalg.norm(k[1] - k[0])
    with pytest.raises(FaceChainError, match="long_hair"):
        parse_crops([img], [k], long_hair="short")


def test_missing_model_files_name_the_command(crops, tmp_path, monkeypatch):
    img, k = crops["obama/obama1.jpg"]
    monkeypatch.setenv("FACECHAIN_EMBEDDED_DIR", str(tmp_path))
    with pytest.raises(FaceChainError, match="python install.py"):
        parse_crop(img, k)
    faces = [{"name": "obama1.jpg", "keypoints": k.tolist()}]
    assert add_meshes([img], faces) == faces  # FaceAlign goes on without the mesh
    # the classical parser needs no model file
    assert parse_crop(img, k, backend="classical").head.any()
