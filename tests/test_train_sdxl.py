"""SDXL through the node's own code, in process (no SDXL checkpoint fits a CPU test): a tiny UNet of ComfyUI's
SDXL model class, a stand-in CLIP (pooled output) and VAE. The trainer feeds SDXL's size conditioning, saves
kohya SDXL keys (original block names), and ComfyUI's LoRA loader maps every one of them."""

from __future__ import annotations

import importlib

import pytest
import torch

from conftest import load_pack


def load_backbone_module():
    return importlib.import_module(load_pack().__name__ + ".nodes.comfy_backbone")


class StandInCLIP:
    """Returns SDXL-shaped conditioning (2048-wide context, 1280 pooled) for any text."""

    class cond_stage_model:  # no clip_l/clip_g: the text encoder is not trained here
        pass

    layer_idx = None

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=False):
        g = torch.Generator().manual_seed(len(tokens))
        return torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)


class StandInVAE:
    def encode(self, images):
        return images[..., :3].permute(0, 3, 1, 2)[:, :1].repeat(1, 4, 1, 1)[:, :, ::8, ::8] * 2 - 1


def tiny_sdxl():
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
                  channel_mult=[1, 2], transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
                  transformer_depth_middle=1, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
                  use_linear_in_transformer=True, num_head_channels=64, use_spatial_transformer=True,
                  legacy=False, use_temporal_attention=False, use_temporal_resblock=False, dtype=torch.float32)
    model = comfy.supported_models.SDXL(config).get_model({}, "", device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            p.copy_(torch.zeros_like(p) if name.endswith("bias") else
                    torch.ones_like(p) if p.ndim == 1 else torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.host  # slow layer: heavy, though no server
def test_sdxl_trains_and_comfyui_maps_every_key():
    node = load_backbone_module()
    from facechain_core.train import TrainSettings, train_lora

    import comfy.sd

    patcher = tiny_sdxl()
    backbone = node.comfy_backbone(patcher, StandInCLIP(), StandInVAE(), (64, 64))
    assert backbone.arch == "sdxl"
    cond = backbone.encode_text(["fcsks", "fcsks, smiling"])
    assert cond["context"].shape == (2, 77, 2048) and cond["y"].shape == (2, 2816)
    before = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    result = train_lora(backbone, images, ["fcsks", "fcsks, smiling"],
                        TrainSettings().with_(samples=4, batch_size=2, learning_rate=1e-3))
    layers = {k.rsplit(".", 2)[0] for k in result.lora if k.endswith("lora_down.weight")}
    assert layers and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_",
                                        "lora_unet_output_blocks_")) for k in layers)
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k" in layers
    # the host's model is as before: same tensors, no adapters left
    after = patcher.model.diffusion_model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    applied, _ = comfy.sd.load_lora_for_models(patcher, None, result.lora, 1.0, 0.0)
    assert len(applied.patches) == len(layers)
