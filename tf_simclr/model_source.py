"""What model is at this path: the one answer for every checkpoint source tf_simclr accepts.

`identify(path, flag)` takes what a user gives `--checkpoint`, `--teacher_checkpoint` or
`python -m tf_simclr.convert`:

  "checkpoint": ours, a ckpt-N prefix, one of its files (ckpt-N.index) or a model_dir (its
      newest); its config from the flags.json beside it (run.py's or the converter's), its
      classes from its supervised head's kernel.
  "export": ours, model_dir/saved_model/<step>; its config from its manifest (`export.MANIFEST`).
  "reference checkpoint", "reference SavedModel": google-research/simclr's (a ckpt-N prefix or
      model_dir; the released SavedModels); the config inferred from the variables
      (`reference_arch`).

and returns a `ModelSource`: the kind, the TF2 checkpoint read, the step, the `ModelConfig`.
`restore(model, source)` puts the stored weights into a built model, whatever the kind.

Callers: `plan.make_plan` and `train.build_state` through `distill.teacher_source` (the
teacher), `train.init_weights` (`--checkpoint`), `convert.convert` (references only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import export
from tf_simclr import reference_arch
from tf_simclr import reference_weights
from tf_simclr.config import ModelConfig
from tf_simclr.reference_arch import NotReferenceError

CHECKPOINT = "checkpoint"
EXPORT = "export"
REFERENCE_CHECKPOINT = "reference checkpoint"
REFERENCE_SAVED_MODEL = "reference SavedModel"
KINDS = (CHECKPOINT, EXPORT, REFERENCE_CHECKPOINT, REFERENCE_SAVED_MODEL)

# What else a flag accepts besides checkpoints, for its messages.
_ALSO = {"--teacher_checkpoint": "an exported SavedModel, model_dir/saved_model/<step>"}
# Object path of the supervised head in a tf_simclr checkpoint (train.build_state's
# `tf.train.Checkpoint(model=...)`, SimCLRModel's attribute); its kernel is [D, num_classes].
_HEAD = ("model", "supervised_head")


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model stored at a path, identified (`identify`).

  Attributes:
    path: as the user gave it.
    kind: one of `KINDS`.
    prefix: the TF2 checkpoint that holds the values: `.../ckpt-N`, or a SavedModel's
      `variables/variables`.
    step: the step it was saved at: a checkpoint's global step (a reference's) or number, a
      SavedModel's directory name, else 0.
    config: the stored model's architecture and classes (`num_classes` 0: no supervised head).
      For a reference, `image_size` is only its stem's (32: CIFAR, 224: ImageNet). None: a
      tf_simclr checkpoint that does not tell (no flags.json beside it, or unreadable).
    unknown: why `config` is None, as the one-line error for a caller that needs it.
  """

  path: str
  kind: str
  prefix: str
  step: int
  config: ModelConfig | None
  unknown: str = ""

  @property
  def is_reference(self) -> bool:
    return self.kind in (REFERENCE_CHECKPOINT, REFERENCE_SAVED_MODEL)

  @property
  def image_size(self) -> int | None:
    """The size the model was trained at; None when unknown (a reference records only its stem)."""
    return None if self.is_reference or self.config is None else self.config.image_size


def identify(path: str, flag: str | None = None) -> ModelSource:
  """What model is at `path`.

  Args:
    path: a checkpoint prefix, one of its files, a directory holding checkpoints, or a
      SavedModel directory: ours or the reference's.
    flag: the flag that gave `path` (`--checkpoint`, `--teacher_checkpoint`), named in messages;
      None: the converter's SRC, which must be a reference.

  Raises:
    ValueError: nothing at `path`; one of our exports without a readable manifest.
    NotReferenceError (a ValueError): a reference model tf_simclr cannot build; with `flag`
      None, anything but a readable reference.
  """
  saved_model = export.is_saved_model(path)
  if saved_model:
    prefix = os.path.join(path, "variables", "variables")
  else:
    prefix = _checkpoint_prefix(path, flag)
  try:
    graph, read_error = checkpoints.ObjectGraph(prefix), None
  except (tf.errors.OpError, ValueError) as err:
    graph, read_error = None, err
  if graph is not None and reference_arch.is_reference(graph):
    kind = REFERENCE_SAVED_MODEL if saved_model else REFERENCE_CHECKPOINT
    step = _saved_model_step(path) if saved_model else _reference_step(graph, prefix)
    return ModelSource(path, kind, prefix, step, reference_arch.reference_config(graph))
  if flag is None:
    raise NotReferenceError(_not_reference(path, graph, read_error, saved_model))
  if saved_model:
    config = export.manifest_model_config(export.read_manifest(path))
    return ModelSource(path, EXPORT, prefix, _saved_model_step(path), config)
  config, unknown = _checkpoint_config(prefix, graph, read_error, flag)
  return ModelSource(path, CHECKPOINT, prefix, _number(prefix), config, unknown)


def restore(model, source: ModelSource, new_head: bool = False) -> None:
  """Initialises the built `model` (any strategy scope) from the weights `source` holds.

  Args:
    model: a SimCLRModel whose config must describe the stored architecture (any Keras model
      for a tf_simclr checkpoint).
    source: from `identify`.
    new_head: (`--zero_init_logits_layer`) a reference's supervised head is not read, so its
      number of classes may differ.

  Raises:
    ValueError: unreadable values; checkpoints.CheckpointMismatchError (a ValueError): another
      model than `model` (the message names what differs).
  """
  if source.is_reference:
    reference_weights.restore_reference(model, source.path, source.prefix, source.config, new_head)
  elif source.kind == EXPORT:
    export.restore_from_saved_model(model, source.path)
  else:
    checkpoints.restore_weights(model, source.prefix)


def _checkpoint_prefix(path: str, flag: str | None) -> str:
  """The checkpoint `path` stands for: a prefix, one of its files, or a directory (its newest)."""
  match = re.fullmatch(r"(.+)\.(index|data-\d+-of-\d+)", path)
  prefix = path
  if match and tf.io.gfile.exists(match.group(1) + ".index"):  # as a shell completes ckpt-3.
    prefix = match.group(1)
  also = _ALSO.get(flag, "")
  if tf.io.gfile.isdir(prefix):
    latest = tf.train.latest_checkpoint(prefix)
    if latest is not None:
      return latest
    if flag is None:
      raise NotReferenceError(f"{path} is a directory with neither a checkpoint nor a SavedModel")
    raise ValueError(
      f"{flag}={prefix} is a directory without a checkpoint{f' (nor {also})' if also else ''}"
    )
  if tf.io.gfile.exists(prefix + ".index"):
    return prefix
  if flag is None:
    raise NotReferenceError(
      f"{path} does not exist (expected a reference checkpoint prefix such "
      "as model_dir/ckpt-1000, a model_dir, or a reference SavedModel)"
    )
  raise ValueError(
    f"{flag}={prefix} does not exist (expected a checkpoint prefix such as "
    "model_dir/ckpt-1000, a directory holding checkpoints"
    f"{f', or {also}' if also else ''})"
  )


def _not_reference(path, graph, read_error, saved_model) -> str:
  """The converter's refusal of what is not a readable reference."""
  if graph is None:
    return f"{path} is unreadable ({type(read_error).__name__})"
  ours = graph.node(("model", "encoder")) is not None or saved_model
  return (
    f"{path} is not a google-research/simclr checkpoint or SavedModel (its object graph has "
    "no model/resnet_model/block_groups)"
    + ("; it is tf_simclr's own: use it as it is" if ours else "")
  )


def _checkpoint_config(prefix, graph, read_error, flag) -> tuple[ModelConfig | None, str]:
  """(ModelConfig of a tf_simclr checkpoint, or None and why): flags.json, head's classes."""
  noun = "teacher checkpoint" if flag == "--teacher_checkpoint" else "checkpoint"
  flags_path = os.path.join(os.path.dirname(prefix), "flags.json")
  if not tf.io.gfile.exists(flags_path):
    return None, (
      f"{noun} {prefix} has no flags.json beside it to tell its "
      "architecture; give its exported SavedModel (model_dir/saved_model/<step>)"
    )
  try:
    with tf.io.gfile.GFile(flags_path) as f:
      flags = json.load(f)
    if graph is None:
      return None, f"{noun} {prefix} is unreadable ({type(read_error).__name__})"
    kernels = [s for s in graph.shapes_under(_HEAD) if len(s) == 2]
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    fields = {k: v for k, v in flags.items() if k in known and k != "num_classes"}
    return ModelConfig(**fields, num_classes=int(kernels[0][-1]) if len(kernels) == 1 else 0), ""
  except ValueError as err:  # not JSON, or a flags.json of no model tf_simclr builds
    return None, str(err)


def _number(prefix: str) -> int:
  """N of a `.../ckpt-N` prefix, else 0."""
  tail = os.path.basename(prefix).rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def _saved_model_step(path: str) -> int:
  name = os.path.basename(os.fspath(path).rstrip("/"))
  return int(name) if name.isdigit() else 0


def _reference_step(graph: checkpoints.ObjectGraph, prefix: str) -> int:
  """The global step a reference training checkpoint stores, else its number."""
  for names in (("global_step",), ("optimizer", "iter")):
    if graph.shape(names) == ():
      return int(graph.value(names))
  return _number(prefix)
