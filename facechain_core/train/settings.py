"""Training settings: one dataclass, its defaults read from ``data/train_defaults.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .. import data_files
from ..errors import FaceChainError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# the attention_backend choices: the name given -> torch's SDPBackend member (auto: PyTorch's own choice)
ATTENTION_BACKENDS = {"auto": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                      "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


# where the LoRA product is computed: see lora_layers.lora_adapters ("fp32" and "activations" matter for half
# precision runs only; "fused" adds it inside the base layers' matrix multiplies wherever it can, "merged" also
# merges it into a copy of the weight for each step where that moves less memory)
LORA_COMPUTE = ("merged", "fused", "activations", "fp32")


def defaults() -> dict:
    return data_files.settings("train_defaults.json")


def _default(name):
    return field(default_factory=lambda: defaults()[name])


@dataclass
class TrainSettings:
    rank: int = _default("rank")
    alpha: float | None = _default("alpha")  # None: alpha = rank (LoRA scale 1, as FaceChain trained)
    learning_rate: float = _default("learning_rate")  # the batch-1 rate; see effective_lr
    lr_batch_scaling: str = _default("lr_batch_scaling")  # "sqrt", "linear" or "none"
    lr_schedule: str = _default("lr_schedule")  # "cosine" or "constant"
    warmup_fraction: float = _default("warmup_fraction")
    samples: int = _default("samples")  # total training samples seen: the amount of work
    batch_size: int = _default("batch_size")
    flip: bool = _default("flip")
    seed: int = _default("seed")
    train_text_encoder: bool = _default("train_text_encoder")
    text_encoder_lr_ratio: float = _default("text_encoder_lr_ratio")
    precision: str = _default("precision")
    amp_mode: str = _default("amp_mode")  # "auto": run in the weights' dtype when it is the compute dtype
    gradient_checkpointing: bool = _default("gradient_checkpointing")
    compile: bool = _default("compile")
    cuda_graphs: bool = _default("cuda_graphs")  # capture forward+backward once, replay it every step
    checkpoint_blocks: list = _default("checkpoint_blocks")  # block classes recomputed in backward
    # with gradient_checkpointing off, blocks working on at least this many latent positions are still
    # recomputed (0: none); 4096 = the 64x64 latents of a 512 px image
    high_res_checkpoint_tokens: int = _default("high_res_checkpoint_tokens")
    compile_mode: str = _default("compile_mode")  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    # convolutions in NHWC layout (conv weights rewritten for the run); "auto": when the GroupNorm kernels run
    channels_last: bool | str = _default("channels_last")
    attention_backend: str = _default("attention_backend")  # SDPA kernel: auto, flash, efficient, cudnn, math
    lora_compute: str = _default("lora_compute")  # LORA_COMPUTE: merged, fused, or (half precision) fp32/activations
    compile_cache: bool = _default("compile_cache")  # keep torch.compile's results on disk between runs
    fast_frozen_layers: bool = _default("fast_frozen_layers")  # host's training-only forwards: Backbone.fast_layers
    # with fast_frozen_layers: GroupNorm (and a SiLU after it) by the pack's kernels, in the map's own layout
    group_norm_kernels: bool = _default("group_norm_kernels")
    geglu_kernels: bool = _default("geglu_kernels")  # with fast_frozen_layers: GEGLU by the pack's kernels
    # with fast_frozen_layers: the transformer blocks' LayerNorms, with the residual additions before them, by the
    # pack's kernels
    layer_norm_kernels: bool = _default("layer_norm_kernels")
    # with layer_norm_kernels and lora_compute "merged": each transformer block's adapters merged ahead in one launch
    # (one more for the text's k and v), and the projections of one input (q, k, v; k, v of the text) as one multiply
    block_merge: bool = _default("block_merge")
    # with fast_frozen_layers: the UNet's up path joins its channels-last maps and skip connections by the pack's
    # kernels (channel_cat) instead of torch.cat
    concat_kernels: bool = _default("concat_kernels")
    cudnn_benchmark: bool = _default("cudnn_benchmark")  # let cuDNN time its convolution algorithms per shape
    weight_decay: float = _default("weight_decay")
    adam_betas: tuple = _default("adam_betas")
    adam_eps: float = _default("adam_eps")
    max_grad_norm: float = _default("max_grad_norm")
    save_dtype: str = _default("save_dtype")
    unet_targets: list = _default("unet_targets")
    text_encoder_targets: list = _default("text_encoder_targets")

    def with_(self, **changes) -> "TrainSettings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha in (None, 0) else self.alpha)

    @property
    def steps(self) -> int:
        return max(1, math.ceil(self.samples / self.batch_size))

    @property
    def effective_lr(self) -> float:
        scale = {"sqrt": math.sqrt(self.batch_size), "linear": float(self.batch_size), "none": 1.0}
        return self.learning_rate * scale[self.lr_batch_scaling]

    def validate(self) -> "TrainSettings":
        problems = []
        if not 1 <= int(self.rank) <= 256:
            problems.append(f"rank must be 1-256 (got {self.rank})")
        if not (0 < float(self.learning_rate) < 1):
            problems.append(f"learning rate must be between 0 and 1 (got {self.learning_rate})")
        if int(self.batch_size) < 1:
            problems.append(f"batch size must be at least 1 (got {self.batch_size})")
        if int(self.samples) < 1:
            problems.append(f"samples must be at least 1 (got {self.samples})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        if self.lr_batch_scaling not in ("sqrt", "linear", "none"):
            problems.append(f"lr_batch_scaling must be sqrt, linear or none (got {self.lr_batch_scaling!r})")
        if not isinstance(self.attention_backend, str) or self.attention_backend not in ATTENTION_BACKENDS:
            problems.append(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)} "
                            f"(got {self.attention_backend!r})")
        if self.lora_compute not in LORA_COMPUTE:
            problems.append(f"lora_compute must be one of {', '.join(LORA_COMPUTE)} (got {self.lora_compute!r})")
        if self.channels_last not in (True, False, "auto"):
            problems.append(f"channels_last must be true, false or auto (got {self.channels_last!r})")
        if self.lr_schedule not in ("cosine", "constant"):
            problems.append(f"lr_schedule must be cosine or constant (got {self.lr_schedule!r})")
        if problems:
            raise FaceChainError("Bad training settings: " + "; ".join(problems) + ".")
        return self
