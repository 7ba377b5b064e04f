"""Finding the subject through the real host: photos lying on their side or upside down come out upright,
group photos keep the face of the person the set is of, AutoTag's offline subject phrase says who."""

import json
import re

import cv2
import numpy as np
import pytest
from conftest import ARTIFACTS, FACES, png_arrays
from test_face_align import align_prompt as face_align_prompt
from PIL import Image

from facechain_core.align import align_photos, mirrored_tilt, turn_upright
from facechain_core.detect import detect_faces
from facechain_core.images import load_photo
from facechain_core.recognition import embed_face
from facechain_core.threads import detect_faces_per_thread

ROTATED = {"obama/obama1.jpg": 90, "rose_leslie/rose1.jpg": 180, "katy_perry/img42.jpg": 270,
           "jennifer_aniston/img53.jpg": 90, "biden/biden1.jpg": 270, "katy_perry/img45.jpg": 180}


def align_prompt(folder: str, prefix: str, size: int = 512) -> dict:
    """test_face_align's graph, plus the faces data shown (PreviewAny)."""
    prompt = face_align_prompt(folder, size, prefix)
    prompt["4"] = {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}
    return prompt


def run_align(client, folder: str, prefix: str, size: int = 512) -> tuple[list[np.ndarray], list[dict], str]:
    entry = client.run(align_prompt(folder, prefix, size))
    crops = png_arrays(client.output_images(entry, "3"))
    faces = json.loads("\n".join(entry["outputs"]["4"]["text"]))
    return crops, faces, "\n".join(entry["outputs"]["2"]["text"])


def contact_sheet(name: str, tiles: list[tuple[str, np.ndarray]], side: int = 256, per_row: int = 6) -> None:
    rows = []
    for i in range(0, len(tiles), per_row):
        row = []
        for label, img in tiles[i:i + per_row]:
            t = cv2.resize(np.ascontiguousarray(img), (side, side), interpolation=cv2.INTER_AREA)
            cv2.putText(t, label[:30], (4, side - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255, 0, 0), 1, cv2.LINE_AA)
            row.append(t)
        row += [np.full((side, side, 3), 200, np.uint8)] * (per_row - len(row))
        rows.append(np.hstack(row))
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(np.vstack(rows)).save(ARTIFACTS / name)


def subject_face(crop: np.ndarray):
    """The centred face of a FaceAlign crop."""
    side = crop.shape[0]
    faces = [f for f in detect_faces(crop) if abs(f.centre[0] / side - 0.5) < 0.05]
    assert faces, "no centred face in the crop"
    return faces[0]


def crop_embedding(crop: np.ndarray) -> np.ndarray:
    return embed_face(crop, subject_face(crop))


def photo_embedding(rel: str) -> np.ndarray:
    """The embedding of the one face of a single-face photo, searched at FaceAlign's working size."""
    img = load_photo(FACES / rel)
    faces = detect_faces_per_thread(img)
    assert len(faces) == 1, rel
    return embed_face(img, faces[0])


# --- upright photos --------------------------------------------------------------------------------------

def test_rotated_copies_come_out_upright_and_level(client, comfy_base):
    folder = comfy_base / "input" / "rotated"
    folder.mkdir(exist_ok=True)
    names = {}
    for rel, turn in ROTATED.items():
        name = f"{turn}_{rel.split('/')[-1].replace('.jpg', '.png')}"
        pixels = np.rot90(np.asarray(Image.open(FACES / rel).convert("RGB")), -turn // 90)  # clockwise, no EXIF
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / name)
        names[name] = (rel, turn)
    crops, faces, report = run_align(client, "rotated", "rotated")
    assert f"kept {len(ROTATED)} of {len(ROTATED)}" in report, report
    assert [f["name"] for f in faces] == sorted(names)
    tiles = []
    for crop, face in zip(crops, faces):
        rel, turn = names[face["name"]]
        assert face["upright_turn"] == (360 - turn) % 360, face
        assert f"{face['name']}: kept" in report and f"turned upright by {(360 - turn) % 360} deg clockwise" in report
        tilt = mirrored_tilt(crop, subject_face(crop))
        assert abs(tilt) <= 2.0, f"{face['name']}: eyes tilted {tilt:.2f} deg"
        assert turn_upright(crop)[0] == 0, f"{face['name']}: the crop is not confidently upright"
        # the same person as the upright original
        assert float(crop_embedding(crop) @ photo_embedding(rel)) > 0.5, face["name"]
        tiles.append((f"{face['name']} {tilt:+.1f}", crop))
    contact_sheet("subject_rotated.png", tiles)


@pytest.mark.host  # slow layer: heavy, though no server
def test_no_quarter_turn_of_any_shared_photo_is_kept_sideways():
    """Library level, every single-face photo of ../shared/faces at all four quarter turns."""
    for rel in sorted(p.relative_to(FACES).as_posix() for p in FACES.glob("*/*") if p.suffix in (".jpg", ".png")):
        if rel == "hard/two_people.jpg":
            continue
        img = load_photo(FACES / rel)
        result = align_photos([(str(q), np.ascontiguousarray(np.rot90(img, -q))) for q in range(4)])
        assert len(result.aligned) == 4, (rel, result.report)
        for a in result.aligned:
            assert (int(a.name) * 90 + a.upright_turn) % 360 == 0, (rel, a.name, a.upright_turn)
            assert turn_upright(a.image)[0] == 0, (rel, a.name)


# --- the subject by identity -----------------------------------------------------------------------------

def test_group_photos_keep_her_face(client):
    crops, faces, report = run_align(client, "jennifer_aniston", "jennifer")
    by_name = dict(zip([f["name"] for f in faces], crops))
    assert set(by_name) == {p.name for p in (FACES / "jennifer_aniston").glob("*.jpg")}, report
    singles = [photo_embedding(f"jennifer_aniston/{n}") for n in ("img3.jpg", "img12.jpg", "img53.jpg", "img56.jpg")]
    for name, n_faces in (("img54.jpg", 4), ("img55.jpg", 2)):
        assert re.search(rf"{name}: kept .*face 1 of {n_faces} .*chosen by identity: SFace similarity", report), report
        sims = [float(crop_embedding(by_name[name]) @ e) for e in singles]
        assert min(sims) > 0.45, (name, sims)
    # the bystanders of img54 are other people: none of them is her
    img = load_photo(FACES / "jennifer_aniston" / "img54.jpg")
    others = detect_faces_per_thread(img)[1:]
    assert len(others) == 3
    assert max(float(embed_face(img, f) @ e) for f in others for e in singles) < 0.3
    contact_sheet("subject_jennifer.png", [(n, c) for n, c in sorted(by_name.items())])


@pytest.mark.parametrize("person,kept,face", [("obama", True, 1), ("biden", True, 2), ("rose_leslie", False, 0)])
def test_two_people_photo_follows_the_set(client, comfy_base, person, kept, face):
    folder = comfy_base / "input" / f"group_{person}"
    folder.mkdir(exist_ok=True)
    for p in sorted((FACES / person).glob("*.jpg")) + [FACES / "hard" / "two_people.jpg"]:
        (folder / p.name).write_bytes(p.read_bytes())
    crops, faces, report = run_align(client, folder.name, f"group_{person}", size=256)
    names = [f["name"] for f in faces]
    if not kept:
        assert "two_people.jpg" not in names
        assert "two_people.jpg: skipped, 2 faces, none matches the set's identity" in report, report
        return
    assert "two_people.jpg: kept" in report and f"face {face} of 2" in report, report
    crop = crops[names.index("two_people.jpg")]
    contact_sheet(f"subject_two_people_{person}.png", list(zip(names, crops)))
    own = [photo_embedding(f"{person}/{p.name}") for p in sorted((FACES / person).glob("*.jpg"))
           if p.name != "obama4_240p.jpg"]
    assert min(float(crop_embedding(crop) @ e) for e in own) > 0.45


def test_without_single_face_photos_facechain_rule_decides(client, comfy_base):
    folder = comfy_base / "input" / "groups_only"
    folder.mkdir(exist_ok=True)
    for rel in ("hard/two_people.jpg", "jennifer_aniston/img54.jpg"):
        (folder / rel.split("/")[-1]).write_bytes((FACES / rel).read_bytes())
    _, faces, report = run_align(client, "groups_only", "groups_only", size=256)
    assert [f["name"] for f in faces] == ["img54.jpg"], report
    assert "img54.jpg: kept" in report and "chosen by FaceChain's rule" in report
    assert "two_people.jpg: skipped, 2 faces of similar size" in report


# --- AutoTag's subject phrase offline ----------------------------------------------------------------------

def autotag_prompt(folder: str) -> dict:
    p = align_prompt(folder, "unused", size=256)
    del p["3"], p["4"]
    p["5"] = {"class_type": "FaceChainAutoTag", "inputs": {
        "images": ["2", 0], "faces": ["2", 1], "trigger": "fcsks", "subject": "a person", "subject_from": "auto",
        "tagger": "none", "threshold": 0.35}}
    p["6"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 3]}}
    return p


@pytest.mark.parametrize("person,phrase", [("obama", " man"), ("biden", "a mature man"),
                                           ("rose_leslie", " woman"), ("katy_perry", " woman")])
def test_offline_captions_say_man_or_woman(client, person, phrase):
    entry = client.run(autotag_prompt(person))
    report = "\n".join(entry["outputs"]["6"]["text"])
    n = len(list((FACES / person).glob("*.jpg")))
    lines = [line for line in report.splitlines() if line.startswith("- ")]
    assert len(lines) == n, report
    for line in lines:
        subject = line.split(": ", 1)[1].split(", ")[1]
        assert subject.endswith(phrase.strip()) and phrase in f" {subject}", line
    assert "from the embedded gender and age model" in report and "offline" in report, report


def test_mixed_set_gives_no_guessed_gender():
    """Two men and two women: the embedded model cannot name one gender for the set, so the phrase comes
    from the node's input and the note says why."""
    from facechain_core.tags import caption_photos

    rels = ["obama/obama1.jpg", "obama/obama2.jpg", "rose_leslie/rose1.jpg", "rose_leslie/rose2.jpg"]
    aligned = align_photos([(r, load_photo(FACES / r)) for r in rels]).aligned
    caps = caption_photos([a.image for a in aligned], [a.face.keypoints for a in aligned], "fcsks", "a person",
                          "embedded", "none")
    assert caps.subject == "a person"
    assert "could not tell the gender reliably" in caps.notes[0] and "male 0.50" in caps.notes[0], caps.notes
    one = caption_photos([aligned[0].image], [aligned[0].face.keypoints], "fcsks", "a person", "embedded", "none")
    assert one.subject.endswith(" man")


def test_age_probabilities_fall_into_fairface_bins():
    from facechain_core.age_gender import fairface_bins, spec
    from facechain_core.tags import rules

    upper = spec()["fairface_bin_upper_ages"]
    assert len(upper) == len(rules()["subject"]["age_bins"])
    for age, bin_ in ((0, 0), (2, 0), (3, 1), (9, 1), (10, 2), (29, 3), (30, 4), (49, 5), (50, 6), (69, 7), (80, 8)):
        p = np.zeros(81)
        p[age] = 1.0
        assert int(np.argmax(fairface_bins(p, upper))) == bin_, age
    assert fairface_bins(np.full(81, 1 / 81), upper).sum() == pytest.approx(1.0)
