"""Frozen configuration dataclasses: what a run is, independent of how it was asked for.

`run.py` turns absl flags into these; the library only ever sees them (or plain arguments).
"""

from __future__ import annotations

import dataclasses

# The choices of each setting, here (no TensorFlow import) so that flags/definitions.py offers
# them without importing TensorFlow; the modules that act on them use these names.
MODES = ("train", "eval", "train_then_eval")
TRAIN_MODES = ("pretrain", "finetune", "distill")
MIXED_PRECISION_POLICIES = ("none", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "tpu", "multi_worker", "mirrored", "one_device")  # distribute
OPTIMIZERS = ("momentum", "adam", "lars")  # optimizers
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")  # model
LEARNING_RATE_SCALINGS = ("linear", "sqrt")  # schedules
IMAGE_FOLDER = "image_folder"  # datasets
BUILT_IN_DATASETS = ("deadleaves10", "deadleaves10_color", "shapes10")  # datasets


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Encoder and heads.

  `num_classes=0` means no supervised head.

  Two settings of the run live here, and only here, because the model cannot be rebuilt
  without them (export manifests, a teacher's or a converted model's config record them):
  * `image_size`: the side of the model's input. It decides the stem, as in the reference (the
    CIFAR stem, 3x3 stride 1 and no max pool, for 32 px or less); the data pipelines make their
    training views and evaluation crops this size.
  * `train_mode`: the objective (`TRAIN_MODES`). The forward pass depends on it: pretraining
    puts a stop-gradient in front of the supervised head, and only fine-tuning may freeze
    layers. The training step reads it here too, so model and step cannot disagree.
  """

  resnet_depth: int = 50
  # Channels round(c * w): 1, 2, 4 or a fraction (resnet.channels). An integral value is kept
  # as an int (2.0 -> 2), however it was spelt, so configs and manifests say 2 as the reference.
  width_multiplier: float = 1
  image_size: int = 224
  sk_ratio: float = 0.0
  se_ratio: float = 0.0
  batch_norm_decay: float = 0.9
  zero_init_residual: bool = True  # the reference's; False trains faster in short runs
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
    width = self.width_multiplier
    if isinstance(width, float) and width.is_integer():
      object.__setattr__(self, "width_multiplier", int(width))  # frozen: set once, here
    if self.train_mode not in TRAIN_MODES:
      raise ValueError(f"train_mode must be one of {TRAIN_MODES}, got {self.train_mode!r}")
    if self.train_mode == "pretrain" and self.fine_tune_after_block != -1:
      raise ValueError(
        "fine_tune_after_block must be -1 when pretraining (layer freezing is "
        f"for fine-tuning), got {self.fine_tune_after_block}"
      )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to read and how to augment it (the image side is `ModelConfig.image_size`)."""

  dataset: str = "imagenet2012"
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "validation"
  color_jitter_strength: float = 1.0
  use_blur: bool = True
  # Training views (pretraining and fine-tuning): the random crop's smallest area (the
  # reference's 0.08) and whether views are mirrored (the reference flips with p = 0.5).
  min_scale: float = 0.08
  horizontal_flip: bool = True
  cache_dataset: bool = False
  # Few labels (datasets.label_subset): a class-balanced fraction in (0, 1], or a file of ids.
  train_label_fraction: float = 1.0
  train_label_file: str | None = None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer and learning-rate schedule (`learning_rate` is per 256 examples)."""

  optimizer: str = "lars"
  learning_rate: float = 0.3
  learning_rate_scaling: str = "linear"
  warmup_epochs: float = 10
  weight_decay: float = 1e-6
  momentum: float = 0.9


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The run: length, checkpoints, evaluation, export.

  The objective is `ModelConfig.train_mode` (see there why).
  """

  model_dir: str = ""
  mode: str = "train"  # one of MODES
  lineareval_while_pretraining: bool = True
  temperature: float = 0.1
  hidden_norm: bool = True
  train_batch_size: int = 512
  train_epochs: int = 100
  train_steps: int = 0
  eval_batch_size: int = 256
  eval_steps: int = 0
  checkpoint_epochs: int = 1
  checkpoint_steps: int = 0
  keep_checkpoint_max: int = 5
  keep_hub_module_max: int = 1
  checkpoint: str | None = None
  zero_init_logits_layer: bool = False
  eval_name: str | None = None  # the reference's flag, kept for its command lines; never read
  eval_timeout_s: float = 0.0  # --mode=eval: longest wait for a new checkpoint; 0: no limit
  seed: int = 0
  deterministic: bool = False
  # kNN monitor (knn.knn_accuracy); 0 steps: off.
  knn_eval_every_n_steps: int = 0
  knn_k: int = 200
  knn_temperature: float = 0.07
  # Distillation (SimCLRv2 section 2): a fine-tuned teacher's softened predictions as targets;
  # loss = (1 - distill_label_weight) * distillation + distill_label_weight * labelled loss.
  teacher_checkpoint: str | None = None
  distill_temperature: float = 1.0
  distill_label_weight: float = 0.0


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """Where and how it runs."""

  strategy: str = "auto"
  cpu_replicas: int = 0
  use_tpu: bool = True
  tpu_name: str | None = None
  tpu_zone: str | None = None
  gcp_project: str | None = None
  master: str | None = None
  mixed_precision: str = "none"  # one of MIXED_PRECISION_POLICIES
  jit_compile: bool = False
  augment_on_device: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run needs; `model.num_classes` is filled in once the dataset is known."""

  data: DataConfig
  model: ModelConfig
  optim: OptimConfig
  train: TrainConfig
  runtime: RuntimeConfig
