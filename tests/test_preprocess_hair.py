"""HumanParse's embedded default (person mask + 468-point face mesh) through the real host, on every folder of
../shared/faces: the hair kept above the chin and beside the face on long-haired people, nothing below the
chin outside the neck column with long_hair=cut, the mesh carried in FaceAlign's faces and used by
SkinRetouch, the classical parser still selectable. Writes contact sheets of every head-on-white crop."""

import json

import cv2
import numpy as np
import pytest
from conftest import ARTIFACTS, png_arrays

from facechain_core.face_mesh import topology

FOLDERS = ("obama", "biden", "rose_leslie", "hard", "jennifer_aniston", "katy_perry")
LONG_HAIR = ("jennifer_aniston", "katy_perry")
TOPOLOGY = topology()


def contour(mesh: np.ndarray, name: str) -> np.ndarray:
    return mesh[TOPOLOGY["contours"][name]]


def fill(shape, pts: np.ndarray) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m > 0


def prompt_for(folder: str) -> dict:
    def save_mask(src, slot, prefix):
        return {f"{prefix}_img": {"class_type": "MaskToImage", "inputs": {"mask": [src, slot]}},
                f"{prefix}_save": {"class_type": "SaveImage", "inputs": {"images": [f"{prefix}_img", 0],
                                                                         "filename_prefix": f"hair_{prefix}"}}}
    p = {
        # max_photos 19: a signature no other test file uses, so that the host's cache never hands this prompt's
        # FaceAlign result to another test's prompt (a cached node sends no UI output, which those tests read)
        "load": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": folder, "max_photos": 19}},
        "align": {"class_type": "FaceChainFaceAlign", "inputs": {
            "photos": ["load", 0], "size": 512, "face_fraction": 0.4, "face_centre": 0.42, "detector": "embedded",
            "names": ["load", 1]}},
        "keep": {"class_type": "FaceChainHumanParse", "inputs": {"images": ["align", 0], "faces": ["align", 1],
                                                                 "backend": "embedded"}},
        "cut": {"class_type": "FaceChainHumanParse", "inputs": {"images": ["align", 0], "faces": ["align", 1],
                                                                "backend": "embedded", "long_hair": "cut"}},
        "retouch": {"class_type": "FaceChainSkinRetouch", "inputs": {
            "images": ["keep", 0], "faces": ["align", 1], "strength": 0.6, "backend": "embedded"}},
        "faces": {"class_type": "PreviewAny", "inputs": {"source": ["align", 1]}},
        "keep_img": {"class_type": "SaveImage", "inputs": {"images": ["keep", 0], "filename_prefix": "hair_keep"}},
        "cut_img": {"class_type": "SaveImage", "inputs": {"images": ["cut", 0], "filename_prefix": "hair_cut"}},
    }
    p.update(save_mask("keep", 1, "keep_head"))
    p.update(save_mask("cut", 1, "cut_head"))
    p.update(save_mask("retouch", 1, "skin"))
    return p


@pytest.fixture(scope="module")
def runs(client) -> dict:
    out = {}
    for folder in FOLDERS:
        entry = client.run(prompt_for(folder))

        def images(nid, entry=entry):
            return png_arrays(client.output_images(entry, nid))

        faces = json.loads("\n".join(entry["outputs"]["faces"]["text"]))
        out[folder] = {"faces": faces, "keep": images("keep_img"), "cut": images("cut_img"),
                       "keep_head": [m[..., 0] > 127 for m in images("keep_head_save")],
                       "cut_head": [m[..., 0] > 127 for m in images("cut_head_save")],
                       "skin": [m[..., 0] > 127 for m in images("skin_save")]}
        assert len(out[folder]["keep"]) == len(faces) == len(out[folder]["cut_head"])
    return out


class Geometry:
    """The face in one levelled crop from its mesh: middle line, width, brow line, chin line."""

    def __init__(self, mesh: np.ndarray):
        oval = contour(mesh, "face_oval")
        self.left, self.right = float(oval[:, 0].min()), float(oval[:, 0].max())
        self.top, self.chin = float(oval[:, 1].min()), float(mesh[TOPOLOGY["points"]["chin"], 1])
        self.middle = (self.left + self.right) / 2
        self.width = self.right - self.left
        brows = np.vstack([contour(mesh, "right_brow"), contour(mesh, "left_brow")])
        self.brows = float(brows[:, 1].min())
        self.box_area = self.width * (self.chin - self.top)
        self.oval = oval


def hair_measures(head: np.ndarray, g: Geometry) -> dict:
    """Head-mask area above the brows (over the face's width and a bit), beside the face outline between the
    brows and the chin, and below the chin outside a neck column; each against the face box's area."""
    h, w = head.shape
    ys, xs = np.mgrid[0:h, 0:w]
    face = fill(head.shape, g.oval)
    over = (ys < g.brows) & (np.abs(xs - g.middle) < 0.75 * g.width) & ~face
    beside = (ys > g.brows) & (ys < g.chin) & ~face & (np.abs(xs - g.middle) < 1.0 * g.width)
    grow = np.sqrt(face.sum()) / 20 + 4  # the head rule's growth, and a few pixels of the edge's fade
    below = (ys > g.chin + grow) & (np.abs(xs - g.middle) > 0.35 * g.width + grow)
    return {k: float((head & region).sum()) / g.box_area for k, region in
            (("above", over), ("beside", beside), ("below", below))}


def test_face_mesh_in_faces_fits_the_keypoints(runs):
    for run in runs.values():
        for f in run["faces"]:
            mesh, k = np.asarray(f["mesh"], np.float32), np.asarray(f["keypoints"], np.float32)
            assert mesh.shape == (468, 2), f["name"]
            oval = contour(mesh, "face_oval")
            for p in k:
                assert cv2.pointPolygonTest(oval.reshape(-1, 1, 2), tuple(map(float, p)), True) > 5, f["name"]
            d = float(np.linalg.norm(k[1] - k[0]))
            for eye, kp in (("right_eye", k[0]), ("left_eye", k[1])):
                assert np.linalg.norm(contour(mesh, eye).mean(axis=0) - kp) < 0.2 * d, (f["name"], eye)
            lips = contour(mesh, "lips_outer")
            assert np.linalg.norm(lips.mean(axis=0) - (k[3] + k[4]) / 2) < 0.25 * d, f["name"]
            nose = mesh[TOPOLOGY["points"]["nose_tip"]]
            assert np.linalg.norm(nose - k[2]) < 0.25 * d, f["name"]
            assert mesh[TOPOLOGY["points"]["chin"], 1] > lips[:, 1].max() > k[:2, 1].max(), f["name"]


def test_long_hair_kept_above_and_beside_the_face(runs):
    for folder in LONG_HAIR:
        for f, keep, cut in zip(runs[folder]["faces"], runs[folder]["keep_head"], runs[folder]["cut_head"]):
            g = Geometry(np.asarray(f["mesh"], np.float32))
            for mode, head in (("keep", keep), ("cut", cut)):
                m = hair_measures(head, g)
                assert m["above"] > 0.35, (f["name"], mode, m)
                assert m["beside"] > 0.25, (f["name"], mode, m)


def test_cut_keeps_nothing_below_the_chin_outside_the_neck(runs):
    for run in runs.values():
        for f, cut, keep in zip(run["faces"], run["cut_head"], run["keep_head"]):
            g = Geometry(np.asarray(f["mesh"], np.float32))
            m = hair_measures(cut, g)
            assert m["below"] < 0.005, (f["name"], m)
            assert (cut & ~keep).sum() < 0.002 * cut.size, f["name"]  # keep only adds to cut


def test_keep_holds_long_hair_below_the_chin(runs):
    below = [hair_measures(head, Geometry(np.asarray(f["mesh"], np.float32)))["below"]
             for folder in LONG_HAIR for f, head in zip(runs[folder]["faces"], runs[folder]["keep_head"])]
    assert np.median(below) > 0.1, below
    short = [hair_measures(head, Geometry(np.asarray(f["mesh"], np.float32)))["below"]
             for folder in ("obama", "biden") for f, head in zip(runs[folder]["faces"], runs[folder]["keep_head"])]
    assert max(short) < 0.01, short  # short hair: nothing of the suit or shirt comes in


def test_retouch_leaves_eyes_brows_and_lips_by_their_contours(runs):
    for run in runs.values():
        for f, skin in zip(run["faces"], run["skin"]):
            mesh = np.asarray(f["mesh"], np.float32)
            for part in ("right_eye", "left_eye", "right_brow", "left_brow", "lips_outer"):
                inside = fill(skin.shape, contour(mesh, part))
                assert not (skin & inside).any(), (f["name"], part)
            assert skin.sum() > 0.03 * skin.size, f["name"]


def test_classical_parser_still_selectable(client):
    p = prompt_for("obama")
    p["keep"]["inputs"]["backend"] = "classical"
    entry = client.run({k: p[k] for k in ("load", "align", "keep", "keep_head_img", "keep_head_save")})
    heads = [m[..., 0] > 127 for m in png_arrays(client.output_images(entry, "keep_head_save"))]
    assert len(heads) == 4 and all(0.08 < h.mean() < 0.45 for h in heads)


def test_contact_sheet_of_every_head_on_white(runs):
    ARTIFACTS.mkdir(exist_ok=True)
    for mode in ("keep", "cut"):
        tiles = []
        for folder in FOLDERS:
            for f, img in zip(runs[folder]["faces"], runs[folder][mode]):
                t = cv2.resize(img, (256, 256), interpolation=cv2.INTER_AREA)
                cv2.putText(t, f["name"][:28], (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
                cv2.rectangle(t, (0, 0), (255, 255), (160, 160, 160), 1)
                tiles.append(t)
        cols = 7
        tiles += [np.full_like(tiles[0], 255)] * (-len(tiles) % cols)
        sheet = np.vstack([np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)])
        path = ARTIFACTS / f"head_on_white_{mode}.png"
        cv2.imwrite(str(path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
        assert path.stat().st_size > 10000
