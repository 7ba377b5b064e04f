"""The whole FaceChain pipeline for one person without ComfyUI: photos in, ranked portraits and a manifest out.

The steps and every setting come from the bundled API workflow
``workflows/api/facechain_train_generate_api.json`` (what ComfyUI runs for the same job, its values the nodes'
defaults), read by node type; nothing here repeats a default. The steps call the same library functions the
nodes call: FaceAlign -> HumanParse -> SkinRetouch -> AutoTag -> Template Face -> TrainFaceLoRA ->
ApplyStyleLoRA (face + style LoRA, prompts) -> sampling -> FaceFusion -> RTSRank.

    python -m facechain_core portraits --photos DIR --checkpoint FILE --style NAME --out DIR

Output in --out: ``portrait_01.png`` ... (best first), ``template.png``, ``face.safetensors`` and
``manifest.json`` (status, timings per stage, scores, reports, errors), each written to a temporary name first.
"""

from __future__ import annotations

import copy
import json
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import FaceChainError
from .files import write_atomic

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "workflows" / "api" / "facechain_train_generate_api.json"
MANIFEST = "manifest.json"
STAGES = ("preprocess", "load_model", "train", "generate", "fuse", "rank")


@lru_cache(maxsize=1)
def workflow_settings() -> dict[str, dict]:
    """node type -> its widget values in the bundled train-and-generate workflow (links left out)."""
    try:
        prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FaceChainError(f"The pipeline description {WORKFLOW} could not be read ({e}); restore it from "
                             f"the pack (git checkout workflows/).") from None
    out: dict[str, dict] = {}
    for node in prompt.values():
        widgets = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        out.setdefault(node["class_type"], widgets)
    return out


def settings(overrides: dict[str, object] | None = None) -> dict[str, dict]:
    """The workflow's settings with ``{"NodeType.input": value}`` overrides (an unknown name is an error)."""
    spec = copy.deepcopy(workflow_settings())
    for key, value in (overrides or {}).items():
        node, _, field = key.partition(".")
        if node not in spec or field not in spec[node]:
            raise FaceChainError(f"Unknown pipeline setting '{key}': use NodeType.input from {WORKFLOW.name}, "
                                 f"e.g. KSampler.steps or FaceChainTrainFaceLoRA.samples.")
        spec[node][field] = value
    return spec


@dataclass
class TrainingSet:
    crops: list  # retouched, kept crops (HxWx3 uint8), as TrainFaceLoRA gets them
    faces: list  # face dicts of the kept crops
    captions: object  # tags.CaptionSet of the kept crops
    template: np.ndarray  # Template Face's best crop
    reports: dict


def preprocess(photos_dir: str | os.PathLike, spec: dict) -> TrainingSet:
    """Load Face Photos -> FaceAlign -> HumanParse -> SkinRetouch -> AutoTag -> Template Face, as wired in
    the workflow (SkinRetouch works on HumanParse's head-on-white crops; keypoints come from FaceAlign)."""
    from .align import AlignSettings, align_photos
    from .images import list_photos, load_photo
    from .parse import parse_crops
    from .quality import assess_faces
    from .retouch import retouch_crops
    from .tags import caption_photos

    load, fa = spec["FaceChainLoadPhotos"], spec["FaceChainFaceAlign"]
    files = list_photos(photos_dir)[: int(load["max_photos"])]
    photos = [(p.name, load_photo(p)) for p in files]
    aligned = align_photos(photos, AlignSettings(size=fa["size"], face_fraction=fa["face_fraction"],
                                                 centre_from_top=fa["face_centre"], backend=fa["detector"]))
    faces = [a.to_dict() for a in aligned.aligned]
    names = [f.get("name") or f"crop {i + 1}" for i, f in enumerate(faces)]
    keypoints = [f["keypoints"] for f in faces]
    meshes = [f.get("mesh") for f in faces]  # FaceAlign's face mesh of each crop, when it made one
    hp = spec["FaceChainHumanParse"]
    extra = {"long_hair": hp["long_hair"]} if "long_hair" in hp else {}  # else the library's (= the node's) default
    parts = parse_crops([a.image for a in aligned.aligned], keypoints, hp["backend"], names, meshes=meshes, **extra)
    sr = spec["FaceChainSkinRetouch"]
    retouched = [o[0] for o in retouch_crops([p.image for p in parts], keypoints, sr["strength"], sr["backend"],
                                             None, names, meshes=meshes)]
    at = spec["FaceChainAutoTag"]
    captions = caption_photos(retouched, keypoints, at["trigger"], at["subject"], at["subject_from"], at["tagger"],
                              at["threshold"], names)
    tf = spec["FaceChainTemplateFace"]
    quality = assess_faces(retouched, faces, tf["scorer"], tf["min_quality"])
    return TrainingSet([retouched[i] for i in quality.kept], [faces[i] for i in quality.kept],
                       captions.subset(quality.kept), retouched[quality.template],
                       {"align": aligned.report_text(), "tags": captions.report(),
                        "quality": quality.report_text(tf["scorer"])})


def style_loras(plan, lora_dirs: list[str]) -> list[tuple[str, Path, float]]:
    """The style's LoRA when the style has one (a missing file is an error saying how to get it)."""
    from . import styles

    if plan.style.style_lora is None or plan.style_weight == 0.0:
        return []
    return [("style LoRA", styles.find_style_lora(plan.style, lora_dirs), plan.style_weight)]


def default_lora_dirs() -> list[str]:
    """Where style LoRAs are looked for: $FACECHAIN_LORAS (os.pathsep-separated), else ./models/loras."""
    env = os.environ.get("FACECHAIN_LORAS")
    return env.split(os.pathsep) if env else [str(Path("models") / "loras")]


class Run:
    """One person's run: the manifest being filled, the current stage and its timing."""

    def __init__(self, out: Path, person: str, log=print):
        self.out, self.log = out, log
        self.manifest = {"person": person, "status": "running", "stage": None, "timings": {}, "error": None,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": os.uname().nodename}

    @contextmanager
    def stage(self, name: str):
        self.manifest["stage"] = name
        self.log(f"[{self.manifest['person']}] {name} ...")
        t0 = time.perf_counter()
        try:
            yield
        finally:  # a failed stage keeps its time too
            self.manifest["timings"][name] = round(time.perf_counter() - t0, 3)

    def save(self) -> dict:
        write_json_atomic(self.out / MANIFEST, self.manifest)
        return self.manifest


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8"))


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def make_portraits(photos: str | os.PathLike, checkpoint: str | os.PathLike, style: str, out: str | os.PathLike,
                   overrides: dict | None = None, device: str = "auto", lora_dirs: list[str] | None = None,
                   log=print) -> dict:
    """Run the pipeline for one person; always writes ``out/manifest.json`` and returns it.

    A failure (bad photos, no face, a missing style LoRA, anything raised) is recorded in the manifest with
    the stage it happened in: status "failed", the error text, and a traceback for unexpected errors."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, Path(photos).name, log)
    t0 = time.perf_counter()
    try:
        _pipeline(run, Path(photos), Path(checkpoint), style, settings(overrides), device,
                  default_lora_dirs() if lora_dirs is None else lora_dirs)
        run.manifest.update(status="done", stage=None)
    except FaceChainError as e:
        run.manifest.update(status="failed", error=str(e))
    except Exception as e:  # recorded, not raised: one person's failure must not stop a batch
        run.manifest.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    except KeyboardInterrupt:
        run.manifest.update(status="cancelled", error="cancelled (Ctrl-C)")
        run.save()
        raise
    run.manifest["timings"]["total"] = round(time.perf_counter() - t0, 3)
    return run.save()


def _pipeline(run: Run, photos: Path, checkpoint: Path, style: str, spec: dict, device: str, lora_dirs: list[str]):
    from . import standalone, styles
    from .images import save_png_atomic
    from .train import TrainSettings, resolve_captions

    m = run.manifest
    plan0 = styles.plan_style(styles.catalogue(), style, None, *_weights(spec))
    extra = style_loras(plan0, lora_dirs)  # before any work: a missing style LoRA fails in a second
    with run.stage("preprocess"):
        ts = preprocess(photos, spec)
    m.update(photos_kept=len(ts.crops), reports=ts.reports, style=plan0.style.name)
    with run.stage("load_model"):
        tr = spec["FaceChainTrainFaceLoRA"]
        dev, dtype = standalone.choose_device(device, tr["precision"])
        models = standalone.load_models(checkpoint, dev, dtype)
    m.update(device=str(dev), dtype=str(dtype).replace("torch.", ""), checkpoint=str(checkpoint))
    with run.stage("train"):
        captions, trigger = resolve_captions(len(ts.crops), ts.captions.to_dict(), "", tr["trigger"])
        ts_settings = TrainSettings().with_(**{k: tr[k] for k in (
            "rank", "learning_rate", "samples", "batch_size", "flip", "seed", "train_text_encoder", "precision",
            "gradient_checkpointing", "compile")}).validate()
        lora_path = run.out / "face.safetensors"
        result = standalone.train_and_save(models, np.stack(ts.crops), captions, trigger, ts_settings, lora_path,
                                           [f.get("name", "") for f in ts.faces], overwrite=True)
        m["train"] = {"steps": result.steps, "samples": result.samples, "summary": result.summary(),
                      "lora": lora_path.name, "trigger": trigger}
    plan = styles.plan_style(styles.catalogue(), style, ts.captions.to_dict(), *_weights(spec))
    ks, lat = spec["KSampler"], spec["EmptyLatentImage"]
    with run.stage("generate"):
        face = standalone.read_lora(lora_path, "face LoRA")
        loras = [("face LoRA", face, plan.face_weight)] if plan.face_weight else []
        loras += [(label, standalone.read_lora(p, label), w) for label, p, w in extra]
        with standalone.applied_loras(models, loras) as lora_lines:
            images = standalone.generate(models, plan.positive, plan.negative, int(lat["width"]), int(lat["height"]),
                                         int(lat["batch_size"]), int(ks["steps"]), float(ks["cfg"]), int(ks["seed"]),
                                         ks["sampler_name"], ks["scheduler"])
    m["generate"] = {"positive": plan.positive, "negative": plan.negative, "loras": lora_lines,
                     "size": [int(lat["width"]), int(lat["height"])], "count": len(images), "steps": int(ks["steps"]),
                     "cfg": float(ks["cfg"]), "sampler": f"{ks['sampler_name']}/{ks['scheduler']}"}
    ranked = _fuse_and_rank(run, images, ts.template, rank_references(ts), spec)
    save_png_atomic(ts.template, run.out / "template.png")
    m["portraits"] = []
    for n, (i, score, alike) in enumerate(ranked, start=1):
        name = f"portrait_{n:02d}.png"
        save_png_atomic(ranked.images[i], run.out / name)
        m["portraits"].append({"file": name, "rank": n, "image": i, "score": round(score, 4),
                               "likeness_percent": round(alike, 1)})
    m["licences"] = licence_line(spec)
    scores = [p["score"] for p in m["portraits"]] if ranked.by_identity else []
    # cosine similarity to the template face (SFace by default); null when no portrait showed a face to compare
    m["likeness"] = {"best": max(scores, default=None), "mean": round(float(np.mean(scores)), 4) if scores else None,
                     "ranked": bool(ranked.by_identity)}


def rank_references(ts: TrainingSet) -> list:
    """What the workflow wires into RTSRank's reference: Template Face's kept crops (output 0, their mean
    embedding) or its template face (output 3)."""
    prompt = json.loads(WORKFLOW.read_text(encoding="utf-8"))
    link = next(n["inputs"]["reference"] for n in prompt.values() if n["class_type"] == "FaceChainRTSRank")
    return list(ts.crops) if prompt[link[0]]["class_type"] == "FaceChainTemplateFace" and link[1] == 0 \
        else [ts.template]


def licence_line(spec: dict) -> str:
    """The models this run used and their licences, as the nodes' reports name them."""
    from . import licences

    return licences.line(align=spec["FaceChainFaceAlign"]["detector"], parse=spec["FaceChainHumanParse"]["backend"],
                         retouch=spec["FaceChainSkinRetouch"]["backend"], tagger=spec["FaceChainAutoTag"]["tagger"],
                         subject=spec["FaceChainAutoTag"]["subject_from"],
                         quality=spec["FaceChainTemplateFace"]["scorer"], train="lora",
                         fusion=spec["FaceChainFaceFusion"]["backend"], rank=spec["FaceChainRTSRank"]["backend"])


def _weights(spec: dict) -> tuple[float, float]:
    st = spec["FaceChainApplyStyleLoRA"]
    return float(st["face_weight"]), float(st["style_weight"])


class _Ranked(list):
    """[(image index, score, likeness %)] best first, with the fused images and whether identity decided it."""
    images: list
    by_identity: bool


def _fuse_and_rank(run: Run, images: list, template: np.ndarray, references: list, spec: dict) -> _Ranked:
    from . import licences
    from .fusion import FusionSettings, fuse_images
    from .rank import RankSettings, order_or_unranked, rank_images

    ff, rr = spec["FaceChainFaceFusion"], spec["FaceChainRTSRank"]
    with run.stage("fuse"):
        fused = fuse_images(images, template, FusionSettings(strength=float(ff["strength"]), backend=ff["backend"]),
                            references=references)  # the workflow feeds both the kept crops (Template Face 0)
    with run.stage("rank"):
        settings = RankSettings(top_n=int(rr["top_n"]), backend=rr["backend"],
                                min_face_fraction=float(rr["min_face_fraction"]),
                                max_face_fraction=float(rr["max_face_fraction"]))
        if "accept_likeness" in rr:
            settings.accept_likeness = float(rr["accept_likeness"])
        fused_images = [f.image for f in fused.images]
        result = rank_images(fused_images, references, settings, [f"image {i + 1}" for i in range(len(images))],
                             detections=fused.detections())
        order, scores, likeness, report = order_or_unranked(result, len(images), settings.top_n,
                                                            rr["if_none_kept"], licences.line(rank=rr["backend"]))
    run.manifest["reports"].update(fusion=fused.report_text(), rank=report)
    ranked = _Ranked(zip(order, scores, likeness))
    ranked.images, ranked.by_identity = fused_images, bool(result.order)
    return ranked
