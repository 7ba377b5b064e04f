"""TrainFaceLoRA through the real host on the tiny checkpoint: a graph trains on the obama photos, the kohya
file appears in models/loras/facechain, stock LoraLoader with that file samples exactly what the node's
MODEL samples (and not what the base samples), the base MODEL is unchanged, Cancel leaves no file, and bad
input gets a clear node error."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from safetensors import safe_open

from conftest import TINY_CKPT, expect_node_error

TRAIN = "FaceChainTrainFaceLoRA"


def train_inputs(name, **over):
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["3", 0], "name": name,
              "trigger": "fcsks", "rank": 4, "learning_rate": 1e-3, "samples": 16, "batch_size": 4, "flip": True,
              "seed": 42, "train_text_encoder": False, "overwrite": False, "precision": "auto",
              "gradient_checkpointing": False, "compile": False}
    inputs.update(over)
    return inputs


def train_graph(name, size=128, **over):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
        "2": {"class_type": "FaceChainLoadPhotos", "inputs": {"folder": "obama", "max_photos": 4}},
        "3": {"class_type": "FaceChainFaceAlign", "inputs": {"photos": ["2", 0], "names": ["2", 1], "size": size,
                                                              "face_fraction": 0.4, "face_centre": 0.42,
                                                              "detector": "embedded"}},
        "4": {"class_type": TRAIN, "inputs": train_inputs(name, **over)},
    }


def sample_nodes(prefix, model, clip, out_id, advanced=False, seed=7):
    """Nodes that sample a 64x64 latent from ``model`` and save it (SaveLatent), ids prefixed."""
    p = prefix
    nodes = {
        f"{p}1": {"class_type": "CLIPTextEncode", "inputs": {"text": "fcsks, a portrait photo", "clip": clip}},
        f"{p}2": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": clip}},
        f"{p}3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    }
    common = {"model": model, "positive": [f"{p}1", 0], "negative": [f"{p}2", 0], "latent_image": [f"{p}3", 0],
              "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
    if advanced:  # the same computation as KSampler, but a different node, so the host's cache can't answer
        nodes[f"{p}4"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **common, "add_noise": "enable", "noise_seed": seed, "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}}
    else:
        nodes[f"{p}4"] = {"class_type": "KSampler", "inputs": {**common, "seed": seed, "denoise": 1.0}}
    nodes[out_id] = {"class_type": "SaveLatent", "inputs": {"samples": [f"{p}4", 0], "filename_prefix": f"t_{p}"}}
    return nodes


def fetch_latent(client, entry, node_id) -> np.ndarray:
    import io

    from safetensors.numpy import load

    files = entry["outputs"][node_id]["latents"]
    blob = client.view(files[0]["filename"], files[0].get("subfolder", ""), files[0].get("type", "output"))
    data = load(io.BytesIO(blob).getvalue())
    return data["latent_tensor"].astype(np.float64)


def tiny_unet_fingerprint() -> str:
    """The base-model hash the trainer should record for the tiny checkpoint, from the file itself."""
    from safetensors.torch import load_file

    from facechain_core.train import weights_fingerprint

    prefix = "model.diffusion_model."
    sd = load_file(str(TINY_CKPT))
    return weights_fingerprint([(k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix)])


def lora_dir(comfy_base):
    return comfy_base / "models" / "loras" / "facechain"


def leftovers(comfy_base):
    d = lora_dir(comfy_base)
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".tmp")) if d.is_dir() else []


def test_train_node_listed_with_sockets(object_info):
    info = object_info[TRAIN]
    assert info["output"] == ["MODEL", "CLIP", "STRING", "STRING"]
    assert info["input"]["optional"]["captions"][0] == "FACECHAIN_CAPTIONS"
    memory = info["input"]["optional"]["memory"]  # optional and last: old workflows keep working
    assert memory[0] == ["auto (fit the card)", "as set"] and memory[1]["default"] == "auto (fit the card)"
    required = info["input"]["required"]
    for k in ("model", "clip", "vae", "images", "name", "rank", "learning_rate", "samples", "batch_size", "flip",
              "seed", "train_text_encoder", "overwrite", "precision", "gradient_checkpointing", "compile"):
        assert k in required, k


def test_graph_trains_saves_kohya_lora_and_lora_loader_matches(client, comfy_base):
    # the base model's sample before any training, for the "base unchanged" check
    before = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
              **sample_nodes("b", ["1", 0], ["1", 1], "b9")}
    base_before = fetch_latent(client, client.run(before), "b9")

    entry = client.run(train_graph("obama_test"))
    report = entry["outputs"]["4"]["text"][0]
    assert "facechain/obama_test.safetensors" in report
    assert "no GPU: no memory sizing" in report  # the memory input left at auto: sizing skipped on the CPU
    path = lora_dir(comfy_base) / "obama_test.safetensors"
    assert path.is_file()
    assert leftovers(comfy_base) == []

    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        down = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight")
    # kohya names: diffusers-style blocks for SD1.5, every attention projection, alpha with each
    layers = {k.rsplit(".lora_down.weight", 1)[0] for k in keys if k.endswith(".lora_down.weight")}
    assert len(layers) == 4 * 2 * 4  # tiny UNet: 4 transformers (1 down, mid, 2 up) x 2 attentions x 4
    for layer in layers:
        assert layer.startswith("lora_unet_")
        assert {f"{layer}.lora_up.weight", f"{layer}.alpha"} <= keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0" in layers
    assert "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k" in layers
    assert down.shape == (4, 320)
    assert meta["facechain_trigger"] == "fcsks"
    captions = json.loads(meta["facechain_captions"])
    assert captions == ["fcsks"] * len(captions) and len(captions) >= 3
    assert meta["ss_network_dim"] == "4" and meta["facechain_rank"] == "4"
    assert meta["facechain_steps"] == "4" and meta["ss_steps"] == "4"
    assert meta["facechain_base_model_hash"] == tiny_unet_fingerprint()

    # one prompt: the node's MODEL, stock LoraLoader with the saved file, and the base model, same seed
    compare = train_graph("obama_test")
    compare["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                            "lora_name": "facechain/obama_test.safetensors",
                                                            "strength_model": 1.0, "strength_clip": 1.0}}
    compare.update(sample_nodes("n", ["4", 0], ["4", 1], "n9"))
    compare.update(sample_nodes("l", ["10", 0], ["10", 1], "l9"))
    compare.update(sample_nodes("a", ["1", 0], ["1", 1], "a9", advanced=True))
    entry = client.run(compare)
    node_out = fetch_latent(client, entry, "n9")
    loader_out = fetch_latent(client, entry, "l9")
    base_after = fetch_latent(client, entry, "a9")
    assert np.abs(node_out - loader_out).max() <= 1e-6, "LoraLoader with the file differs from the node's MODEL"
    assert np.abs(node_out - base_after).max() > 1e-3, "the trained LoRA does not change the UNet's output"
    assert np.array_equal(base_after, base_before), "training changed the host's base MODEL"


def test_text_encoder_training_saves_te_keys_and_clip_matches_lora_loader(client, comfy_base):
    graph = train_graph("obama_te", size=64, samples=8, train_text_encoder=True, learning_rate=3e-3)
    graph.update(sample_nodes("n", ["4", 0], ["4", 1], "n9"))
    entry = client.run(graph)
    path = lora_dir(comfy_base) / "obama_te.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    te = {k for k in keys if k.startswith("lora_te_text_model_encoder_layers_")}
    assert len(te) == 12 * 4 * 3  # 12 layers x (q, k, v, out) x (down, up, alpha)
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_up.weight" in te
    assert meta["ss_network_train_unet_only"] == "False"
    node_out = fetch_latent(client, entry, "n9")
    compare = {"1": graph["1"],
               "10": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": "facechain/obama_te.safetensors",
                                                             "strength_model": 1.0, "strength_clip": 1.0}},
               "11": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": "facechain/obama_te.safetensors",
                                                             "strength_model": 1.0, "strength_clip": 0.0}}}
    compare.update(sample_nodes("l", ["10", 0], ["10", 1], "l9"))
    compare.update(sample_nodes("u", ["11", 0], ["11", 1], "u9"))
    entry = client.run(compare)
    assert np.abs(node_out - fetch_latent(client, entry, "l9")).max() <= 1e-6
    # the text encoder's part of the LoRA matters: without it the sample differs
    assert np.abs(node_out - fetch_latent(client, entry, "u9")).max() > 1e-4


def test_existing_name_is_not_overwritten_unless_asked(client, comfy_base):
    folder = lora_dir(comfy_base)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "keep_me.safetensors"
    path.write_bytes(b"not a lora")
    expect_node_error(client, train_graph("keep_me", size=64, samples=4), "already exists", "overwrite")
    assert path.read_bytes() == b"not a lora"
    client.run(train_graph("keep_me", size=64, samples=4, overwrite=True))
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["facechain_trigger"] == "fcsks"
    assert leftovers(comfy_base) == []


@pytest.mark.parametrize("over, words", [
    ({"name": "../../x"}, ("LoRA name", "not allowed")),
    ({"name": "sub/x"}, ("LoRA name", "no folders")),
    ({"name": "  "}, ("No LoRA name",)),
    ({"caption_text": "fcsks, smiling\nfcsks, serious"}, ("2 captions", "images")),
    ({"trigger": "", "caption_text": ""}, ("trigger token",)),
])
def test_bad_input_gives_clear_node_error(client, comfy_base, over, words):
    over = {"name": "bad_input", **over}
    expect_node_error(client, train_graph(over.pop("name"), size=64, samples=4, **over), *words)
    assert not (lora_dir(comfy_base) / "x.safetensors").exists()
    assert not (comfy_base / "models" / "x.safetensors").exists()
    assert not (lora_dir(comfy_base) / "bad_input.safetensors").exists()


def test_unsupported_model_type_and_image_size(client):
    vpred = train_graph("vpred", size=64, samples=4)
    vpred["5"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "v_prediction",
                                                                   "zsnr": False}}
    vpred["4"]["inputs"]["model"] = ["5", 0]
    expect_node_error(client, vpred, "epsilon-prediction", "SD1.5")
    odd = train_graph("odd", samples=4)
    odd["6"] = {"class_type": "EmptyImage", "inputs": {"width": 100, "height": 100, "batch_size": 2, "color": 0}}
    odd["4"]["inputs"]["images"] = ["6", 0]
    expect_node_error(client, odd, "100x100", "multiples of 8")


def test_cancel_stops_training_leaves_no_file_and_host_answers(client, comfy_base):
    import websocket

    ws = websocket.create_connection(client.url.replace("http", "ws") + f"/ws?clientId={client.client_id}",
                                     timeout=120)
    try:
        long_run = train_graph("cancelled", size=64, samples=100000, batch_size=1)
        prompt_id = client.queue(long_run)
        # wait until the trainer reports training steps (past the image encoding)
        deadline = time.time() + 240
        while time.time() < deadline:
            msg = ws.recv()
            if isinstance(msg, str):
                m = json.loads(msg)
                if m["type"] == "progress" and m["data"].get("node") == "4" and m["data"]["value"] > 20:
                    break
        else:
            pytest.fail("training never started")
        t0 = time.time()
        client.interrupt()
        while True:
            msg = ws.recv()
            if isinstance(msg, str):
                m = json.loads(msg)
                if m["type"] in ("execution_interrupted", "execution_error", "execution_success") and \
                        m["data"].get("prompt_id") == prompt_id:
                    break
        stopped_in = time.time() - t0
    finally:
        ws.close()
    assert m["type"] == "execution_interrupted", m
    assert stopped_in < 20, f"Cancel took {stopped_in:.1f} s"
    assert not (lora_dir(comfy_base) / "cancelled.safetensors").exists()
    assert leftovers(comfy_base) == []
    # the host answers the next prompt, and its base model works
    entry = client.run({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": TINY_CKPT.name}},
                        **sample_nodes("c", ["1", 0], ["1", 1], "c9", seed=11)})
    assert np.isfinite(fetch_latent(client, entry, "c9")).all()
