"""SimCLRv2 distillation (section 2): a fine-tuned teacher labels the training images.

The student minimises the cross-entropy between the teacher's and its own temperature-softened
class distributions on every training image (labelled or not),

  L_distill = -mean_x sum_y P_T(y | x; tau) log P_S(y | x; tau),
  P(y | x; tau) = softmax(logits / tau)_y,

optionally mixed with the usual cross-entropy on the labelled examples:
`(1 - w) * L_distill + w * L_labelled`. Teacher and student see the same augmented view; the
teacher runs in inference mode (moving BN statistics) and gets no gradient.

The teacher is a tf_simclr checkpoint (its architecture read from the `flags.json` of its
model_dir, its number of classes from the checkpoint), one of our exported SavedModels (both
from its manifest, `export.MANIFEST`), or a google-research/simclr checkpoint or SavedModel
(both from its variables, `convert`). It is rebuilt as a SimCLRModel under the caller's
strategy scope, so it runs under any strategy, like the student.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import convert
from tf_simclr import export
from tf_simclr import model as model_lib
from tf_simclr.config import ModelConfig
from tf_simclr.data import sources

# Object path of the supervised head in a tf_simclr checkpoint (train.build_state's
# `tf.train.Checkpoint(model=...)`, SimCLRModel's attribute); its kernel is [D, num_classes].
_HEAD = ("model", "supervised_head")


def _checkpoint_prefix(path: str) -> str:
  """The teacher's checkpoint prefix (`checkpoints.resolve_prefix`)."""
  return checkpoints.resolve_prefix(
    path, "--teacher_checkpoint", also="an exported SavedModel, model_dir/saved_model/<step>"
  )


def _checkpoint_config(prefix: str) -> ModelConfig:
  """The ModelConfig of a tf_simclr checkpoint: flags.json beside it, classes from its head."""
  flags_path = os.path.join(os.path.dirname(prefix), "flags.json")
  if not tf.io.gfile.exists(flags_path):
    raise ValueError(
      f"teacher checkpoint {prefix} has no flags.json beside it to tell its "
      "architecture; give its exported SavedModel (model_dir/saved_model/<step>)"
    )
  with tf.io.gfile.GFile(flags_path) as f:
    flags = json.load(f)
  try:
    reader = tf.train.load_checkpoint(prefix)
    shapes = reader.get_variable_to_shape_map()
    graph = checkpoints.object_graph(reader)
    kernels = [
      shapes[k] for k in checkpoints.variable_keys_under(graph, _HEAD) if len(shapes[k]) == 2
    ]
    if len(kernels) != 1:
      raise KeyError("no kernel")
    num_classes = int(kernels[0][-1])
  except KeyError:
    raise ValueError(
      f"teacher checkpoint {prefix} has no supervised head (logits); fine-tune "
      "it first (--train_mode=finetune)"
    ) from None
  except tf.errors.OpError as err:
    raise ValueError(f"teacher checkpoint {prefix} is unreadable ({type(err).__name__})") from None
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(
    **{k: v for k, v in flags.items() if k in known and k != "num_classes"}, num_classes=num_classes
  )


def teacher_config(path: str) -> ModelConfig:
  """The teacher's architecture and number of classes, as it will be built.

  Args:
    path: a tf_simclr checkpoint prefix, a model_dir holding checkpoints and flags.json, or an
      exported SavedModel directory.

  Returns:
    Its ModelConfig for inference: `train_mode="finetune"`, nothing frozen, plain batch norm
    (inference mode does not synchronise anything).

  Raises:
    ValueError: nothing usable at `path`, or a model without a supervised head.
  """
  if convert.is_reference(path):
    config = convert.reference_config(convert.open_source(path).graph)
  elif export.is_saved_model(path):
    config = export.manifest_model_config(export.read_manifest(path))
  else:
    config = _checkpoint_config(_checkpoint_prefix(path))
  if config.num_classes == 0:
    raise ValueError(
      f"teacher {path} has no supervised head (logits); fine-tune it first (--train_mode=finetune)"
    )
  return dataclasses.replace(
    config, train_mode="finetune", fine_tune_after_block=-1, global_bn=False
  )


def check_classes(config: ModelConfig, num_classes: int, path: str) -> None:
  """ValueError unless the teacher (`config`, from `path`) predicts `num_classes` classes."""
  if config.num_classes != num_classes:
    raise ValueError(
      f"teacher {path} predicts {config.num_classes} classes, but the student "
      f"and the dataset have {num_classes}"
    )


def check_image_size(config: ModelConfig, image_size: int, path: str) -> None:
  """ValueError unless the teacher (`config`, from `path`) was trained at `image_size`.

  The teacher labels the student's own views, at the student's size: a teacher trained at
  another size sees images unlike its training data (objects at another scale, and above 32 px
  another stem), and its labels silently lose accuracy. Refused rather than warned: the fix is
  one flag. A google-research/simclr teacher records no size, only its stem (`convert`), so
  there only the stem is compared.
  """
  if convert.is_reference(path):
    same = config.use_cifar_stem == (image_size <= 32)
  else:
    same = config.image_size == image_size
  if not same:
    raise ValueError(
      f"teacher {path} was trained at --image_size={config.image_size}, but this run's "
      f"--image_size={image_size}: the teacher labels the student's views at their size. "
      f"Use --image_size={config.image_size}, or fine-tune a teacher at {image_size} px"
    )


def load_teacher(path: str) -> model_lib.SimCLRModel:
  """Builds the teacher (under the caller's strategy scope, if any) and restores its weights.

  Returns:
    A SimCLRModel with no trainable weights; call it with `training=False`.

  Raises:
    ValueError: see `teacher_config`; checkpoints.CheckpointMismatchError when the weights do
      not fit the architecture they came with.
  """
  config = teacher_config(path)
  teacher = model_lib.build_model(config)
  if convert.is_reference(path):
    convert.restore_reference(teacher, path)
  elif export.is_saved_model(path):
    export.restore_from_saved_model(teacher, path)
  else:
    checkpoints.restore_weights(teacher, _checkpoint_prefix(path))
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

  def relabel(record):
    label = tf.where(
      tf.gather(keep, record["id"]), record["label"], tf.constant(-1, record["label"].dtype)
    )
    return dict(record, label=label)

  return dataclasses.replace(source, records=source.records.map(relabel))
