"""The fast layer: every node class called in this process (ComfyUI imported on the CPU, no server), with
real photos from ../shared/faces and small real inputs, asserting what the adapters themselves do: type
conversion, fusion compositing, the ranking fallback, prompt assembly, mask limits, input checks.

`pytest -m "not host"` runs this layer alone; the server tests (`-m host`) stay for what only a server shows."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ARTIFACTS, FACES, load_pack


@pytest.fixture(scope="module")
def pack():
    ARTIFACTS.mkdir(exist_ok=True)
    return load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return {name.removeprefix("FaceChain"): cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="module")
def core(pack):
    import importlib

    return lambda name: importlib.import_module(f"{pack.__name__}.facechain_core.{name}")


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory):
    import folder_paths

    base = tmp_path_factory.mktemp("input")
    shutil.copytree(FACES / "obama", base / "obama")
    old = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(base))
    yield base
    folder_paths.set_input_directory(old)


def result(out):
    return out["result"] if isinstance(out, dict) else out


def as_image(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).float().div(255.0).unsqueeze(0)


@pytest.fixture(scope="module")
def aligned(nodes, input_dir):
    photos, names, *_ = result(nodes["LoadPhotos"].load("obama", 3))
    crops, faces, report = result(nodes["FaceAlign"].align(photos, [256], [0.4], [0.42], ["embedded"], names))
    return photos, names, crops, faces, report


def test_every_node_has_descriptions_and_tooltips(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert cls.DESCRIPTION and len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), name
        for section in cls.INPUT_TYPES().values():
            for key, spec in section.items():
                if isinstance(spec, tuple) and len(spec) > 1:
                    assert spec[1].get("tooltip"), f"{name}.{key} has no tooltip"


def test_load_photos_and_align_real_photos(aligned, input_dir):
    photos, names, crops, faces, report = aligned
    assert names == sorted(p.name for p in (input_dir / "obama").iterdir())[:3]
    assert all(p.ndim == 4 and p.shape[0] == 1 and p.shape[-1] == 3 for p in photos)
    assert crops.shape == (3, 256, 256, 3) and 0.0 <= crops.min() and crops.max() <= 1.0
    assert [f["name"] for f in faces] == names and all(len(f["keypoints"]) == 5 for f in faces)
    eyes = np.array([f["keypoints"][:2] for f in faces])
    assert np.all(np.abs(eyes[:, 0, 1] - eyes[:, 1, 1]) < 256 * 0.03), "eyes are level in every crop"
    assert report.startswith("FaceAlign: kept 3 of 3 photos") and all(f"{n}: kept" in report for n in names)


def test_align_without_photos_is_a_clear_error(nodes, pack):
    with pytest.raises(pack.nodes.common.FaceChainError, match="no photos"):
        nodes["FaceAlign"].align([], [256], [0.4], [0.42], ["embedded"])


def test_parse_retouch_tag_and_template_on_aligned_crops(nodes, aligned, pack):
    _, _, crops, faces, _ = aligned
    head_white, head, face, hair = result(nodes["HumanParse"].parse(crops, faces, "embedded"))
    assert head_white.shape == crops.shape and head.shape == crops.shape[:3]
    outside = head < 0.01
    assert outside.any() and torch.all(head_white[outside] > 0.98), "outside the head is white"
    assert torch.all(face <= head + 1e-6) and face.sum() > 0.05 * face.numel()
    retouched, skin = result(nodes["SkinRetouch"].retouch(head_white, faces, 1.0, "embedded", face))
    untouched = skin < 0.5
    assert torch.equal(retouched[untouched], head_white[untouched]), "pixels outside the skin mask unchanged"
    assert (retouched - head_white).abs().amax() > 0, "the skin was smoothed"
    tagged = result(nodes["AutoTag"].tag(retouched, faces, "zkx", "a man", "input", "none", 0.35))
    caps, text, prompt, _ = tagged
    assert caps["captions"] == ["zkx, a man"] * 3 and text.splitlines() == caps["captions"]
    assert prompt.startswith("zkx, a man")
    kept, kept_faces, kept_caps, template, template_face, report = result(
        nodes["TemplateFace"].choose(retouched, faces, "embedded", 0.0, caps))
    assert kept.shape[0] == 3 and len(kept_caps["captions"]) == 3
    assert template.shape == (1, 256, 256, 3) and template_face[0]["name"] in report
    sheet = torch.cat([crops, head_white, retouched, head.unsqueeze(-1).expand_as(crops)], dim=2)
    Image.fromarray((sheet.flatten(0, 1).numpy() * 255).astype(np.uint8)).save(ARTIFACTS / "inprocess_pre.png")


def test_retouch_mask_limits(nodes, aligned, pack):
    _, _, crops, faces, _ = aligned
    err = pack.nodes.common.FaceChainError
    with pytest.raises(err, match="2 masks for 3 images"):
        nodes["SkinRetouch"].retouch(crops, faces, 0.6, "embedded", torch.ones(2, 256, 256))
    with pytest.raises(err, match="mask is 128x128 but the images are 256x256"):
        nodes["SkinRetouch"].retouch(crops, faces, 0.6, "embedded", torch.ones(1, 128, 128))
    nothing, skin = result(nodes["SkinRetouch"].retouch(crops, faces, 1.0, "embedded", torch.zeros(256, 256)))
    assert torch.equal(nothing, crops) and skin.max() == 0, "an empty mask (one for all) changes nothing"


def test_fusion_composites_only_inside_its_mask_and_passes_faceless_images(nodes, aligned):
    photos, _, crops, _, _ = aligned
    blank = torch.full((1, 200, 300, 3), 0.5)
    # rose1 takes the 256-px obama crop's eyes and brows; a larger face (biden's) is left unfused: the small
    # template's eyes would come out softer than the photo's (FaceFusion's after-check)
    target = as_image(FACES / "rose_leslie" / "rose1.jpg")
    images, masks, report, detections = result(
        nodes["FaceFusion"].fuse([target, blank], [crops[:1]], [1.0], ["embedded"]))
    assert [i.shape for i in images] == [target.shape, blank.shape] and len(detections) == 2
    fused, mask = images[0][0], masks[0][0]
    assert torch.equal(fused[mask == 0], target[0][mask == 0]), "outside the mask: the input's own values"
    assert (fused[mask > 0] - target[0][mask > 0]).abs().mean() > 0.01, "inside: the template face"
    assert torch.equal(images[1], blank) and masks[1].max() == 0 and len(detections[1]) == 0
    assert report.startswith("FaceFusion: fused the template face into 1 of 2")
    assert "image 2: no face found, left unchanged" in report
    sheet = torch.cat([target[0], fused, mask.unsqueeze(-1).expand_as(fused)], dim=1)
    Image.fromarray((sheet.numpy() * 255).astype(np.uint8)).save(ARTIFACTS / "inprocess_fusion.png")
    zero = result(nodes["FaceFusion"].fuse([target], [crops[:1]], [0.0], ["embedded"]))[0][0]
    assert torch.equal(zero, target), "strength 0 changes nothing"


def test_rank_sorts_by_likeness_and_falls_back_when_no_face(nodes, aligned, pack):
    photos, _, crops, _, _ = aligned
    other = as_image(FACES / "rose_leslie" / sorted(p.name for p in (FACES / "rose_leslie").iterdir())[0])
    imgs, scores, report = result(nodes["RTSRank"].rank([other, crops[1:2], crops[2:3]], [crops[:1]], [2],
                                                         ["embedded"], [0.05], [1.2], ["return unranked"]))[:3]
    assert len(imgs) == 2 and scores == sorted(scores, reverse=True) and scores[0] > 0.3
    assert all(torch.equal(i, c) for i, c in zip(sorted(imgs, key=lambda t: -t.sum().item()),
                                                    sorted([crops[1:2], crops[2:3]], key=lambda t: -t.sum().item())))
    blank = [torch.full((1, 64, 64, 3), v) for v in (0.2, 0.8, 0.5)]
    imgs, scores, report = result(nodes["RTSRank"].rank(blank, [crops[:1]], [2], ["embedded"], [0.05], [1.2],
                                                         ["return unranked"]))[:3]
    assert scores == [0.0, 0.0] and [torch.equal(a, b) for a, b in zip(imgs, blank)] == [True, True]
    assert "unranked" in report
    with pytest.raises(pack.nodes.common.FaceChainError, match="kept no image"):
        nodes["RTSRank"].rank(blank, [crops[:1]], [2], ["embedded"], [0.05], [1.2], ["stop with an error"])


def test_style_prompt_assembly_without_loras(nodes, core):
    cat = core("styles").catalogue()
    style = next(n for n in cat.names() if cat.get(n).prompt_only)
    caps = {"trigger": "zkx", "subject": "a man", "shared_tags": ["short hair", "smile"], "captions": ["zkx"]}
    model, clip, positive, negative, preview = result(nodes["ApplyStyleLoRA"].apply(
        "MODEL", "CLIP", style, "none", -1.0, -1.0, "", "", "", "at dusk", caps))
    assert (model, clip) == ("MODEL", "CLIP"), "no LoRA: model and CLIP pass through"
    assert positive.startswith("zkx, a man, short hair, smile") and "at dusk" in positive
    assert cat.get(style).positive.split(",")[0].strip() in positive
    assert negative and preview.ndim == 4 and preview.shape[-1] == 3
    typed = result(nodes["ApplyStyleLoRA"].apply("M", "C", style, "none", -1.0, -1.0, "qqq", "a woman",
                                                  "red hair", "", caps))[2]
    assert typed.startswith("qqq, a woman, red hair"), "typed fields win over the captions"


def test_train_checks_inputs_before_any_work(nodes, pack, tmp_path, monkeypatch):
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(tmp_path)], {".safetensors"}))
    err = pack.nodes.common.FaceChainError
    args = dict(name="face", trigger="zkx", rank=4, learning_rate=1e-4, samples=8, batch_size=2, flip=True,
                seed=1, train_text_encoder=False, overwrite=False, precision="auto", gradient_checkpointing=False,
                compile=False)
    with pytest.raises(err, match="No training images"):
        nodes["TrainFaceLoRA"].train(None, None, None, torch.zeros(0, 64, 64, 3), **args)
    (tmp_path / "facechain").mkdir()
    (tmp_path / "facechain" / "face.safetensors").write_bytes(b"keep")
    with pytest.raises(err, match="already exists"):
        nodes["TrainFaceLoRA"].train(None, None, None, torch.zeros(2, 64, 64, 3), **args)
    assert (tmp_path / "facechain" / "face.safetensors").read_bytes() == b"keep"
    with pytest.raises(err, match="outside|folder"):
        nodes["TrainFaceLoRA"].train(None, None, None, torch.zeros(2, 64, 64, 3), **{**args, "name": "../x"})


def test_caching_encodes_a_few_images_per_vae_call_with_the_same_latents(pack, core, monkeypatch):
    """The trainer's latents cache: real photos through ComfyUI's VAE of the tiny checkpoint, several 64 px
    images per call (the data file's pixel budget for a CPU) instead of one, each view in order (the photos,
    then their mirrors), the same latents as one image per call."""
    import comfy.sd

    from conftest import tiny_checkpoint

    trainer_mod, settings_mod = core("train.trainer"), core("train.settings")
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=True,
                                                             output_clip=True)[:3]
    backbone = pack.nodes.comfy_backbone.comfy_backbone(model, clip, vae, (64, 64))
    photos = (sorted((FACES / "katy_perry").glob("*.jpg")) + sorted((FACES / "obama").glob("*.jpg")))[:10]
    images = torch.cat([torch.nn.functional.interpolate(as_image(p).permute(0, 3, 1, 2), size=(64, 64),
                                                        mode="area").permute(0, 2, 3, 1) for p in photos])
    calls = []
    encode = backbone.encode_images
    backbone.encode_images = lambda x: (calls.append(x.shape[0]), encode(x))[1]
    steps = []
    trainer = trainer_mod.LoRATrainer(backbone, settings_mod.TrainSettings().with_(samples=4, batch_size=2, flip=True),
                                      progress=lambda done, total, info: steps.append((done, info)))
    trainer.cache_latents(images)
    per_call = core("train.memory").table()["encode_pixels_per_call_cpu"] // (64 * 64)
    assert per_call >= 10 and calls == [10, 10], calls  # the views in turn, each in one call at this size
    assert [d for d, info in steps] == [10, 20] and steps[-1][1] == "encoding images"
    with torch.no_grad():
        one_by_one = torch.cat([encode(images[i:i + 1]) for i in range(10)] +
                               [encode(images[i:i + 1].flip(2)) for i in range(10)]).float()
    assert trainer.latents.shape == one_by_one.shape == (20, 4, 8, 8)
    assert torch.allclose(trainer.latents.cpu(), one_by_one.cpu(), atol=1e-4), \
        float((trainer.latents.cpu() - one_by_one.cpu()).abs().max())
    # a budget of three images: calls of 3, 3, 3 and 1 per view, the same latents in the same order
    three = {**core("train.memory").table(), "encode_pixels_per_call_cpu": 3 * 64 * 64}
    monkeypatch.setattr(trainer_mod, "memory_table", lambda: three)
    calls.clear()
    trainer.cache_latents(images)
    assert calls == [3, 3, 3, 1, 3, 3, 3, 1], calls
    assert torch.allclose(trainer.latents.cpu(), one_by_one.cpu(), atol=1e-4)
