"""Frozen configuration dataclasses: what a run is, independent of how it was asked for.

`run.py` turns absl flags into these; the library only ever sees them (or plain arguments).
"""
from __future__ import annotations

import dataclasses

TRAIN_MODES = ("pretrain", "finetune")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Encoder and heads.

  `image_size` decides the stem: the CIFAR stem (3x3 stride 1, no max pool) for 32 px or less,
  as the reference does. `num_classes=0` means no supervised head.
  """
  resnet_depth: int = 50
  width_multiplier: int = 1
  image_size: int = 224
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  batch_norm_decay: float = 0.9
  global_bn: bool = True
  proj_head_mode: str = "nonlinear"
  proj_out_dim: int = 128
  num_proj_layers: int = 3
  ft_proj_selector: int = 0
  num_classes: int = 0
  train_mode: str = "pretrain"
  fine_tune_after_block: int = -1

  @property
  def use_cifar_stem(self) -> bool:
    return self.image_size <= 32

  def __post_init__(self):
    if self.train_mode not in TRAIN_MODES:
      raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
    if self.train_mode == "pretrain" and self.fine_tune_after_block != -1:
      raise ValueError("fine_tune_after_block must be -1 when pretraining (layer freezing is "
                       f"for fine-tuning), got {self.fine_tune_after_block}")
