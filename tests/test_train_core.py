"""The trainer's library parts without a server: kohya names against ComfyUI's own UNet name map (SD1.5,
SDXL, the tiny UNet), captions, names that must not escape the LoRA folder, settings, and no-image input."""

from __future__ import annotations

import pytest
import torch

from conftest import import_comfy_in_process
from facechain_core.errors import FaceChainError
from facechain_core.lora_format import diffusers_to_ldm, kohya_state_dict, ldm_to_diffusers
from facechain_core.train import TrainSettings, lora_file, resolve_captions, save_lora

SD15 = {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1}
SDXL = {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10}
TINY = {"num_res_blocks": [1], "channel_mult": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
        "transformer_depth_middle": 1}


def comfy_unet_to_diffusers(config):
    """ComfyUI's own map (diffusers name -> original name)."""
    comfy = import_comfy_in_process()
    return comfy.utils.unet_to_diffusers(dict(config))


@pytest.mark.parametrize("config", [SD15, SDXL, TINY], ids=["sd15", "sdxl", "tiny"])
def test_unet_names_match_comfyui_map(config):
    mapping = comfy_unet_to_diffusers(config)
    checked = 0
    for diffusers_name, ldm_name in mapping.items():
        if ".attn1.to_q." not in diffusers_name and ".attn2.to_out.0." not in diffusers_name:
            continue
        d, l = diffusers_name.rsplit(".", 1)[0], ldm_name.rsplit(".", 1)[0]
        assert ldm_to_diffusers(l, config["num_res_blocks"]) == d
        assert diffusers_to_ldm(d, config["num_res_blocks"]) == l
        checked += 1
    assert checked >= 4


def test_kohya_keys_and_text_encoder_prefix():
    down, up = torch.zeros(4, 320), torch.zeros(320, 4)
    sd = kohya_state_dict({"output_blocks.11.1.transformer_blocks.0.attn1.to_q": (down, up, 4.0)},
                          [{"encoder.layers.0.self_attn.q_proj": (torch.zeros(4, 768), torch.zeros(768, 4), 4.0)}],
                          "sd15", "ldm", [2, 2, 2, 2])
    assert set(sd) == {
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.lora_up.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
    }
    xl = kohya_state_dict({"input_blocks.4.1.transformer_blocks.0.attn1.to_q": (down, up, 4.0)}, [], "sdxl", "ldm",
                          [2, 2, 2])
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in xl


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "a\\\\b", ".hidden", "", "   ", "x" * 200, "a:b*"])
def test_names_cannot_escape_the_lora_folder(tmp_path, name):
    with pytest.raises(FaceChainError):
        lora_file(tmp_path, name)


def test_plain_names_land_in_the_folder(tmp_path):
    assert lora_file(tmp_path, "obama 2") == (tmp_path / "obama 2.safetensors").resolve()
    assert lora_file(tmp_path, "face.safetensors").name == "face.safetensors"


def test_save_is_atomic_and_never_overwrites(tmp_path):
    path = lora_file(tmp_path, "face")
    state = {"a.alpha": torch.tensor(1.0)}
    save_lora(path, state, {"k": "v"}, overwrite=False)
    with pytest.raises(FaceChainError, match="already exists"):
        save_lora(path, state, {"k": "v2"}, overwrite=False)
    save_lora(path, state, {"k": "v3"}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.safetensors"]


def test_captions_from_autotag_lines_or_trigger():
    tagged = {"trigger": "fcsks", "subject": "a man", "captions": ["fcsks, a man, smile", "fcsks, a man"],
              "shared_tags": [], "prompt": "fcsks, a man"}
    assert resolve_captions(2, tagged) == (["fcsks, a man, smile", "fcsks, a man"], "fcsks")
    assert resolve_captions(3, caption_text="a man\n\n", trigger="zk") == (["zk, a man"] * 3, "zk")
    assert resolve_captions(2, caption_text="zk smiling\nserious", trigger="zk")[0] == ["zk smiling", "zk, serious"]
    assert resolve_captions(2, trigger="zk") == (["zk", "zk"], "zk")
    with pytest.raises(FaceChainError, match="2 captions"):
        resolve_captions(3, tagged)
    with pytest.raises(FaceChainError, match="No training images"):
        resolve_captions(0, trigger="zk")
    with pytest.raises(FaceChainError, match="FACECHAIN_CAPTIONS"):
        resolve_captions(2, {"nope": 1})


def test_settings_scale_lr_and_count_steps():
    s = TrainSettings().with_(batch_size=8, samples=2000, learning_rate=1e-4, lr_batch_scaling="linear")
    assert s.steps == 250 and s.effective_lr == pytest.approx(8e-4)
    assert TrainSettings().with_(batch_size=3, samples=10).steps == 4
    with pytest.raises(FaceChainError, match="precision"):
        TrainSettings().with_(precision="fp8").validate()


def test_high_res_checkpointing_recomputes_only_large_inputs(monkeypatch):
    import torch

    from facechain_core.train import lora_layers

    class ResBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    seen = []
    real = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kw):
        seen.append(tuple(args[0].shape))
        return real(fn, *args, **kw)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    block = ResBlock()
    with lora_layers.gradient_checkpointing(block, True, ["ResBlock"], min_tokens=64 * 64) as n:
        assert n == 1
        block(torch.randn(1, 4, 32, 32, requires_grad=True)).sum().backward()
        block(torch.randn(1, 4, 64, 64, requires_grad=True)).sum().backward()
    assert seen == [(1, 4, 64, 64)]
    assert "forward" not in block.__dict__, "the block's own forward is back after the run"


def test_clip_tokenizer_comes_from_installed_files_or_a_clear_error(monkeypatch):
    from conftest import COMFY_DIR
    from facechain_core.errors import FaceChainError
    from facechain_core.train import diffusers_backbone as db

    monkeypatch.setattr(db, "_open_clip_bpe", lambda: None)
    monkeypatch.delenv(db.TOKENIZER_ENV, raising=False)
    db.tokenizer.cache_clear()
    try:
        with pytest.raises(FaceChainError, match="FACECHAIN_CLIP_TOKENIZER"):
            db.tokenizer()
        monkeypatch.setenv(db.TOKENIZER_ENV, str(COMFY_DIR / "comfy" / "sd1_tokenizer"))
        db.tokenizer.cache_clear()
        ids = db.tokenizer()("a photo of a man").input_ids
        assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 7  # start, 5 words, end
    finally:
        db.tokenizer.cache_clear()


def test_channels_last_converts_conv_weights_in_their_memory_for_the_run_and_gives_them_back():
    from facechain_core.train.speed import channels_last

    with torch.inference_mode():  # as ComfyUI loads its models
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(3, 3), torch.nn.Conv2d(8, 4, 1),
                                  torch.nn.Conv2d(4, 4, 3))
        net[3].weight = torch.nn.Parameter(torch.randn(4, 8, 3, 3)[:, ::2])  # neither layout
    originals = [m.weight for m in net]
    values, strides = [w.clone() for w in originals], [w.stride() for w in originals]
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        expected = net[3](net[2](net[0](x)))
    with channels_last(net, True) as swapped:
        assert swapped == 2  # a 1x1 convolution's weight is both layouts already: left as it is
        for i in (0, 2, 3):
            assert net[i].weight.is_contiguous(memory_format=torch.channels_last)
        # rewritten where it was (no second copy of the convolutions); the odd one gets a copy
        assert net[0].weight.data_ptr() == originals[0].data_ptr()
        assert net[3].weight.data_ptr() != originals[3].data_ptr()
        assert net[1].weight is originals[1] and net[2].weight is originals[2]
        with torch.no_grad():
            got = net[3](net[2](net[0](x.contiguous(memory_format=torch.channels_last))))
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(m.weight is w for m, w in zip(net, originals))
    assert all(torch.equal(w, v) and w.stride() == st for w, v, st in zip(originals, values, strides))
    with channels_last(net, False) as swapped:
        assert swapped == 0
    with channels_last(net, True, torch.device("cuda")) as swapped:  # weights elsewhere than the run's device
        assert swapped == 2 and net[0].weight.data_ptr() != originals[0].data_ptr()  # copied, not rewritten
    with channels_last(net, True, "cpu") as swapped:
        assert net[0].weight.data_ptr() == originals[0].data_ptr()
    # a weight shared by two layers is rewritten once; two weight objects over one memory are copied
    with torch.inference_mode():
        shared = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1),
                                     torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1))
        shared[1].weight = shared[0].weight
        shared[3].weight = torch.nn.Parameter(shared[2].weight.detach().view(4, 4, 3, 3))
    before, objects = [m.weight.clone() for m in shared], [m.weight for m in shared]
    with torch.no_grad():
        expected = shared(x)
    with channels_last(shared, True) as swapped:
        assert swapped == 4 and shared[0].weight is shared[1].weight
        assert shared[0].weight.data_ptr() == objects[0].data_ptr()  # rewritten where it is
        assert shared[2].weight.data_ptr() != objects[2].data_ptr()  # copied
        assert shared[3].weight.data_ptr() != objects[3].data_ptr()
        with torch.no_grad():
            got = shared(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-5)
    assert all(torch.equal(m.weight, v) for m, v in zip(shared, before))
    # an error inside the run still writes every weight back
    try:
        with channels_last(net, True):
            raise RuntimeError("cancelled")
    except RuntimeError:
        pass
    assert all(m.weight is w and torch.equal(w, v) for m, w, v in zip(net, originals, values))


def test_every_attention_backend_name_is_a_torch_backend_and_math_runs_here():
    from facechain_core.train import speed
    from facechain_core.train.settings import ATTENTION_BACKENDS

    q = torch.randn(1, 2, 8, 4)
    for name in ATTENTION_BACKENDS:
        TrainSettings().with_(attention_backend=name).validate()
        with speed.attention_backend(name):
            if name in ("auto", "math"):  # the ones a CPU runs
                out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
                assert out.shape == q.shape and torch.isfinite(out).all()


def test_unknown_attention_backend_is_a_clear_error():
    with pytest.raises(FaceChainError, match="attention_backend must be one of"):
        TrainSettings().with_(attention_backend="fast").validate()
    with pytest.raises(FaceChainError, match="attention_backend must be one of"):  # a list, as JSON can give
        TrainSettings().with_(attention_backend=["flash"]).validate()


def test_lora_factors_cast_to_half_activations_keep_float32_weights_and_grads():
    from facechain_core.train.lora_layers import lora_adapters

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with lora_adapters(net, ["0"], 4, 4, 0, product="activations") as params:
        for p in params:
            torch.nn.init.normal_(p, std=0.1)  # lora_B starts at zero: make the product visible
        out = net(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                   and p.grad.abs().sum() > 0 for p in params)
        with lora_adapters(torch.nn.Sequential(torch.nn.Linear(16, 16)), ["0"], 4, 4, 0) as plain:
            assert len(plain) == 2
    assert type(net[0]) is torch.nn.Linear  # the wrapper is gone again
