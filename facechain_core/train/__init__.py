"""Face LoRA training: the loop (``trainer``), peft adapters on a borrowed model (``lora_layers``), captions,
settings and saving. No ComfyUI import: the ComfyUI node and the standalone command each build a
``Backbone`` for the same loop."""

from .captions import require_images, resolve_captions
from .save import check_free, lora_file, save_lora, weights_fingerprint
from .settings import TrainSettings, defaults
from .trainer import Backbone, TrainResult, choose_precision, train_lora

__all__ = ["Backbone", "TrainResult", "TrainSettings", "check_free", "choose_precision", "defaults", "lora_file",
           "require_images", "resolve_captions", "save_lora", "train_lora", "weights_fingerprint"]
