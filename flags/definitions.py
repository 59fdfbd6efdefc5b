"""Every flag of the reference `tf2/run.py` (same name, default, meaning), then ours.

Only this module and run.py read flags; `to_config` turns them into tf_simclr's dataclasses.
"""

from __future__ import annotations

import dataclasses
import math
import re

from absl import flags
from absl import logging

from tf_simclr import config as config_lib

# --- The reference's flags (google-research/simclr tf2/run.py), unchanged. ---
flags.DEFINE_float("learning_rate", 0.3, "Initial learning rate per batch size of 256.")
flags.DEFINE_enum(
  "learning_rate_scaling",
  "linear",
  config_lib.LEARNING_RATE_SCALINGS,
  "How to scale the learning rate as a function of batch size.",
)
flags.DEFINE_float("warmup_epochs", 10, "Number of epochs of warmup.")
flags.DEFINE_float("weight_decay", 1e-6, "Amount of weight decay to use.")
flags.DEFINE_float("batch_norm_decay", 0.9, "Batch norm decay parameter.")
flags.DEFINE_integer("train_batch_size", 512, "Batch size for training.")
flags.DEFINE_string("train_split", "train", "Split for training.")
flags.DEFINE_integer("train_epochs", 100, "Number of epochs to train for.")
flags.DEFINE_integer(
  "train_steps", 0, "Number of steps to train for. If provided, overrides train_epochs."
)
flags.DEFINE_integer(
  "eval_steps", 0, "Number of steps to eval for. If not provided, evals over entire dataset."
)
flags.DEFINE_integer("eval_batch_size", 256, "Batch size for eval.")
flags.DEFINE_integer("checkpoint_epochs", 1, "Number of epochs between checkpoints/summaries.")
flags.DEFINE_integer(
  "checkpoint_steps",
  0,
  "Number of steps between checkpoints/summaries. If provided, overrides checkpoint_epochs.",
)
flags.DEFINE_string("eval_split", "validation", "Split for evaluation.")
flags.DEFINE_string(
  "dataset",
  "imagenet2012",
  "Name of a dataset: any tensorflow-datasets name, "
  f"'{config_lib.IMAGE_FOLDER}' (images under data_dir/<split>/<class>/), or a "
  f"built-in ({', '.join(config_lib.BUILT_IN_DATASETS)}: generated, no download).",
)
flags.DEFINE_bool(
  "cache_dataset",
  False,
  "Whether to cache the entire dataset in memory. If the "
  "dataset is ImageNet, this is a very bad idea, but for smaller datasets it can "
  "improve performance.",
)
flags.DEFINE_enum("mode", "train", config_lib.MODES, "Whether to perform training or evaluation.")
flags.DEFINE_enum(
  "train_mode",
  "pretrain",
  config_lib.TRAIN_MODES,
  "The train mode controls different objectives and trainable components.",
)
flags.DEFINE_bool(
  "lineareval_while_pretraining", True, "Whether to finetune supervised head while pretraining."
)
flags.DEFINE_string(
  "checkpoint",
  None,
  "Loading from the given checkpoint for fine-tuning if a "
  "finetuning checkpoint does not already exist in model_dir.",
)
flags.DEFINE_bool(
  "zero_init_logits_layer",
  False,
  "If True, zero initialize layers after avg_pool for supervised learning.",
)
flags.DEFINE_integer(
  "fine_tune_after_block",
  -1,
  "The layers after which block that we will "
  "fine-tune. -1 means fine-tuning everything. 0 means fine-tuning after stem "
  "block. 4 means fine-tuning just the linear head.",
)
flags.DEFINE_string(
  "master",
  None,
  "Address/name of the TensorFlow master to use. By default, use an in-process master.",
)
flags.DEFINE_string("model_dir", None, "Model directory for training.")
flags.DEFINE_string("data_dir", None, "Directory where dataset is stored.")
flags.DEFINE_bool(
  "use_tpu",
  True,
  "Whether to run on TPU (with --strategy=auto: used when a TPU "
  "is named with --tpu_name/--master or attached to this host).",
)
flags.DEFINE_string(
  "tpu_name",
  None,
  "The Cloud TPU to use for training. This should be either "
  "the name used when creating the Cloud TPU, or a grpc://ip.address.of.tpu:8470 "
  "url.",
)
flags.DEFINE_string("tpu_zone", None, "[Optional] GCE zone where the Cloud TPU is located in.")
flags.DEFINE_string(
  "gcp_project", None, "[Optional] Project name for the Cloud TPU-enabled project."
)
flags.DEFINE_enum("optimizer", "lars", config_lib.OPTIMIZERS, "Optimizer to use.")
flags.DEFINE_float("momentum", 0.9, "Momentum parameter.")
flags.DEFINE_string(
  "eval_name",
  None,
  "Name for eval. tf_simclr: kept so that the "
  "reference's command lines parse; stored in flags.json, never read.",
)
flags.DEFINE_integer("keep_checkpoint_max", 5, "Maximum number of checkpoints to keep.")
flags.DEFINE_integer("keep_hub_module_max", 1, "Maximum number of Hub modules to keep.")
flags.DEFINE_float("temperature", 0.1, "Temperature parameter for contrastive loss.")
flags.DEFINE_boolean(
  "hidden_norm", True, "Whether to L2-normalise the hidden vectors in the contrastive loss."
)
flags.DEFINE_enum(
  "proj_head_mode", "nonlinear", config_lib.PROJ_HEAD_MODES, "How the head projection is done."
)
flags.DEFINE_integer("proj_out_dim", 128, "Number of head projection dimension.")
flags.DEFINE_integer("num_proj_layers", 3, "Number of non-linear head layers.")
flags.DEFINE_integer(
  "ft_proj_selector",
  0,
  "Which layer of the projection head to use during fine-tuning. 0 means no projection head.",
)
flags.DEFINE_boolean(
  "global_bn", True, "Whether to aggregate BN statistics across distributed cores."
)
flags.DEFINE_float(
  "width_multiplier",
  1,
  "Multiplier to change width of network. tf_simclr: "
  "any positive number (0.25, 0.5 for CPU-sized encoders); channels are "
  "round(c * w) for the reference's counts c.",
)
flags.DEFINE_integer("resnet_depth", 50, "Depth of ResNet.")
flags.DEFINE_float(
  "sk_ratio", 0.0, "If it is bigger than 0, it will enable SK. Recommendation: 0.0625."
)
flags.DEFINE_float("se_ratio", 0.0, "If it is bigger than 0, it will enable SE.")
flags.DEFINE_integer("image_size", 224, "Input image size.")
flags.DEFINE_float("color_jitter_strength", 1.0, "The strength of color jittering.")
flags.DEFINE_boolean(
  "use_blur", True, "Whether or not to use Gaussian blur for augmentation during pretraining."
)

# --- tf_simclr's own flags. ---
flags.DEFINE_float(
  "min_scale",
  0.08,
  "Smallest area of a training view's random crop, as a fraction of the image, in (0, 1] "
  "(the reference's 0.08). Larger values keep more of small images (0.3-0.5 for 32 px).",
)
flags.DEFINE_boolean(
  "horizontal_flip",
  True,
  "Mirror training views with probability 0.5 (the reference). Turn it off for images whose "
  "mirror image is another thing: digits, letters, text.",
)
flags.DEFINE_enum(
  "crop_interpolation",
  "bicubic",
  config_lib.CROP_INTERPOLATIONS,
  "How a training view's random crop is resized: bicubic (the reference) or bilinear "
  "(torchvision's RandomResizedCrop; the host path is ~1.2x faster at 224 px).",
)
flags.DEFINE_boolean(
  "zero_init_residual",
  True,
  "Start the last batch-norm gamma of every residual branch at 0 (the "
  "reference's ResNet). False starts it at 1, which learns much faster in "
  "runs of a few hundred steps (the CPU quick start).",
)
flags.DEFINE_enum(
  "strategy",
  "auto",
  config_lib.STRATEGIES,
  "tf.distribute strategy. auto: a TPU if one is named or attached (and "
  "--use_tpu), else all GPUs, else the CPU.",
)
flags.DEFINE_integer(
  "cpu_replicas",
  0,
  "Split the host CPU into N logical devices and mirror "
  "over them: the whole distributed path on one machine.",
)
flags.DEFINE_integer("seed", 0, "Seed of weights, data order and augmentations.")
flags.DEFINE_bool("deterministic", False, "Bit-for-bit repeatable run (deterministic ops).")
flags.DEFINE_float(
  "train_label_fraction",
  1.0,
  "Fine-tune on this class-balanced fraction of "
  "the training labels, in (0, 1] (per class round(fraction * count), at least "
  "1), chosen by --seed; saved as model_dir/label_subset.txt. 1: all.",
)
flags.DEFINE_string(
  "train_label_file",
  None,
  "Fine-tune on the training examples listed in this "
  "text file, one example id (index in the split) per line.",
)
flags.DEFINE_integer(
  "knn_eval_every_n_steps",
  0,
  "Every N training steps, kNN top-1 of the eval "
  "split against the train split's final_avg_pool features. 0: off.",
)
flags.DEFINE_integer("knn_k", 200, "Neighbours of the kNN monitor (fewer if the bank is smaller).")
flags.DEFINE_float(
  "knn_temperature", 0.07, "Temperature T of the kNN monitor's vote weights exp(similarity / T)."
)
flags.DEFINE_string(
  "teacher_checkpoint",
  None,
  "--train_mode=distill: the fine-tuned teacher, a "
  "tf_simclr checkpoint (prefix or model_dir, with its flags.json) or an "
  "exported SavedModel (model_dir/saved_model/<step>).",
)
flags.DEFINE_float(
  "distill_temperature",
  1.0,
  "Temperature of the teacher's and the student's softmax in the distillation loss.",
)
flags.DEFINE_float(
  "distill_label_weight",
  0.0,
  "Distillation loss = (1 - w) * distillation + "
  "w * cross-entropy on the labelled examples (the label subset), w in [0, 1].",
)
flags.DEFINE_enum(
  "mixed_precision",
  "none",
  config_lib.MIXED_PRECISION_POLICIES,
  "Keras dtype policy; BN statistics, losses and the optimizer stay float32.",
)
flags.DEFINE_bool(
  "jit_compile",
  False,
  "Compile the per-replica forward and backward pass with "
  "XLA (one replica per process; TPUs always compile). Slower on CPU: 1.7x "
  "(ResNet-18 width 1) to 16-20x (width 0.25); see docs/benchmarks.md.",
)
flags.DEFINE_float(
  "eval_timeout_s",
  0,
  "--mode=eval: stop when no new checkpoint appeared in "
  "model_dir for this many seconds (an error if none came at all). 0: wait "
  "without limit, as the reference does.",
)
flags.DEFINE_bool(
  "augment_on_device",
  False,
  "The host decodes and draws; the training step crops, resizes, flips, colours and blurs "
  "the batch on the accelerator (on a TPU the host also crops and resizes: static shapes): "
  "for hosts that cannot keep up.",
)
flags.DEFINE_string(
  "data_service",
  None,
  "grpc://HOST:PORT of a tf.data service dispatcher: its workers (python -m "
  "tf_simclr.data_service worker) decode and augment the pretraining input; see "
  "docs/distributed.md.",
)

FLAGS = flags.FLAGS


def _pick(cls, values):
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in values.items() if k in names})


# A range check per row: (flag, whether a value is acceptable, what it must be), refused as
# "--flag must be <what it must be>, got <value>". `v > 0` also refuses NaN; `not v < 0` lets
# NaN through to `_check_finite`, which names it. The groups run in `validate`'s order.
_positive = lambda v: v > 0
_not_negative = lambda v: not v < 0
_fraction = lambda v: 0 < v <= 1
_SIZES = (
  ("temperature", _positive, "> 0"),
  ("train_batch_size", _positive, "> 0"),
  ("eval_batch_size", _positive, "> 0"),
  ("image_size", _positive, "> 0"),
  ("width_multiplier", _positive, "> 0"),
  ("proj_out_dim", _positive, "> 0"),
)
_COUNTS = tuple(
  (name, _not_negative, ">= 0")
  for name in (
    "train_steps",
    "train_epochs",
    "eval_steps",
    "checkpoint_steps",
    "checkpoint_epochs",
    "cpu_replicas",
    "warmup_epochs",
    "weight_decay",
    "sk_ratio",
    "se_ratio",
    "eval_timeout_s",
  )
) + (
  (
    "keep_checkpoint_max",
    lambda v: v >= 1,
    ">= 1 (the newest checkpoint is what a resume starts from)",
  ),
)
_FRACTIONS = (
  ("min_scale", _fraction, "in (0, 1]"),
  ("train_label_fraction", _fraction, "in (0, 1]"),
)
_KNN = (
  ("knn_eval_every_n_steps", _not_negative, ">= 0"),
  ("knn_k", lambda v: v >= 1, ">= 1"),
  ("knn_temperature", _positive, "> 0"),
)
_DISTILL = (
  ("distill_temperature", _positive, "> 0"),
  ("distill_label_weight", lambda v: 0 <= v <= 1, "in [0, 1]"),
)


def validate(values: dict) -> None:
  """Checks values that would otherwise fail deep inside TensorFlow; ValueError names the flag.

  The checks run in a fixed order: of several bad values, the first in that order is reported.
  """
  _check_ranges(values, _SIZES)
  _check_width(values)
  _check_scale(values)
  _check_ranges(values, _COUNTS)
  _check_length(values)
  _check_ranges(values, _FRACTIONS)
  _check_label_choice(values)
  _check_ranges(values, _KNN)
  _check_few_labels(values)
  _check_ranges(values, _DISTILL)
  _check_teacher(values)
  _check_finite(values)


def _check_ranges(values: dict, rows: tuple) -> None:
  for name, acceptable, requirement in rows:
    if not acceptable(values[name]):
      raise ValueError(f"--{name} must be {requirement}, got {values[name]}")


def _check_width(values: dict) -> None:
  """Every channel count of the network comes out at least 1 (`config.check_width`)."""
  try:
    config_lib.check_width(values["width_multiplier"], values["sk_ratio"])
  except ValueError as err:
    raise ValueError(f"--{err}") from None


def _check_length(values: dict) -> None:
  """A place for the run, and a length."""
  if not values["model_dir"]:
    raise ValueError("--model_dir is required (where checkpoints, results and exports go)")
  if values["train_steps"] == 0 and values["train_epochs"] == 0:
    raise ValueError("one of --train_steps or --train_epochs must be > 0")


def _check_label_choice(values: dict) -> None:
  """One way of choosing the labelled subset."""
  if values["train_label_file"] and values["train_label_fraction"] != 1:
    raise ValueError("give --train_label_fraction or --train_label_file, not both")


def _check_few_labels(values: dict) -> None:
  """A labelled subset is for the modes that read labels."""
  few_labels = values["train_label_fraction"] != 1 or values["train_label_file"]
  if few_labels and values["train_mode"] == "pretrain":
    raise ValueError(
      "--train_label_fraction and --train_label_file choose the labels of "
      "--train_mode=finetune or distill, not of pretraining"
    )


def _check_teacher(values: dict) -> None:
  if values["train_mode"] == "distill" and not values["teacher_checkpoint"]:
    raise ValueError(
      "--train_mode=distill needs --teacher_checkpoint (a fine-tuned tf_simclr "
      "checkpoint or exported SavedModel)"
    )


def _check_finite(values: dict) -> None:
  # NaN passes comparisons such as `lr < 0` and then poisons the weights.
  for name, value in sorted(values.items()):
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"--{name} must be a finite number, got {value}")


def _check_scale(values: dict) -> None:
  """Refuses sizes and settings that cannot give a meaningful run; warns of a weak contrast."""
  bound = config_lib.min_temperature(values["hidden_norm"])
  if not values["temperature"] >= bound:
    raise ValueError(
      f"--temperature={values['temperature']} is below {bound:.3g}, the smallest at which the "
      f"contrastive loss is exact in float32 with --hidden_norm={values['hidden_norm']} "
      "(config.min_temperature says why); the reference uses 0.1 to 0.5"
    )
  if values["image_size"] > config_lib.MAX_IMAGE_SIZE:
    raise ValueError(
      f"--image_size must be <= {config_lib.MAX_IMAGE_SIZE} (one example's activations "
      f"would not fit in memory), got {values['image_size']}"
    )
  if values["strategy"] == "one_device" and values["cpu_replicas"] > 1:
    raise ValueError(
      f"--strategy=one_device runs on one device, but --cpu_replicas={values['cpu_replicas']} "
      "asks for several: give --strategy=mirrored (or auto) with --cpu_replicas"
    )
  batch = values["train_batch_size"]  # The global batch: every replica's rows are negatives.
  if values["train_mode"] == "pretrain" and batch < 2:
    raise ValueError(
      f"--train_batch_size={batch}: pretraining needs a global batch of at least 2 (each "
      "example's negatives are the other examples of the batch)"
    )
  training = values["mode"] != "eval"
  if values["train_mode"] == "pretrain" and training and batch < config_lib.FEW_NEGATIVES_BATCH:
    logging.warning(
      "--train_batch_size=%d gives each example only %d negatives: the contrastive task is "
      "easy and the features weak (the reference uses 256 to 4096)",
      batch,
      2 * batch - 2,
    )


def check_data_service(values: dict) -> None:
  """Refuses a malformed --data_service address and what the service cannot feed.

  Why each combination is refused: docs/distributed.md#scaling-the-input-out-with-tfdata-service.
  """
  address = values.get("data_service")
  if not address:
    return
  match = re.fullmatch(r"grpc://([^\s:/]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", address)
  if not match or not 0 < int(match.group(2)) < 65536:
    raise ValueError(f"--data_service must be grpc://HOST:PORT, got {address!r}")
  if values["train_mode"] != "pretrain":
    raise ValueError(
      f"--data_service feeds pretraining only, not --train_mode={values['train_mode']}"
    )
  if values["dataset"] != config_lib.IMAGE_FOLDER:
    raise ValueError(
      f"--data_service needs --dataset={config_lib.IMAGE_FOLDER}: its workers read each "
      f"example by id, and {values['dataset']}'s TFDS record files are read in order only"
    )
  if values["cache_dataset"]:
    raise ValueError("--cache_dataset has no effect with --data_service (the workers read)")
  if values["deterministic"]:
    raise ValueError(
      "--deterministic cannot hold with --data_service: the workers' examples reach the "
      "trainer in the order they finish"
    )


def to_config(values: dict) -> config_lib.RunConfig:
  """absl flag values (`FLAGS.flag_values_dict()`) -> RunConfig. Raises ValueError."""
  validate(values)
  check_data_service(values)
  return config_lib.RunConfig(
    data=_pick(config_lib.DataConfig, values),
    model=_pick(config_lib.ModelConfig, values),
    optim=_pick(config_lib.OptimConfig, values),
    train=_pick(config_lib.TrainConfig, values),
    runtime=_pick(config_lib.RuntimeConfig, values),
  )
