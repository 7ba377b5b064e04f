"""LoRA adapters (peft) on a model that belongs to someone else: the host's UNet and text encoder.

The trainer must not copy the base weights, and must give the modules back exactly as it found them,
because other nodes of the same graph keep using them. Three reversible steps, each a context manager:

* ``borrowed_weights``: a host that loaded its model under ``torch.inference_mode`` (ComfyUI does) holds
  inference tensors, which autograd refuses to save for backward. Each parameter is swapped for a normal
  tensor *viewing the same storage* (no copy) with ``requires_grad`` off; the original parameter objects
  are put back afterwards.
* ``lora_adapters``: peft's ``inject_adapter_in_model`` wraps the target layers; on exit each wrapper is
  replaced by the layer it wrapped.
* ``gradient_checkpointing``: the forward of each transformer/res block is wrapped in
  ``torch.utils.checkpoint`` on the instance; on exit the instance attribute is removed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
import torch.utils.checkpoint

ADAPTER = "facechain"
# Blocks worth recomputing in backward: ComfyUI's and diffusers' names for the same things.
CHECKPOINT_BLOCKS = {"BasicTransformerBlock", "ResBlock", "ResnetBlock2D"}


def _normal_view(t: torch.Tensor) -> torch.Tensor:
    """A non-inference tensor over the same memory as ``t`` (which may be an inference tensor)."""
    with torch.inference_mode(False):
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        return view.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


@contextmanager
def borrowed_weights(*roots: torch.nn.Module) -> Iterator[None]:
    """Frozen, autograd-usable stand-ins for every parameter and buffer under ``roots``; no copies."""
    saved: list[tuple[dict, str, torch.Tensor]] = []
    seen: set[int] = set()
    try:
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for store in (module._parameters, module._buffers):
                    for name, t in list(store.items()):
                        if t is None:
                            continue
                        saved.append((store, name, t))
                        view = _normal_view(t.detach())
                        store[name] = torch.nn.Parameter(view, requires_grad=False) if store is module._parameters \
                            else view
        yield
    finally:
        for store, name, t in reversed(saved):
            store[name] = t


def _lora_modules(root: torch.nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in root.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def _fresh_targets(root: torch.nn.Module, targets: Iterable[str]) -> list[str]:
    """Module names under ``root`` that a target matches (``to_q`` matches ``...attn1.to_q``)."""
    targets = list(targets)
    return [name for name, _ in root.named_modules()
            if any(name == t or name.endswith("." + t) for t in targets)]


PRODUCTS = ("fp32", "activations", "autocast", "fused", "merged")  # where lora_adapters computes the LoRA product


class _CastWeightLinear(torch.nn.Linear):
    """A LoRA factor that keeps its float32 weight but multiplies in the activations' dtype: the weight is
    cast on the way in (a few thousand values) instead of the activations on the way out (millions), and
    its gradient still reaches the float32 weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """``t * scale``, without a pass over ``t`` when the scale is 1 (alpha = rank, the default)."""
    return t if scale == 1 else t * scale


class _FusedLoRALinear(torch.autograd.Function):
    """``x @ W.T + b + scale * (x @ A.T) @ B.T`` for a frozen ``W``, ``b`` in one function: the LoRA output is
    added by the second matrix multiply itself (``addmm_``), and in backward the LoRA's share of the input's
    gradient is added the same way. peft's forward writes the LoRA output, scales it and adds it to the base
    output (three passes over the layer's output), and autograd sums the two gradients of the input in a
    fourth; for the UNet's attention projections those passes cost more than the rank-4 products themselves.
    ``A``, ``B``: the float32 factors, cast to the activations' dtype on the way in (as "activations" does)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float):
        a_h, b_h = a.to(x.dtype), _scaled(b, scale).to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a_h.t()
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(h, b_h.t())
        ctx.save_for_backward(x2, h, weight, a_h, b_h)
        ctx.scale, ctx.shape = scale, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, h, weight, a_h, b_h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = g @ b_h  # the gradient reaching the rank-r middle (scale included in b_h)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_a = (gh.t() @ x2).float()
        if ctx.needs_input_grad[4]:  # scaled before the sum, as peft's order is: a half sum can overflow
            grad_b = (g.t() @ _scaled(h, ctx.scale)).float()
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gh, a_h).view(ctx.shape)
        return grad_x, None, None, grad_a, grad_b, None


_MM_OUT_DTYPE: dict = {}  # device type -> whether torch.mm(..., out_dtype=float32) runs there (half inputs)


def _mm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as float32 from half-precision inputs: cuBLAS accumulates in float32 and writes that, without
    rounding to half first (a sum over every token of a batch can pass fp16's 65504 under a loss scaler). Where
    PyTorch refuses ``out_dtype`` (older versions, other backends), the inputs are cast first, from then on."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and _MM_OUT_DTYPE.get(a.device.type, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # refused before any work is done
            _MM_OUT_DTYPE[a.device.type] = False
    return a.float() @ b.float()


def _merged_forward(ctx, x, scales, merged, weights, biases, factors_a, factors_b):
    """What both merged Functions compute for n >= 1 layers of one shape that read ``x``: the merged weights
    ``W_i + scale_i * B_i @ A_i`` side by side (``merged``, ``[n, out, in]``, when ``premerge`` made them ahead,
    from the float32 factors; else here, one multiply-add per layer from the factors rounded to the weights'
    dtype, summed in float32 and rounded once), and ``x @ [W_1'; ...; W_n'].T + bias`` as one multiply."""
    n = len(weights)
    out_f, in_f = weights[0].shape
    a = factors_a[0].unsqueeze(0) if n == 1 else torch.stack(factors_a)  # [n, r, in], float32
    b = [_scaled(f, s) for f, s in zip(factors_b, scales)]
    b = b[0].unsqueeze(0) if n == 1 else torch.stack(b)  # [n, out, r], the scales in
    if merged is None:
        a_h, b_h = a.to(x.dtype), b.to(x.dtype)
        merged = torch.empty(n, out_f, in_f, device=x.device, dtype=x.dtype)
        for i, w in enumerate(weights):
            torch.addmm(w, b_h[i], a_h[i], out=merged[i])
    x2 = x.reshape(-1, in_f)
    flat = merged.view(n * out_f, in_f)
    bias = None if biases[0] is None else biases[0] if n == 1 else torch.cat(biases)
    y = torch.addmm(bias, x2, flat.t()) if bias is not None else x2 @ flat.t()
    # backward's small products take the float32 factors themselves (their half copies differ by a rounding,
    # ~5e-4 relative, and casting them back would be more kernels per layer and step)
    ctx.save_for_backward(x2, merged, a, b)
    ctx.scales, ctx.shape = scales, x.shape
    return y.view(*x.shape[:-1], n * out_f)


def _merged_backward(ctx, grad, factors: bool, inputs: bool) -> tuple:
    """``(grad_x, grads of the A factors, grads of the B factors)`` for ``_merged_forward``: ``M = g.T @ x`` once
    for all n layers (float32, each layer's base-weight gradient, were it trained), ``scale * B.T @ M`` and
    ``scale * M @ A.T`` by two batched multiplies (the gradients are views of one tensor each), and the input's
    gradient ``g @ W'`` as one multiply."""
    x2, merged, a, b = ctx.saved_tensors
    n, out_f, in_f = merged.shape
    g = grad.reshape(-1, n * out_f)
    grads_a = grads_b = (None,) * n
    if factors:
        m = _mm_float32(g.t(), x2).view(n, out_f, in_f)
        grads_a = torch.bmm(b.transpose(1, 2), m).unbind(0)  # b holds the scale
        grads_b = [_scaled(t, s) for t, s in zip(torch.bmm(m, a.transpose(1, 2)).unbind(0), ctx.scales)]
    grad_x = (g @ merged.view(n * out_f, in_f)).view(ctx.shape) if inputs else None
    return grad_x, grads_a, grads_b


class _MergedLoRALinear(torch.autograd.Function):
    """``x @ (W + scale * B @ A).T + b`` for a frozen ``W``, ``b``: the adapter is merged into a copy of the
    weight for the step (out x in values; or ``merged`` by ``premerge`` ahead), so forward is one matrix multiply
    over the activations instead of three (``_FusedLoRALinear``), and backward two: the input's gradient
    ``g @ W'`` and ``M = g.T @ x`` (float32), from which both factors' gradients follow by small multiplies
    (``scale * M @ A.T`` and ``scale * B.T @ M``). The rank-r products over every token that they replace read the
    activations or their gradient again each (five of them) at a few percent of the chip's speed. The merged
    weight is rounded to the weight's dtype once, as ComfyUI rounds it when it applies the trained LoRA; used for
    float16 and float32 weights only (bfloat16 would round the adapter's early, small steps too coarsely). The
    arithmetic is ``_merged_forward``'s and ``_merged_backward``'s for one layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float, merged=None):
        return _merged_forward(ctx, x, (scale,), merged, (weight,), (bias,), (a,), (b,))

    @staticmethod
    def backward(ctx, grad):
        grad_x, grads_a, grads_b = _merged_backward(ctx, grad, ctx.needs_input_grad[3] or ctx.needs_input_grad[4],
                                                    ctx.needs_input_grad[0])
        return grad_x, None, None, grads_a[0], grads_b[0], None, None


class _MergedLoRAStack(torch.autograd.Function):
    """``_MergedLoRALinear`` for n layers of one shape that read the same input (a self-attention's q, k and v; a
    cross-attention's k and v): ``x @ [W_1'; ...; W_n'].T`` as one multiply. Backward takes the output's gradient
    whole (the caller's split gives it back as one tensor): the input's gradient is one multiply instead of n and
    the n - 1 additions of their results, ``M`` one multiply over all n outputs (n times the tiles of one layer's,
    which keeps the chip busy without splitting the sum), and the factors' gradients two batched multiplies."""

    @staticmethod
    def forward(ctx, x, scales, merged, *tensors):
        n = len(scales)
        return _merged_forward(ctx, x, scales, merged, tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n],
                               tensors[3 * n:])

    @staticmethod
    def backward(ctx, grad):
        n = len(ctx.scales)
        grad_x, grads_a, grads_b = _merged_backward(ctx, grad, any(ctx.needs_input_grad[3 + 2 * n:]),
                                                    ctx.needs_input_grad[0])
        return (grad_x, None, None, *(None,) * (2 * n), *grads_a, *grads_b)


def _eligible_to_merge(m: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``m`` is a peft layer given ``_fused_forward`` with merging allowed (lora_compute "merged") that
    would take its fast path for ``x``, and that may be computed without calling it (no hooks)."""
    own = m.__dict__.get("forward")
    return bool(getattr(own, "lora_merge", False)) and without_hooks(m) and own.eligible(x)


def _will_merge(m: torch.nn.Module, x: torch.Tensor, few_tokens: bool = False) -> bool:
    """``_eligible_to_merge``, and merging pays for ``x`` (``_merge_pays``)."""
    return _eligible_to_merge(m, x) and _merge_pays(x, m.base_layer.weight, few_tokens)


def stacked_projection(x: torch.Tensor, layers, few_tokens: bool = False) -> torch.Tensor | None:
    """The outputs of ``layers`` for the same input ``x``, side by side along the last axis (split them with
    ``torch.split``, whose backward hands the gradient back whole), computed by ``_MergedLoRAStack``; None where
    that is not the computation each layer's own forward would do (the merged path: ``_fused_forward``,
    ``_merge_pays``), or the layers differ in shape, dtype, rank or having a bias: call them one by one then. With
    ``few_tokens`` also where each layer alone would take the fused product for want of tokens (a cross-attention's
    k and v over the text's 77: the same sum, the merged weight rounded once as where merging pays; one multiply
    and one weight-shaped product for both layers instead of five launches each way for each)."""
    layers = list(layers)
    if len(layers) < 2 or not all(_will_merge(m, x, few_tokens) for m in layers):
        return None
    bases = [m.base_layer for m in layers]
    w0, a0 = bases[0].weight, layers[0].lora_A[ADAPTER].weight
    if any(b.weight.shape != w0.shape or b.weight.dtype != w0.dtype or (b.bias is None) != (bases[0].bias is None)
           or m.lora_A[ADAPTER].weight.shape != a0.shape for b, m in zip(bases, layers)):
        return None
    return _MergedLoRAStack.apply(
        x, tuple(float(m.scaling[ADAPTER]) for m in layers), _premerged_run(layers),
        *(b.weight for b in bases), *(b.bias for b in bases),
        *(m.lora_A[ADAPTER].weight for m in layers), *(m.lora_B[ADAPTER].weight for m in layers))


def _merged_from(m) -> tuple:
    """What a merged weight of ``m`` was made from: its factors, their in-place versions and its scale."""
    a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
    return a, b, a._version, b._version, float(m.scaling[ADAPTER])


def _same_source(x: tuple, y: tuple) -> bool:
    return x[0] is y[0] and x[1] is y[1] and x[2:] == y[2:]


def premerge(x: torch.Tensor, layers, few_tokens: bool = False) -> int:
    """Merge, in one launch per weight shape (``lora_merge``), the adapters of those of ``layers`` that would
    merge for an input like ``x`` (``_will_merge`` with ``few_tokens`` as given; layers whose input has ``x``'s
    tokens and features: a transformer block's attention projections for its hidden states, a cross-attention's k
    and v for the text). Each of them uses its merged weight at its next call that takes the merged path, once, if
    its factors and scale are still those merged (the same tensors, not changed in place since); meant for calls
    right after (a block's own), with ``drop_premerged`` after them for what was not taken. Layers of one shape
    are written side by side in the order given, so q, k and v given together serve ``stacked_projection`` as they
    are. Returns how many layers were merged; 0 where the kernel cannot run (each layer then merges its own, as
    without this)."""
    from . import lora_merge

    if not layers:
        return 0
    chosen = [m for m in layers if _will_merge(m, x, few_tokens) and m.base_layer.weight.shape[-1] == x.shape[-1]]
    groups: dict = {}
    for m in chosen:
        groups.setdefault((tuple(m.base_layer.weight.shape), m.base_layer.weight.dtype), []).append(m)
    done = 0
    for group in groups.values():
        for start in range(0, len(group), lora_merge.MAX_LAYERS):
            part = group[start:start + lora_merge.MAX_LAYERS]
            weights = [m.base_layer.weight for m in part]
            factors_a = [m.lora_A[ADAPTER].weight for m in part]
            factors_b = [m.lora_B[ADAPTER].weight for m in part]
            if not lora_merge.usable(weights, factors_a, factors_b):
                continue
            merged = lora_merge.merge(weights, factors_a, factors_b, [float(m.scaling[ADAPTER]) for m in part])
            for k, m in enumerate(part):
                m.__dict__["forward"].premerged = (merged, k, _merged_from(m))
            done += len(part)
    return done


def drop_premerged(layers) -> None:
    """Forget merged weights ``premerge`` left for ``layers`` that were not called (a caller's ``finally``)."""
    for m in layers:
        own = m.__dict__.get("forward")
        if own is not None and getattr(own, "premerged", None) is not None:
            own.premerged = None


def _take_premerged(m):
    """``(buffer, index)`` of ``m``'s merged weight from ``premerge`` if it is still good, else None; taken once."""
    own = m.__dict__.get("forward")
    found = getattr(own, "premerged", None)
    if found is None:
        return None
    own.premerged = None
    merged, k, source = found
    return (merged, k) if _same_source(source, _merged_from(m)) else None


def _premerged_run(layers):
    """The ``[n, out, in]`` merged weights of ``layers`` if ``premerge`` left them side by side in order, else
    None (each layer's merged weight is then computed with the others')."""
    found = [_take_premerged(m) for m in layers]
    if any(f is None for f in found) or any(f[0] is not found[0][0] for f in found):
        return None
    first = found[0][1]
    if [f[1] for f in found] != list(range(first, first + len(found))):
        return None
    return found[0][0][first:first + len(found)]


def _merge_pays(x: torch.Tensor, weight: torch.Tensor, few_tokens: bool = False) -> bool:
    """Whether merging the adapter into the weight moves less memory than the rank-r products over the tokens:
    the merge costs about 16 bytes per weight value (the merged copy, M, and the two reads of M), the rank-r
    products about 6 more per token and feature than the merged path's passes (``few_tokens``: merge whatever
    the tokens). Never for bfloat16 weights, whose rounding would swallow the adapter's early, small steps. Shapes
    are fixed in a run, so a CUDA graph sees one choice per layer."""
    out_f, in_f = weight.shape
    tokens = x.numel() // max(1, in_f)
    return weight.dtype in (torch.float16, torch.float32) and (
        few_tokens or 3 * tokens * (in_f + out_f) > 8 * in_f * out_f)


def without_hooks(m: torch.nn.Module) -> bool:
    """No hook, of ``m`` or global, forward or backward, would run around a call of ``m``."""
    from torch.nn.modules import module as nn_module

    return (not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
            and not m._backward_pre_hooks
            and not any(getattr(nn_module, name, None) for name in (
                "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks")))


def runs_plain_forward(m: torch.nn.Module) -> bool:
    """No hook and no per-instance forward stands between a call of ``m`` and its class's forward (a fast path
    that computes the class's forward itself would skip them)."""
    return without_hooks(m) and "forward" not in m.__dict__


def _is_plain_linear(m: torch.nn.Module) -> bool:
    """True for ``torch.nn.Linear`` itself, called without hooks: its forward is ``F.linear(x, weight, bias)``
    (a host with linear classes of its own passes its own test, ``Backbone.plain_linear``)."""
    return type(m).forward is torch.nn.Linear.forward and runs_plain_forward(m)


def _fused_forward(m, plain: Callable[[torch.nn.Module], bool], merge: bool = False):
    """The forward of the peft layer ``m`` through ``_FusedLoRALinear`` where that is the same computation (one
    active adapter, no dropout, a plain frozen linear base in the activations' dtype, no autocast), or with
    ``merge`` through ``_MergedLoRALinear`` where that moves less memory (``_merge_pays``); peft's own forward
    otherwise."""
    peft_forward = m.forward

    def eligible(x: torch.Tensor) -> bool:
        base = m.base_layer
        return not (m.merged or m.disable_adapters or list(m.active_adapters) != [ADAPTER]
                    or not isinstance(m.lora_dropout[ADAPTER], torch.nn.Identity) or not plain(base)
                    or x.dtype != base.weight.dtype or base.weight.requires_grad
                    or (base.bias is not None and base.bias.requires_grad)
                    or torch.is_autocast_enabled(x.device.type))

    def forward(x, *args, **kwargs):
        if args or kwargs or not eligible(x):
            return peft_forward(x, *args, **kwargs)
        base = m.base_layer
        if merge and _merge_pays(x, base.weight):
            found = _take_premerged(m)
            merged = found[0][found[1]:found[1] + 1] if found is not None else None
            return _MergedLoRALinear.apply(x, base.weight, base.bias, m.lora_A[ADAPTER].weight,
                                           m.lora_B[ADAPTER].weight, float(m.scaling[ADAPTER]), merged)
        return _FusedLoRALinear.apply(x, base.weight, base.bias, m.lora_A[ADAPTER].weight,
                                      m.lora_B[ADAPTER].weight, float(m.scaling[ADAPTER]))

    # read by stacked_projection and premerge; premerged: a weight merged ahead of the call (premerge)
    forward.eligible, forward.lora_merge, forward.premerged = eligible, merge, None
    return forward


@contextmanager
def lora_adapters(root: torch.nn.Module, targets: Iterable[str], rank: int, alpha: float, seed: int,
                  product: str = "fp32", plain_linear: Callable[[torch.nn.Module], bool] | None = None
                  ) -> Iterator[list[torch.nn.Parameter]]:
    """Add LoRA adapters to the ``targets`` of ``root``; yields the trainable parameters (float32).

    ``product``, where the LoRA product is computed: "fp32" (peft casts the activations to the factors'
    float32), "activations" (the factors are cast to the activations' dtype: half-precision activations stay
    half), "autocast" (left to autocast, which picks each matmul's precision), "fused" (as "activations",
    with the product added inside the base layer's matrix multiplies: ``_FusedLoRALinear``; where that does
    not apply, a layer runs as "activations") or "merged" (as "fused", but layers with many tokens for their
    weight's size multiply by the weight with the adapter merged in: ``_MergedLoRALinear``). ``plain_linear``:
    which base layers compute ``F.linear`` only (the host's own linear classes may; default: ``torch.nn.Linear``
    itself)."""
    from peft import LoraConfig, inject_adapter_in_model

    if product not in PRODUCTS:
        raise ValueError(f"product must be one of {', '.join(PRODUCTS)} (got {product!r})")

    names = _fresh_targets(root, targets)
    if not names:
        raise ValueError(f"no module named {', '.join(targets)} in {type(root).__name__}")
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, bias="none",
                        target_modules=list(targets), init_lora_weights=True)
    # peft's initialiser draws from the global RNG: seed it without disturbing the host's random state.
    devices = [d for d in {p.device for p in root.parameters()} if d.type == "cuda"]
    had_config = "peft_config" in root.__dict__
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(seed))
            inject_adapter_in_model(config, root, adapter_name=ADAPTER)
        params = []
        for _, m in _lora_modules(root):
            for sub in (m.lora_A[ADAPTER], m.lora_B[ADAPTER]):
                sub.float()
                if product in ("activations", "fused", "merged") and type(sub) is torch.nn.Linear:
                    sub.__class__ = _CastWeightLinear
                for p in sub.parameters():
                    p.requires_grad_(True)
                    params.append(p)
            # peft casts the activations to float32 only for "fp32": under autocast the matmuls pick their own
            # precision (a cast first would only add memory traffic), and "activations" casts the factors instead
            m.cast_input_dtype_enabled = product == "fp32"
            if product in ("fused", "merged"):
                m.forward = _fused_forward(m, plain_linear or _is_plain_linear, merge=product == "merged")
        yield params
    finally:
        remove_lora(root)
        if not had_config:
            root.__dict__.pop("peft_config", None)  # peft leaves its config on the model: take it back too


def remove_lora(root: torch.nn.Module) -> None:
    """Replace every peft LoRA wrapper under ``root`` by the layer it wraps."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, m) for name, m in root.named_modules() if isinstance(m, LoraLayer)]
    for name, m in wrapped:
        m.__dict__.pop("forward", None)  # the fused forward (it refers to the wrapper: freed without a cycle)
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, m.get_base_layer())


def lora_weights(root: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Module path -> (down [r, in], up [out, r], alpha) of every adapter under ``root``."""
    out = {}
    for name, m in _lora_modules(root):
        out[name] = (m.lora_A[ADAPTER].weight.detach().float().cpu(),
                     m.lora_B[ADAPTER].weight.detach().float().cpu(),
                     float(m.lora_alpha[ADAPTER]))
    return out


def _positions(args) -> int:
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if x is None:
        return 0
    return int(x.shape[1]) if x.ndim == 3 else int(x.shape[-1] * x.shape[-2]) if x.ndim == 4 else 0


@contextmanager
def gradient_checkpointing(root: torch.nn.Module, enabled: bool, blocks: Iterable[str] = CHECKPOINT_BLOCKS,
                           min_tokens: int = 0) -> Iterator[int]:
    """Recompute each block's activations in backward instead of keeping them. Yields the block count.

    With ``min_tokens`` only calls whose input has at least that many positions (H*W of a feature map,
    or the sequence length) are recomputed: the full-resolution blocks hold most of the activation
    memory for a small share of the compute. Shapes are fixed per run, so a CUDA graph sees one choice."""
    patched = []  # (module, the instance forward it had: a training-only fast forward, or None)
    blocks = set(blocks)
    if enabled:
        for m in root.modules():
            own = m.__dict__.get("forward")
            # a block's training-only forward (fast_frozen_layers marks them ``fast_layer``) is recomputed too
            if type(m).__name__ in blocks and (own is None or getattr(own, "fast_layer", False)):
                def forward(*args, _inner=m.forward, **kwargs):
                    if not torch.is_grad_enabled() or (min_tokens and _positions(args) < min_tokens):
                        return _inner(*args, **kwargs)
                    # no RNG to replay (no dropout), and saving RNG state is not allowed in a CUDA graph
                    return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False,
                                                             preserve_rng_state=False, **kwargs)

                m.forward = forward
                patched.append((m, own))
    try:
        yield len(patched)
    finally:
        for m, own in patched:
            if own is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = own
