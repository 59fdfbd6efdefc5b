"""SimCLRv2 distillation (section 2): a fine-tuned teacher labels the training images.

The student minimises the cross-entropy between the teacher's and its own temperature-softened
class distributions on every training image (labelled or not),

  L_distill = -mean_x sum_y P_T(y | x; tau) log P_S(y | x; tau),
  P(y | x; tau) = softmax(logits / tau)_y,

optionally mixed with the usual cross-entropy on the labelled examples:
`(1 - w) * L_distill + w * L_labelled`. Teacher and student see the same augmented view; the
teacher runs in inference mode (moving BN statistics) and gets no gradient.

The teacher is a tf_simclr checkpoint or exported SavedModel, or a google-research/simclr
checkpoint or SavedModel: `model_source.identify` tells its architecture and classes. It is
rebuilt as a SimCLRModel under the caller's strategy scope, so it runs under any strategy, like
the student. Callers: `plan.make_plan` (the teacher's config, checked before anything is built)
and `train_state.build_state` (the teacher itself).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tf_simclr import model as model_lib
from tf_simclr import model_source
from tf_simclr.config import ModelConfig
from tf_simclr.data import sources


def teacher_source(path: str) -> model_source.ModelSource:
  """The teacher at `path` (`--teacher_checkpoint`), its config as it will be built.

  Args:
    path: a tf_simclr checkpoint prefix, a model_dir holding checkpoints and flags.json, an
      exported SavedModel directory, or a google-research/simclr checkpoint or SavedModel.

  Returns:
    `model_source.identify`'s answer, with a config for inference: `train_mode="finetune"`,
    nothing frozen, plain batch norm (inference mode does not synchronise anything).

  Raises:
    ValueError: nothing usable at `path`, or a model without a supervised head.
  """
  source = model_source.identify(path, "--teacher_checkpoint")
  if source.config is None:
    raise ValueError(source.unknown)
  if source.config.num_classes == 0:
    what = f"checkpoint {source.prefix}" if source.kind == model_source.CHECKPOINT else path
    raise ValueError(
      f"teacher {what} has no supervised head (logits); fine-tune it first (--train_mode=finetune)"
    )
  config = dataclasses.replace(
    source.config, train_mode="finetune", fine_tune_after_block=-1, global_bn=False
  )
  return dataclasses.replace(source, config=config)


def check_classes(config: ModelConfig, num_classes: int, path: str) -> None:
  """ValueError unless the teacher (`config`, from `path`) predicts `num_classes` classes."""
  if config.num_classes != num_classes:
    raise ValueError(
      f"teacher {path} predicts {config.num_classes} classes, but the student "
      f"and the dataset have {num_classes}"
    )


def check_image_size(teacher: model_source.ModelSource, image_size: int) -> None:
  """ValueError unless the teacher (`teacher_source`) was trained at `image_size`.

  The teacher labels the student's own views, at the student's size: a teacher trained at
  another size sees images unlike its training data (objects at another scale, and above 32 px
  another stem), and its labels silently lose accuracy. Refused rather than warned: the fix is
  one flag. A google-research/simclr teacher records no size, only its stem
  (`ModelSource.image_size` None), so there only the stem is compared.
  """
  config = teacher.config
  if teacher.image_size is None:
    same = config.use_cifar_stem == (image_size <= 32)
  else:
    same = teacher.image_size == image_size
  if not same:
    raise ValueError(
      f"teacher {teacher.path} was trained at --image_size={config.image_size}, but this run's "
      f"--image_size={image_size}: the teacher labels the student's views at their size. "
      f"Use --image_size={config.image_size}, or fine-tune a teacher at {image_size} px"
    )


def load_teacher(path: str) -> model_lib.SimCLRModel:
  """Builds the teacher (under the caller's strategy scope, if any) and restores its weights.

  Returns:
    A SimCLRModel with no trainable weights; call it with `training=False`.

  Raises:
    ValueError: see `teacher_source`; checkpoints.CheckpointMismatchError when the weights do
      not fit the architecture they came with.
  """
  source = teacher_source(path)
  teacher = model_lib.build_model(source.config)
  model_source.restore(teacher, source)
  teacher.trainable = False
  return teacher


def distillation_loss(teacher_logits, student_logits, temperature: float = 1.0):
  """Mean over the batch of the cross-entropy from the teacher's to the student's softmax.

  Args:
    teacher_logits: float [B, C] (no gradient flows into them).
    student_logits: float [B, C].
    temperature: tau > 0, dividing both.

  Returns:
    float32 scalar.
  """
  targets = tf.nn.softmax(tf.stop_gradient(tf.cast(teacher_logits, tf.float32)) / temperature)
  return tf.reduce_mean(
    tf.nn.softmax_cross_entropy_with_logits(
      targets, tf.cast(student_logits, tf.float32) / temperature
    )
  )


def labels_only_for(source: sources.Source, ids) -> sources.Source:
  """`source` with every example, but labels (-1 otherwise) only on the examples `ids`.

  Distillation trains on all images (the teacher labels them) and its optional labelled loss
  on the labelled subset only; the training step ignores label -1.

  Args:
    source: a split from `sources.load_source`.
    ids: example ids from `label_subsets.label_subset`; None keeps every label.
  """
  if ids is None:
    return source
  keep = np.zeros([source.num_examples], bool)
  keep[np.asarray(ids, np.int64)] = True
  keep = tf.constant(keep)

  @tf.autograph.experimental.do_not_convert
  def relabel(record):
    label = tf.where(
      tf.gather(keep, record["id"]), record["label"], tf.constant(-1, record["label"].dtype)
    )
    return dict(record, label=label)

  return dataclasses.replace(source, records=source.records.map(relabel))
