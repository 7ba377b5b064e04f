"""Captions for the training photos and the prompt fragment FaceChain derives from them.

A caption is ``trigger, subject phrase, tag, tag, ...``. The rules (which tags are dropped, which shared
tags enter the prompt, which subject phrase an age and gender give) are data: ``data/tag_filters.json``.

* Tags come from a WD14 tagger (the ONNX image tagger many ComfyUI users already have) when its
  ``model.onnx`` and ``selected_tags.csv`` are in the model store; without it captions carry no tags.
* The subject phrase follows FaceChain's rule (gender and age summed over all photos): from FairFace when
  its weights are in the model store, else from the embedded gender and age networks (``age_gender.py``,
  offline), or from the node's input when asked or when neither can tell.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from . import data_files, model_store
from .errors import FaceChainError, ModelMissingError
from .face_regions import align_112
from .model_cache import cached
from .onnx_session import onnx_session
from .progress import ProgressFn, no_progress

TAGGERS = ("auto", "none", "wd14")
SUBJECT_SOURCES = ("auto", "input", "fairface", "embedded")


def rules() -> dict:
    return data_files.load("tag_filters.json")


def clean_trigger(trigger: str) -> str:
    t = " ".join((trigger or "").split()).strip(" ,")
    if not t:
        raise FaceChainError("The trigger token is empty. Type a short made-up word (for example 'fcsks') that "
                             "the LoRA will learn as this person's name.")
    if "," in t:
        raise FaceChainError(f"The trigger token '{t}' contains a comma; use one word without commas.")
    return t


def clean_phrase(text: str) -> str:
    return " ".join((text or "").replace(",", " ").split())


# --- tag rules -------------------------------------------------------------------------------------------

def keep_tag(tag: str, r: dict | None = None) -> bool:
    """FaceChain's filter: no eye, nose, lip or body tags, and no gender words (the subject phrase says it)."""
    r = r or rules()
    t = tag.lower()
    return t not in set(r["drop_tags"]) and not any(w in t for w in r["drop_if_contains"])


def filter_tags(tags: list[str], r: dict | None = None) -> list[str]:
    seen, out = set(), []
    for t in tags:
        if t and t not in seen and keep_tag(t, r):
            seen.add(t)
            out.append(t)
    return out


def shared_tags(per_image: list[list[str]], r: dict | None = None) -> list[str]:
    """Tags more than ``shared.fraction`` of the photos carry that name hair, face, mouth, skin or smile,
    most common first: what FaceChain adds to the generation prompt."""
    r = r or rules()
    if not per_image:
        return []
    counts: dict[str, int] = {}
    for tags in per_image:
        for t in set(tags):
            counts[t] = counts.get(t, 0) + 1
    n = len(per_image)
    words = r["shared"]["keywords"]
    keep = [t for t, c in counts.items() if c > r["shared"]["fraction"] * n and any(w in t for w in words)]
    return sorted(keep, key=lambda t: (-counts[t], t))


# --- WD14 tagger -----------------------------------------------------------------------------------------

def _tag_name(name: str) -> str:
    # Danbooru tags use underscores for spaces; short ones such as ^_^ are emoticons and keep them.
    return name if len(name) <= 3 else name.replace("_", " ")


class WD14Tagger:
    """A WD14 tagger: ``model.onnx`` (input [N, S, S, 3] BGR 0-255, output [N, tags] sigmoid scores) and its
    ``selected_tags.csv`` (tag_id, name, category, count) from the model store."""

    def __init__(self):
        model = model_store.model_path("wd14_tagger")
        table = model.with_name("selected_tags.csv")
        if not table.is_file():
            raise ModelMissingError(
                f"The WD14 tagger's tag list is missing: expected file '{table.name}' in '{table.parent}' next to "
                f"'{model.name}'. Fetch both with `{model_store.fetch_command('wd14_tagger')}`, or choose "
                f"tagger 'none'.")
        self.names, self.categories = self._read_table(table)
        self.session = onnx_session(model)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.side = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else 448
        n_out = self.session.get_outputs()[0].shape[-1]
        if isinstance(n_out, int) and n_out != len(self.names):
            raise FaceChainError(f"The WD14 model scores {n_out} tags but '{table}' lists {len(self.names)}; the "
                                 f"two files come from different taggers. Fetch them again together.")

    @staticmethod
    def _read_table(path: Path) -> tuple[list[str], np.ndarray]:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            names = [_tag_name(r["name"]) for r in rows]
            cats = np.array([int(r["category"]) for r in rows])
        except (KeyError, ValueError, csv.Error) as e:
            raise FaceChainError(f"'{path}' is not a WD14 tag list (columns tag_id,name,category,count): {e}. "
                                 f"Fetch it again.") from None
        return names, cats

    def prepare(self, rgb: np.ndarray) -> np.ndarray:
        """Pad to a white square, resize to the model's side, RGB -> BGR float 0-255 (the tagger's training)."""
        h, w = rgb.shape[:2]
        s = max(h, w)
        canvas = np.full((s, s, 3), 255, np.uint8)
        canvas[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = rgb
        interp = cv2.INTER_AREA if s > self.side else cv2.INTER_CUBIC
        img = cv2.resize(canvas, (self.side, self.side), interpolation=interp)
        return img[:, :, ::-1].astype(np.float32)

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self.input_name: self.prepare(rgb)[None]})[0]
        return np.asarray(out, np.float32).reshape(-1)

    def tags(self, rgb: np.ndarray, threshold: float, r: dict | None = None) -> list[str]:
        r = r or rules()
        s = self.scores(rgb)
        keep = np.isin(self.categories, r["tagger"]["keep_categories"]) & (s >= threshold)
        order = [i for i in np.argsort(-s) if keep[i]]
        return filter_tags([self.names[i] for i in order], r)[: r["tagger"]["max_tags"]]


# --- FairFace gender and age -----------------------------------------------------------------------------

class FairFace:
    """FairFace's ResNet-34 (18 outputs: 7 race, 2 gender, 9 age bins) from the ModelScope snapshot's
    ``pytorch_model.pt``, run on the face aligned to the 112-pixel template and resized to 224 as its
    ModelScope pipeline does. Loaded with torchvision directly: the pipeline would fetch a detector."""

    weights_file = "pytorch_model.pt"
    name = "FairFace"

    def __init__(self):
        import torch
        import torchvision

        path = model_store.model_path("fairface") / self.weights_file
        if not path.is_file():
            raise ModelMissingError(f"The FairFace weights are missing: expected file '{path.name}' in "
                                    f"'{path.parent}'. "
                                    f"Fetch them with `{model_store.fetch_command('fairface')}`, or set subject_from "
                                    f"to 'input'.")
        net = torchvision.models.resnet34(weights=None)
        net.fc = torch.nn.Linear(net.fc.in_features, 18)
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise FaceChainError(f"'{path}' is not FairFace's ResNet-34 state dict ({str(e)[:200]}). Fetch it again "
                                 f"with `{model_store.fetch_command('fairface')}`.") from None
        self.net = net.eval()
        self.torch = torch
        self.mean = np.array([0.485, 0.456, 0.406], np.float32)
        self.std = np.array([0.229, 0.224, 0.225], np.float32)

    def predict(self, rgb: np.ndarray, keypoints) -> tuple[np.ndarray, np.ndarray]:
        """(gender probabilities [male, female], age-bin probabilities [9])."""
        face = cv2.resize(align_112(rgb, keypoints), (224, 224), interpolation=cv2.INTER_LINEAR)
        x = ((face.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)[None]
        with self.torch.no_grad():
            out = self.net(self.torch.from_numpy(np.ascontiguousarray(x)))[0].float()
        gender = self.torch.softmax(out[7:9], 0).numpy()
        age = self.torch.softmax(out[9:18], 0).numpy()
        return gender, age


def subject_phrase(gender: np.ndarray, age: np.ndarray, r: dict | None = None) -> str:
    """FaceChain's phrase from gender and age probabilities summed over the photos."""
    s = (r or rules())["subject"]
    g = s["genders"][int(np.argmax(gender))]
    a = int(np.argmax(age))
    group = "child" if a < s["child_below_bin"] else "mature" if a >= s["mature_from_bin"] else "adult"
    return s["phrases"][group][g]


def get_tagger(choice: str) -> WD14Tagger | None:
    if choice not in TAGGERS:
        raise FaceChainError(f"Unknown tagger '{choice}'; choose one of {', '.join(TAGGERS)}.")
    if choice == "none" or (choice == "auto" and not model_store.is_present("wd14_tagger")):
        return None
    model = model_store.model_path("wd14_tagger")
    table = model.with_name("selected_tags.csv")
    return cached(("tagger", "wd14"), WD14Tagger, [model, table])


def get_fairface(choice: str):
    """The gender/age model the choice names: FairFace, the embedded networks, or None (the input phrase).
    'auto' takes FairFace when installed, else the embedded networks when their files are present."""
    if choice not in SUBJECT_SOURCES:
        raise FaceChainError(f"Unknown subject source '{choice}'; choose one of {', '.join(SUBJECT_SOURCES)}.")
    if choice == "input":
        return None
    if choice == "embedded" or (choice == "auto" and not model_store.is_present("fairface")):
        if choice == "auto" and not embedded_files_present():
            return None
        from .age_gender import EmbeddedAgeGender

        files = [model_store.embedded_path(n) for n in ("gender", "age")]
        return cached(("subject", "embedded"), EmbeddedAgeGender, files)
    path = model_store.model_path("fairface") / FairFace.weights_file
    return cached(("subject", "fairface"), FairFace, [path])


def embedded_files_present() -> bool:
    from . import embedded

    return all(embedded.is_present(n) for n in ("gender", "age"))


# --- the caption set -------------------------------------------------------------------------------------

@dataclass
class CaptionSet:
    trigger: str
    subject: str
    tags: list[list[str]]  # per photo, after the filters
    names: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def captions(self) -> list[str]:
        return [", ".join([self.trigger, self.subject, *t] if self.subject else [self.trigger, *t]) for t in self.tags]

    @property
    def shared_tags(self) -> list[str]:
        return shared_tags(self.tags)

    @property
    def prompt(self) -> str:
        return ", ".join(p for p in [self.trigger, self.subject, *self.shared_tags] if p)

    def to_dict(self) -> dict:
        """The FACECHAIN_CAPTIONS value that AutoTag passes downstream."""
        return {"trigger": self.trigger, "subject": self.subject, "captions": self.captions,
                "shared_tags": self.shared_tags, "prompt": self.prompt, "tags": [list(t) for t in self.tags],
                "names": list(self.names)}

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionSet":
        try:
            return cls(d["trigger"], d["subject"], [list(t) for t in d["tags"]], list(d["names"]))
        except (KeyError, TypeError):
            raise FaceChainError("The captions input is not a FACECHAIN_CAPTIONS value; connect AutoTag's captions "
                                 "output.") from None

    def subset(self, keep: list[int]) -> "CaptionSet":
        return CaptionSet(self.trigger, self.subject, [self.tags[i] for i in keep], [self.names[i] for i in keep],
                          list(self.notes))

    def report(self) -> str:
        lines = [f"AutoTag: {len(self.tags)} captions; prompt: {self.prompt}", *self.notes]
        lines += [f"- {n}: {c}" for n, c in zip(self.names, self.captions)]
        return "\n".join(lines)


def caption_photos(images: list[np.ndarray], keypoints: list, trigger: str, subject: str = "a person",
                   subject_from: str = "auto", tagger: str = "auto", threshold: float | None = None,
                   names: list[str] | None = None, progress: ProgressFn | None = None) -> CaptionSet:
    if not images:
        raise FaceChainError("AutoTag got no images. Connect the crops of FaceAlign, HumanParse or SkinRetouch.")
    if len(keypoints) != len(images):
        raise FaceChainError(f"AutoTag got {len(images)} images but face data for {len(keypoints)}; connect the "
                             f"faces output that belongs to these images.")
    r = rules()
    trigger = clean_trigger(trigger)
    names = list(names) if names and len(names) == len(images) else [f"photo {i + 1}" for i in range(len(images))]
    threshold = r["tagger"]["general_threshold"] if threshold is None else float(threshold)
    progress = progress or no_progress
    wd14 = get_tagger(tagger)
    judge = get_fairface(subject_from)
    per_image, gender, age = [], np.zeros(2), np.zeros(len(r["subject"]["age_bins"]))
    for i, rgb in enumerate(images):
        progress(i, len(images), names[i])
        per_image.append(wd14.tags(rgb, threshold, r) if wd14 else [])
        if isinstance(judge, FairFace):
            g, a = judge.predict(rgb, keypoints[i])
            gender, age = gender + g, age + a
    if judge is not None and not isinstance(judge, FairFace):  # the small embedded nets run as one batch
        g, a = judge.predict_many(images, keypoints)
        gender, age = g.sum(axis=0), a.sum(axis=0)
    progress(len(images), len(images), None)
    phrase, notes = _subject(judge, gender, age, len(images), subject, r)
    if not wd14:
        why = "tagger set to 'none'" if tagger == "none" else "no WD14 tagger installed"
        notes.append(f"no descriptive tags ({why}); captions are trigger + subject only. Descriptive tags come from "
                     f"the WD14 tagger: `{model_store.fetch_command('wd14_tagger')}`.")
    return CaptionSet(trigger, phrase, per_image, names, notes)


def _subject(judge, gender: np.ndarray, age: np.ndarray, n: int, subject: str, r: dict) -> tuple[str, list[str]]:
    """The subject phrase and the report lines that say where it came from."""
    fairface_hint = "" if model_store.is_present("fairface") else \
        f" FairFace (learned) would choose it from the photos: `{model_store.fetch_command('fairface')}`."
    if judge is None:
        return clean_phrase(subject), [f"subject phrase '{clean_phrase(subject)}' from the node input.{fairface_hint}"]
    share = gender / n
    bins = r["subject"]["age_bins"]
    measured = (f"male {share[0]:.2f}, female {share[1]:.2f}; most likely age {bins[int(np.argmax(age))]}")
    if isinstance(judge, FairFace):
        phrase = subject_phrase(gender, age, r)
        return phrase, [f"subject phrase '{phrase}' from FairFace over {n} photos ({measured})."]
    from .age_gender import spec

    if share.max() < spec()["min_gender_share"]:
        phrase = clean_phrase(subject)
        why = (f"subject phrase '{phrase}' from the node input: {judge.name} could not tell the gender reliably "
               f"over {n} photos ({measured}).{fairface_hint}")
        return phrase, [why]
    phrase = subject_phrase(gender, age, r)
    return phrase, [f"subject phrase '{phrase}' from {judge.name} over {n} photos ({measured}), offline."
                    f"{fairface_hint}"]
