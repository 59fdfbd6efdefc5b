"""Frozen configuration dataclasses: what a run is, independent of how it was asked for.

`run.py` turns absl flags into these; the library only ever sees them (or plain arguments).
"""

from __future__ import annotations

import dataclasses
import math

# The choices of each setting, here (no TensorFlow import) so that flags/definitions.py offers
# them without importing TensorFlow; the modules that act on them use these names.
MODES = ("train", "eval", "train_then_eval")
TRAIN_MODES = ("pretrain", "finetune", "distill")
MIXED_PRECISION_POLICIES = ("none", "mixed_bfloat16", "mixed_float16")
STRATEGIES = ("auto", "tpu", "multi_worker", "mirrored", "one_device")  # distribute
OPTIMIZERS = ("momentum", "adam", "lars")  # optimizers
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")  # model
CROP_INTERPOLATIONS = ("bicubic", "bilinear")  # augment
LEARNING_RATE_SCALINGS = ("linear", "sqrt")  # schedules
IMAGE_FOLDER = "image_folder"  # data.sources
BUILT_IN_DATASETS = ("deadleaves10", "deadleaves10_color", "shapes10")  # data.sources
# ModelConfig fields (and flags of the same names) that decide what a trained model computes,
# beside its weights: an evaluation must give the run's values (rundir.EVAL_DEFINING) and an
# export's manifest is compared by them (export.manifest_differences).
MODEL_DEFINING = (
  "image_size",
  "resnet_depth",
  "width_multiplier",
  "sk_ratio",
  "se_ratio",
  "batch_norm_decay",
  "proj_head_mode",
  "proj_out_dim",
  "num_proj_layers",
  "ft_proj_selector",
)

# Subtracted from an example's similarity with itself in the contrastive loss (losses.py):
# exp(-1e9) underflows to exactly 0 in float32. Here so that the flags can bound --temperature.
LARGE_NUM = 1e9
# The smallest normal float32. Smaller numbers are subnormal, which TensorFlow's CPU kernels
# flush to zero: a temperature below it divides by 0 (inf, NaN) whatever the vectors.
FLOAT32_TINY = 1.1754944e-38
# float32 exp(x) is exactly 0 for x < -104 (below the smallest subnormal).
_EXP_UNDERFLOW = 104.0
# Global batches below this leave each anchor fewer than 2 * 15 negatives: a weak contrast.
FEW_NEGATIVES_BATCH = 16
# The largest --image_size. Activations grow with the pixels: ResNet-50 holds ~100 MB per
# 224 px view in training, so one two-view example at 2048 px needs ~16 GB, an accelerator's
# memory; beyond it a run fails with TensorFlow's out-of-memory text instead of one line.
MAX_IMAGE_SIZE = 2048


def min_temperature(hidden_norm: bool) -> float:
  """The smallest temperature T at which the contrastive loss is exact and finite in float32.

  The loss's logits are sim / T, and an example's similarity with itself is masked by
  subtracting LARGE_NUM (losses.contrastive_loss). With `hidden_norm`, rows are unit vectors:
  |sim| <= 1, so the logits lie in [-1/T, 1/T] and the masked self-logit 1/T - LARGE_NUM stays
  at least LARGE_NUM - 2/T below every other logit. The mask removes the self-similarity from
  the softmax (exp underflows to 0) only while LARGE_NUM - 2/T > 104: T >= 2 / (LARGE_NUM -
  104), about 2e-9. Below it the self-similarity counts as a negative and, as T falls further,
  the loss and its gradients grow as 1/T until weights or activations overflow (NaN).
  Without `hidden_norm` the logits are h.h' / T with |h| unbounded: no T bounds them for every
  run (the training's non-finite check stops one that overflows); only a T below the smallest
  normal float32 fails for all data (it is flushed to 0).
  """
  if hidden_norm:
    return 2.0 / (LARGE_NUM - _EXP_UNDERFLOW)
  return FLOAT32_TINY


def channels(base, width_multiplier):
  """Channel count `round(base * width_multiplier)` for a reference count base (64..512).

  Integer multipliers give the reference's `base * width_multiplier` exactly. A bottleneck's 4x
  output is `4 * channels(base, w)`, as the reference computes it, so fractional widths build the
  networks the reference's code builds when its multiplier rounds the same way.
  """
  return int(round(base * width_multiplier))


def check_width(width_multiplier, sk_ratio=0.0):
  """ValueError unless every channel count of the network comes out at least 1.

  The smallest count is the stem's `round(64 w)`, halved in the selective-kernel (ResNet-D) stem.
  """
  smallest = 2 if sk_ratio > 0 else 1
  if (
    isinstance(width_multiplier, bool)
    or not isinstance(width_multiplier, (int, float))
    or not math.isfinite(width_multiplier)
    or channels(64, width_multiplier) < smallest
  ):
    raise ValueError(
      f"width_multiplier must be a positive number with round(64 * w) >= "
      f"{smallest}{' (selective kernels halve the stem)' if smallest > 1 else ''},"
      f" got {width_multiplier}"
    )


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
  # Channels round(c * w): 1, 2, 4 or a fraction (`channels` above). An integral value is kept
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
  # The crops' resize: the reference's bicubic, or bilinear (cheaper on the host).
  crop_interpolation: str = "bicubic"
  cache_dataset: bool = False
  # Few labels (label_subsets.label_subset): a class-balanced fraction in (0, 1], or a file of ids.
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
  # A tf.data service dispatcher, grpc://HOST:PORT, whose workers run the pretraining input
  # (tf_simclr.data_service); None: the input runs on this host.
  data_service: str | None = None


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything a run needs; `model.num_classes` is filled in once the dataset is known."""

  data: DataConfig
  model: ModelConfig
  optim: OptimConfig
  train: TrainConfig
  runtime: RuntimeConfig
