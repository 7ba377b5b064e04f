"""The trainer's view of a model ComfyUI loaded (not a node): the UNet, its noise schedule, VAE and CLIP as a
``facechain_core.train.Backbone``, the host patches training needs, and applying a LoRA file as LoraLoader
does. All the ComfyUI model surgery of TrainFaceLoRA lives here; the core never imports ComfyUI."""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.ops
import comfy.sd
import comfy.utils

from ..facechain_core.errors import FaceChainError
from ..facechain_core.train import Backbone, channel_cat, fused_add, geglu, group_norm, layer_norm
from ..facechain_core.train.lora_layers import (drop_premerged, premerge, runs_plain_forward,
                                                  stacked_projection, without_hooks)

# ComfyUI's model config classes whose UNet, noise schedule and LoRA keys this trainer handles.
ARCHITECTURES = {"SD15": "sd15", "SDXL": "sdxl", "SSD1B": "sdxl", "Segmind_Vega": "sdxl",
                 "KOALA_700M": "sdxl", "KOALA_1B": "sdxl"}
TEXT_ENCODERS = {"sd15": ["clip_l"], "sdxl": ["clip_l", "clip_g"]}


def _architecture(model) -> str:
    import comfy.model_sampling as sampling
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = getattr(model, "model", None)
    config_name = type(getattr(base, "model_config", None)).__name__
    arch = ARCHITECTURES.get(config_name)
    if arch is None or not isinstance(getattr(base, "diffusion_model", None), UNetModel):
        raise FaceChainError(f"TrainFaceLoRA trains SD1.5 and SDXL checkpoints; this MODEL is '{config_name}'. "
                             f"Load an SD1.5 or SDXL checkpoint with Load Checkpoint.")
    ms = model.get_model_object("model_sampling")
    if not isinstance(ms, sampling.ModelSamplingDiscrete) or not isinstance(ms, sampling.EPS) \
            or isinstance(ms, (sampling.V_PREDICTION, sampling.X0)):
        kind = " + ".join(c.__name__ for c in type(ms).__mro__[1:3])
        raise FaceChainError(f"TrainFaceLoRA trains epsilon-prediction models with the standard discrete schedule "
                             f"(SD1.5, SDXL); this MODEL predicts with '{kind}' (v-prediction or another "
                             f"sampling patch). Connect the checkpoint's MODEL directly.")
    return arch


def comfy_backbone(model, clip, vae, image_hw: tuple[int, int]) -> Backbone:
    """The trainer's view of ComfyUI's loaded model: the UNet module, its noise schedule, VAE and CLIP."""
    arch = _architecture(model)
    base = model.model
    unet = base.diffusion_model
    device = model.load_device
    dtype = base.manual_cast_dtype or base.get_dtype()
    sigmas = model.get_model_object("model_sampling").sigmas.detach().float().cpu()
    alphas_cumprod = 1.0 / (1.0 + sigmas ** 2)
    h, w = image_hw
    text_encoders = []
    for name in TEXT_ENCODERS[arch]:
        part = getattr(clip.cond_stage_model, name, None)
        if part is not None and hasattr(part, "transformer"):
            text_encoders.append(part.transformer)
    training_clip = {"on": False}

    def predict_noise(x, t, cond):
        extra = {"y": cond["y"].to(dtype)} if "y" in cond else {}
        return unet(x.to(dtype), t.float(), context=cond["context"].to(dtype), transformer_options={}, **extra)

    def encode_images(images):
        return base.process_latent_in(vae.encode(images[..., :3]))

    def encode_one(caption):
        tokens = clip.tokenize(caption)
        if training_clip["on"]:
            # Same calls as CLIP.encode_from_tokens, minus its model loading (the CLIP is already on the
            # device with the UNet; reloading could move the borrowed UNet weights).
            clip.cond_stage_model.reset_clip_options()
            if clip.layer_idx is not None:
                clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
            cond, pooled = clip.cond_stage_model.encode_token_weights(tokens)[:2]
        else:
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        cond = cond[:, :77]  # a batch needs one length: captions are cut to CLIP's 77 tokens
        y = None
        if arch == "sdxl":
            y = base.encode_adm(pooled_output=pooled, width=w, height=h, target_width=w, target_height=h,
                                crop_w=0, crop_h=0)
        return cond.to(device), y

    def encode_text(captions):
        parts = [encode_one(c) for c in captions]
        out = {"context": torch.cat([p[0] for p in parts])}
        if parts[0][1] is not None:
            out["y"] = torch.cat([p[1] for p in parts]).to(device)
        return out

    def prepare(train_text_encoder: bool):
        # As ComfyUI's own trainer does: free the device for training, load the UNet (and CLIP) in full.
        training_clip["on"] = train_text_encoder
        models = [model, clip.patcher] if train_text_encoder else [model]
        comfy.model_management.load_models_gpu(models, memory_required=1e20, force_full_load=True)

    unet_config = base.model_config.unet_config
    return Backbone(arch=arch, unet=unet, unet_naming="ldm", num_res_blocks=_num_res_blocks(unet_config),
                    predict_noise=predict_noise, alphas_cumprod=alphas_cumprod, device=device,
                    encode_images=encode_images, encode_text=encode_text, text_encoders=text_encoders,
                    size_multiple=8 * 2 ** (len(unet_config["channel_mult"]) - 1), prepare=prepare,
                    extra_frozen=[m for m in (getattr(base, "embedder", None),) if m is not None],
                    training_context=lambda train_te: _out_of_place_clip_layers(clip.cond_stage_model, train_te),
                    plain_linear=plain_linear,
                    fast_layers=lambda **kernels: fast_frozen_layers(unet, **kernels))


def _plain(m, torch_class, comfy_class) -> bool:
    """Whether ``m`` (a ``torch_class``) computes its torch forward and nothing else: torch's class itself, or
    ComfyUI's ``comfy_class`` when it neither casts its weights per call nor has weight or bias functions (LoRA
    patches applied on the fly, low-VRAM offloading); either called without hooks."""
    return runs_plain_forward(m) and _plain_class(m, torch_class, comfy_class)


def _plain_class(m, torch_class, comfy_class) -> bool:
    """``_plain`` but for the hooks and an instance forward: what the layer's class computes is torch's."""
    if not isinstance(m, torch_class):
        return False
    return type(m).forward is torch_class.forward or (
        type(m).forward is comfy_class.forward and not m.comfy_cast_weights and not m.weight_function
        and not m.bias_function)


def plain_linear(m) -> bool:
    """Whether ``m`` computes ``F.linear(x, weight, bias)`` and nothing else (``_plain``). The trainer's fused
    LoRA product and the training-only forwards bypass such a layer's forward."""
    return _plain(m, torch.nn.Linear, comfy.ops.disable_weight_init.Linear)


@contextmanager
def _out_of_place_clip_layers(clip_model, enabled: bool):
    """ComfyUI's CLIP layers add their residuals in place (``x += ...``), which autograd cannot differentiate
    through. While the text encoder trains, each layer instance runs the same sum out of place."""
    patched = []
    if enabled:
        for m in clip_model.modules():
            if type(m).__name__ == "CLIPLayer" and all(hasattr(m, a) for a in
                                                       ("self_attn", "mlp", "layer_norm1", "layer_norm2")):
                def forward(x, mask=None, optimized_attention=None, _m=m):
                    x = x + _m.self_attn(_m.layer_norm1(x), mask, optimized_attention)
                    return x + _m.mlp(_m.layer_norm2(x))

                m.forward = forward
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def _num_res_blocks(unet_config) -> list[int]:
    nrb = unet_config["num_res_blocks"]
    levels = len(unet_config["channel_mult"])
    return list(nrb) if isinstance(nrb, (list, tuple)) else [int(nrb)] * levels


def apply_lora_file(model, clip, path):
    """The LoRA file as it is on disk applied at strength 1, through the same calls as the stock LoraLoader."""
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)


def _plain_conv1x1(m) -> bool:
    """A 1x1 convolution (stride 1, no padding, one group) that computes ``F.conv2d`` and nothing else."""
    return (isinstance(m, torch.nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and tuple(m.stride) == (1, 1)
            and tuple(m.padding) == (0, 0) and tuple(m.dilation) == (1, 1) and m.groups == 1
            and _plain(m, torch.nn.Conv2d, comfy.ops.disable_weight_init.Conv2d))


def _projection(m):
    """(weight [out, in], bias) of a plain 1x1 convolution or linear layer, else None."""
    if plain_linear(m) or _plain_conv1x1(m):
        return m.weight.flatten(1), m.bias
    return None


def _geglu_forward(m, kernels: bool = True):
    """GEGLU by the pack's kernels (``geglu``: one projection, one pass each way); where they do not run, as two
    matrix multiplies, one per half of its projection's weight, instead of one whose output is split: the value
    and the gate come out contiguous, so the GELU and the product (and their backward) run the vectorised
    kernels, and backward needs no concatenation of the two halves' gradients."""
    from comfy.ldm.modules.attention import GEGLU

    def forward(x):
        p = m.proj
        if not plain_linear(p):
            return GEGLU.forward(m, x)
        if kernels and geglu.usable(x, p.weight, p.bias):
            return geglu.geglu(x, p.weight, p.bias)
        half = p.weight.shape[0] // 2
        w, b = p.weight, p.bias
        value = F.linear(x, w[:half], None if b is None else b[:half])
        gate = F.linear(x, w[half:], None if b is None else b[half:])
        return value * F.gelu(gate)

    return forward


def _spatial_transformer_forward(m):
    """SpatialTransformer with its projections in and out as batched matrix multiplies on the feature map's
    own memory: (positions x channels) is the NCHW map read transposed, so neither the copy to the
    transformer's layout and back nor cuDNN's NCHW-to-NHWC conversions for the 1x1 convolutions are needed.
    Where its norm runs the pack's kernels, the map reaches the residual through the norm
    (``group_norm_and_input``: the residual's gradient is added by the norm's backward kernel). The same
    arithmetic as ComfyUI's forward (attention.py, SpatialTransformer.forward)."""
    from comfy.ldm.modules.attention import SpatialTransformer

    def forward(x, context=None, transformer_options={}):
        proj_in, proj_out = _projection(m.proj_in), _projection(m.proj_out)
        # under autocast the stock projections cast inside the convolution or linear, bias included; the sums
        # here would not, and the blocks would get float32
        if proj_in is None or proj_out is None or x.ndim != 4 or torch.is_autocast_enabled(x.device.type):
            return SpatialTransformer.forward(m, x, context=context, transformer_options=transformer_options)
        if not isinstance(context, list):
            context = [context] * len(m.transformer_blocks)
        b, c, h, w = x.shape
        transformer_options["activations_shape"] = list(x.shape)
        (w_in, b_in), (w_out, b_out) = proj_in, proj_out
        if _kernel_group_norm(m.norm):  # x passed on through the norm: the residual's gradient is added by it
            n = m.norm
            x, normed = group_norm.group_norm_and_input(x, n.num_groups, n.weight, n.bias, n.eps)
        else:
            normed = m.norm(x)
        nhwc = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if nhwc and normed.is_contiguous(memory_format=torch.channels_last):
            # (b * hw) x c, row-major: one multiply, the bias added by it
            t2 = normed.permute(0, 2, 3, 1).reshape(b * h * w, c)
            t = (torch.addmm(b_in, t2, w_in.t()) if b_in is not None else t2 @ w_in.t()).view(b, h * w, -1)
        else:
            # [b, hw, c] viewed from NCHW (each batch's matrix column-major, which the batched multiply reads as
            # it is)
            t = torch.matmul(normed.flatten(2).transpose(1, 2), w_in.t())
            if b_in is not None:
                t = t + b_in
        for i, block in enumerate(m.transformer_blocks):
            transformer_options["block_index"] = i
            t = block(t, context=context[i], transformer_options=transformer_options)
        if nhwc:
            # back to NHWC, as the map came: (b * hw) x inner @ inner x c with the bias added by the multiply,
            # then the residual in one contiguous pass
            t2 = t.reshape(b * h * w, t.shape[-1])
            out = torch.addmm(b_out, t2, w_out.t()) if b_out is not None else t2 @ w_out.t()
            out = out.add_(x.permute(0, 2, 3, 1).reshape(b * h * w, c))
            return out.view(b, h, w, c).permute(0, 3, 1, 2)
        # back to NCHW: [c, inner] @ [inner, hw] per batch, added to the residual (and bias) by the multiply
        residual = x.flatten(2) if b_out is None else x.flatten(2) + b_out[:, None]
        out = torch.baddbmm(residual, w_out.expand(b, *w_out.shape), t.transpose(1, 2))
        return out.view(b, c, h, w)

    return forward


def _plain_layer_norm(m) -> bool:
    return _plain(m, torch.nn.LayerNorm, comfy.ops.disable_weight_init.LayerNorm) and len(m.normalized_shape) == 1


def _plain_transformer_block(m) -> bool:
    """A BasicTransformerBlock as SD1.5's and SDXL's are (self-attention, cross-attention, feed-forward, each
    after a plain LayerNorm and added to the residual stream). The block's own hooks still run around it."""
    return (not m.ff_in and m.is_res and m.attn2 is not None
            and not m.switch_temporal_ca_to_sa and all(_plain_layer_norm(n) for n in (m.norm1, m.norm2, m.norm3)))


def _attention(attn, x, context, transformer_options, stack: bool = True):
    """``attn(x, context)`` (ComfyUI's CrossAttention; a self-attention without a context) with its projections
    of the same input as one multiply where their LoRA adapters merge (``lora_layers.stacked_projection``): q, k
    and v of a self-attention, k and v of a cross-attention over the text (merged for that though its 77 tokens
    would leave each layer alone to the fused product). They reach the attention as column slices of one output
    (every attention function of ComfyUI reshapes them as it finds them, PyTorch's SDPA takes them strided). The
    stock forward otherwise (and without ``stack``), and for an attention override a custom node set (it may want
    contiguous inputs)."""
    from comfy.ldm.modules import attention

    if (stack and runs_plain_forward(attn) and type(attn).forward is attention.CrossAttention.forward
            and "optimized_attention_override" not in transformer_options):
        if context is None:
            qkv = stacked_projection(x, (attn.to_q, attn.to_k, attn.to_v))
            q, k, v = qkv.split(qkv.shape[-1] // 3, dim=-1) if qkv is not None else (None,) * 3
        else:
            kv = stacked_projection(context, (attn.to_k, attn.to_v), few_tokens=True)
            q, k, v = (attn.to_q(x), *kv.split(kv.shape[-1] // 2, dim=-1)) if kv is not None else (None,) * 3
        if q is not None:
            out = attention.optimized_attention(q, k, v, attn.heads, attn_precision=attn.attn_precision,
                                                transformer_options=transformer_options)
            return attn.to_out(out)
    return attn(x, context=context, value=None, transformer_options=transformer_options)


def _attention_projections(m, context) -> tuple[list, list]:
    """The block's attention projections whose LoRA adapters ``premerge`` merges ahead where they merge: those
    that read the hidden states' tokens (q, k, v of the self-attention, both outputs, the cross-attention's q),
    and those that read the text ``context`` (the cross-attention's k and v)."""
    a1, a2 = m.attn1, m.attn2
    hidden = ([] if m.disable_self_attn else [a1.to_q, a1.to_k, a1.to_v]) + [a2.to_q]
    hidden += [a.to_out[0] for a in (a1, a2) if isinstance(a.to_out, torch.nn.Sequential) and len(a.to_out)]
    text = [] if context is None else [a2.to_k, a2.to_v] + ([a1.to_k, a1.to_v] if m.disable_self_attn else [])
    return hidden, text


def _transformer_block_forward(m, block_merge: bool = True):
    """BasicTransformerBlock with each residual addition and the LayerNorm after it as one pass of the pack's
    kernels each way (``layer_norm.add_layer_norm``: forward writes the sum and its norm, backward adds the
    residual stream's gradient as it writes the norm's input gradient). The same arithmetic as ComfyUI's
    (attention.py, BasicTransformerBlock.forward) where no patches are set; with patches, under autocast, or for
    a block of another shape, that runs. With ``block_merge`` the attention's LoRA adapters are merged ahead
    (``_attention_projections``, ``premerge``) and the projections of one input are one multiply where their
    adapters merge (``_attention``)."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    def forward(x, context=None, transformer_options={}):
        if (transformer_options.get("patches") or transformer_options.get("patches_replace")
                or torch.is_autocast_enabled(x.device.type) or not _plain_transformer_block(m)):
            return BasicTransformerBlock.forward(m, x, context=context, transformer_options=transformer_options)
        n1, n2, n3 = m.norm1, m.norm2, m.norm3
        x, n = layer_norm.add_layer_norm(x, None, n1.weight, n1.bias, n1.eps)
        hidden, text = _attention_projections(m, context) if block_merge else ([], [])
        try:  # each block's merging adapters in one launch (one more for the text's k and v)
            premerge(n, hidden)
            premerge(context, text, few_tokens=True)
            n = _attention(m.attn1, n, context if m.disable_self_attn else None, transformer_options, block_merge)
            x, n = layer_norm.add_layer_norm(x, n, n2.weight, n2.bias, n2.eps)
            n = _attention(m.attn2, n, context, transformer_options, block_merge)
        finally:  # what was merged ahead and not taken (an error on the way, a layer that took another path)
            drop_premerged(hidden + text)
        x, n = layer_norm.add_layer_norm(x, n, n3.weight, n3.bias, n3.eps)
        return x + m.ff(n)

    forward.fast_layer = True  # gradient_checkpointing may still wrap it
    return forward


def _plain_group_norm(m) -> bool:
    return _plain(m, torch.nn.GroupNorm, comfy.ops.disable_weight_init.GroupNorm)


def _group_norm_forward(m):
    """GroupNorm through the pack's kernels, which keep the map's memory layout (``group_norm``)."""
    def forward(x):
        return group_norm.group_norm(x, m.num_groups, m.weight, m.bias, m.eps)

    forward.kernels = True  # see _kernel_group_norm
    return forward


def _kernel_group_norm(m) -> bool:
    """A GroupNorm that fast_frozen_layers gave the kernels' forward (``_group_norm_forward``), called without
    hooks: a caller may run the kernels on its parameters itself (``group_norm_and_input``)."""
    return (getattr(m.__dict__.get("forward"), "kernels", False) and without_hooks(m)
            and _plain_class(m, torch.nn.GroupNorm, comfy.ops.disable_weight_init.GroupNorm))


def _norm_silu_forward(seq):
    """A Sequential that starts with a GroupNorm and a SiLU (ResBlock's in and out layers, the UNet's output
    head): the two run as one pass of the pack's kernels, the rest as they are. Its layers are looked up at
    each call (LoRA adapters put in later replace them), and it runs stock when it no longer starts so."""
    def forward(x):
        if not _norm_silu_sequential(seq):
            return torch.nn.Sequential.forward(seq, x)
        norm = seq[0]
        h = group_norm.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=True)
        for layer in list(seq)[2:]:
            h = layer(h)
        return h

    return forward


def _plain_conv(m) -> bool:
    return (isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros"
            and _plain(m, torch.nn.Conv2d, comfy.ops.disable_weight_init.Conv2d))


def _conv_without_bias(m, x):
    return F.conv2d(x, m.weight, None, m.stride, m.padding, m.dilation, m.groups)


def _resblock_parts(m):
    """(in norm, in conv, out norm, out conv) of a ResBlock as SD1.5's and SDXL's are (norm, SiLU, convolution
    in; time embedding added; norm, SiLU, dropout that drops nothing, convolution out; skip connection that is
    nothing or a convolution), all plain; else None."""
    i, o = m.in_layers, m.out_layers
    if m.updown or m.use_scale_shift_norm or m.exchange_temb_dims:
        return None
    if not (_norm_silu_sequential(i) and len(i) == 3 and _plain_conv(i[2])):
        return None
    if not (_norm_silu_sequential(o) and len(o) == 4 and type(o[2]) is torch.nn.Dropout
            and runs_plain_forward(o[2]) and (o[2].p == 0 or not o[2].training) and _plain_conv(o[3])):
        return None
    skip = m.skip_connection
    if not ((type(skip) is torch.nn.Identity and runs_plain_forward(skip)) or _plain_conv(skip)):
        return None
    return i[0], i[2], o[0], o[3]


def _resblock_forward(m):
    """ResBlock's ``_forward`` with its additions folded into the pack's kernels: the in-convolution's bias and
    the time embedding (one value per sample and channel) are added by the out-norm's kernel as it reads the map
    (``group_norm(..., add=)``), and the out-convolution's bias (and the skip convolution's) by the one pass that
    adds the skip connection (``fused_add``), whose gradient the in-norm's backward kernel adds to its own as it
    writes the input's (``group_norm_and_input``). Stock, each of those is a pass over the map of its own, and
    cuDNN's convolutions leave their bias to a broadcast addition that is not vectorised on channels-last maps. The
    same arithmetic as ComfyUI's (openaimodel.py, ResBlock._forward); blocks of another shape run that."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    def forward(x, emb):
        parts = _resblock_parts(m)
        if parts is None or x.ndim != 4 or emb.ndim != 2 or torch.is_autocast_enabled(x.device.type):
            return ResBlock._forward(m, x, emb)
        in_norm, in_conv, out_norm, out_conv = parts
        # x passed on through the in-norm to the skip connection: the kernels add the skip's gradient to the norm's
        x, h = group_norm.group_norm_and_input(x, in_norm.num_groups, in_norm.weight, in_norm.bias, in_norm.eps,
                                               silu=True)
        h = _conv_without_bias(in_conv, h)
        add = None if m.emb_layers is None else m.emb_layers(emb).type(h.dtype)
        if in_conv.bias is not None:
            add = in_conv.bias.to(h.dtype).expand(h.shape[:2]) if add is None else add + in_conv.bias.to(h.dtype)
        h = group_norm.group_norm(h, out_norm.num_groups, out_norm.weight, out_norm.bias, out_norm.eps, silu=True,
                                  add=None if add is None else add.contiguous())
        h = _conv_without_bias(out_conv, h)
        skip, bias = x, out_conv.bias
        if type(m.skip_connection) is not torch.nn.Identity:
            skip = _conv_without_bias(m.skip_connection, x)
            b = m.skip_connection.bias
            bias = b if bias is None else bias if b is None else bias + b.to(bias.dtype)
        return fused_add.add(skip, h, None if bias is None else bias.to(h.dtype))

    return forward


class _TorchWithChannelCat(types.ModuleType):
    """``torch`` as ComfyUI's UNet module sees it (``import torch as th``) while the trainer runs: every name is
    torch's but ``cat``, which joins the up path's channels-last maps and skip connections by the pack's kernels
    (``channel_cat``; torch's own for anything else)."""

    cat = staticmethod(channel_cat.cat)

    def __getattr__(self, name):
        return getattr(torch, name)


_TORCH_WITH_CHANNEL_CAT = _TorchWithChannelCat("torch")


def _unet_joins_by_kernels() -> bool:
    """Point the name ComfyUI's UNet module (openaimodel.py) has for torch at ``_TORCH_WITH_CHANNEL_CAT``, so its up
    path joins the skip connections by ``channel_cat``; True if done (not when it is not torch itself, e.g. already
    pointed so by an outer ``fast_frozen_layers``): then ``_unet_joins_by_torch`` gives it back."""
    from comfy.ldm.modules.diffusionmodules import openaimodel

    if getattr(openaimodel, "th", None) is not torch:
        return False
    openaimodel.th = _TORCH_WITH_CHANNEL_CAT
    return True


def _unet_joins_by_torch() -> None:
    """Give ComfyUI's UNet module its torch back, where it still has ours (what another patch put there stays)."""
    from comfy.ldm.modules.diffusionmodules import openaimodel

    if getattr(openaimodel, "th", None) is _TORCH_WITH_CHANNEL_CAT:
        openaimodel.th = torch


def _norm_silu_sequential(m) -> bool:
    """A Sequential (called without hooks) whose first two layers are a plain GroupNorm and a SiLU."""
    return (type(m) is torch.nn.Sequential and not (m._forward_hooks or m._forward_pre_hooks) and len(m) >= 2
            and _plain_group_norm(m[0]) and type(m[1]) is torch.nn.SiLU and runs_plain_forward(m[1]))


@contextmanager
def fast_frozen_layers(unet, group_norm_kernels: bool = True, geglu_kernels: bool = True,
                       layer_norm_kernels: bool = True, block_merge: bool = True, concat_kernels: bool = True):
    """Training-only forwards for frozen layers whose stock forwards move more memory than they compute (see
    ``_geglu_forward``, ``_spatial_transformer_forward``, with ``group_norm_kernels`` the GroupNorms, with the
    SiLU after them where there is one, and the ResBlocks' additions: ``_resblock_forward``, with
    ``layer_norm_kernels`` the transformer blocks' norms and residual additions: ``_transformer_block_forward``,
    there with ``block_merge`` the attention's adapters merged ahead and the projections of one input (q, k, v;
    k, v of the text) as one multiply; with ``concat_kernels`` the up path's joins of the skip connections by the
    pack's kernels: ``_unet_joins_by_kernels``);
    each instance gets its own, removed on exit. A layer whose projections are not plain (a LoRA adapter, weights
    cast per call) runs its stock forward. Yields how many layers were given one, how many of them are GroupNorms
    and how many transformer blocks, how many ResBlocks were given the folded ``_forward`` (each still runs
    ComfyUI's where ``_resblock_parts`` says no), and whether this call pointed the UNet's joins at the kernels
    (``channel_cat``)."""
    from comfy.ldm.modules.attention import GEGLU, BasicTransformerBlock, SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    patched, heads, norms = [], set(), 0  # heads: the GroupNorms that run inside their Sequential's forward
    blocks = []  # ResBlocks given the folded _forward (their forward stays free for gradient checkpointing)
    transformer_blocks = 0
    joined = concat_kernels and _unet_joins_by_kernels()
    try:
        for mod in unet.modules():  # a Sequential comes before its layers
            if group_norm_kernels and type(mod) is ResBlock and "_forward" not in mod.__dict__:
                mod._forward = _resblock_forward(mod)
                blocks.append(mod)
            if "forward" in mod.__dict__ or id(mod) in heads:
                continue
            if type(mod) is GEGLU:
                mod.forward = _geglu_forward(mod, geglu_kernels)
            elif type(mod) is SpatialTransformer:
                mod.forward = _spatial_transformer_forward(mod)
            elif layer_norm_kernels and type(mod) is BasicTransformerBlock:
                mod.forward = _transformer_block_forward(mod, block_merge)
                transformer_blocks += 1
            elif group_norm_kernels and _norm_silu_sequential(mod):
                mod.forward = _norm_silu_forward(mod)
                heads.add(id(mod[0]))  # left stock: the Sequential's forward checks it is still plain
                norms += 1
            elif group_norm_kernels and _plain_group_norm(mod):
                mod.forward = _group_norm_forward(mod)
                norms += 1
            else:
                continue
            patched.append(mod)
        yield {"layers": len(patched), "group_norms": norms, "res_blocks": len(blocks),
               "transformer_blocks": transformer_blocks, "channel_cat": joined}
    finally:
        for mod in patched:
            mod.__dict__.pop("forward", None)
        for mod in blocks:
            mod.__dict__.pop("_forward", None)
        if joined:
            _unet_joins_by_torch()
