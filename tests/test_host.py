"""The pack loads in a real ComfyUI and the host runs a stock graph on the tiny checkpoint."""

from conftest import TINY_CKPT, png_arrays


def txt2img(steps=4, size=64):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a portrait photo of a man", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 7, "steps": steps, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "tiny_txt2img"}},
    }


def test_pack_nodes_listed_under_facechain_with_tooltips(object_info):
    ours = {k: v for k, v in object_info.items() if v.get("category", "").startswith("FaceChain")}
    assert {"FaceChainFaceAlign", "FaceChainLoadPhotos"} <= set(ours)
    for name, info in ours.items():
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        assert inputs, name
        for iname, spec in inputs.items():
            opts = spec[1] if len(spec) > 1 else {}
            assert opts.get("tooltip"), f"{name}.{iname} has no tooltip"
        assert info.get("description"), name


def test_stock_txt2img_runs_on_tiny_checkpoint(client):
    entry = client.run(txt2img())
    images = png_arrays(client.output_images(entry, "7"))
    assert len(images) == 1
    img = images[0]
    assert img.shape == (64, 64, 3)
    assert img.std() > 1.0, "the decoded image is flat: weights or VAE are broken"
