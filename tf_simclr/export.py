"""Exports a SimCLRModel as a TF-Hub-style reusable SavedModel, and prunes old exports.

The SavedModel (`model_dir/saved_model/<step>/`) is loadable with `tf.saved_model.load` in a
process that cannot import `tf_simclr`, and implements TF Hub's reusable SavedModel interface:

  * `obj(images, training=False)`: images float32 `[B, H, W, 3]` in [0, 1] (any B, H, W) -> dict
    of float32 endpoints `model.OUTPUTS` (`logits_sup` only with a supervised head). Traced for
    `training=False` (moving BN statistics) and `training=True` (batch statistics; the call
    updates the moving statistics, as Keras does).
  * `obj.variables`, `obj.trainable_variables`: lists of the model's `tf.Variable`s.
  * `obj.regularization_losses`: list of argument-free tf.functions returning float32 scalars,
    the L2 term to add to a fine-tuning loss (see `export_saved_model`).
  * `obj.signatures["serving_default"]`: `images` -> the endpoints dict with `training=False`.
  * `assets.extra/tf_simclr.json` (a file TF ignores): the model's `ModelConfig` and, for each
    entry of `obj.variables` in order, the Keras path (`variable.path`), shape and dtype. The
    saved variables' own names are not unique (`simclr_model/kernel:0`), so this manifest is
    what `restore_from_saved_model` maps by, onto a model built afresh (fine-tuning from an
    export, or a distillation teacher).

What is saved is a twin of the model, not the model itself: a model built with
`global_bn=True` has synchronized batch norm whose cross-replica reductions mean nothing outside
the strategy that trained it (the reference's export was not differentiable because of them),
and a model created under a strategy holds distributed variables. The twin is a fresh
single-device model with plain batch norm and the same weights, so the export is a plain graph.
The twin has no frozen layers either (`fine_tune_after_block=-1`): whatever the run trained, the
export's `trainable_variables` are all the weights, for its consumer to fine-tune.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import uuid

from absl import logging
import keras
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import config as config_lib
from tf_simclr import model as model_lib
from tf_simclr import optimizers
from tf_simclr.config import ModelConfig

# Variable shapes do not depend on the image size (the stem is chosen by config.image_size), so
# the twin is built with a small dummy batch to keep building cheap for big models.
_BUILD_SIZE = 32
_NUMERIC = re.compile(r"[0-9]+")
# `export_saved_model`'s temporary directory, `<step>.tmp-<uuid4 hex>`: what a killed export
# leaves behind, and the only name `remove_leftovers` deletes.
_TEMPORARY = re.compile(r"[0-9]+\.tmp-[0-9a-f]{32}")
MANIFEST = os.path.join("assets.extra", "tf_simclr.json")
_MANIFEST_FORMAT = 1


def make_export_twin(model: model_lib.SimCLRModel) -> model_lib.SimCLRModel:
  """Returns a single-device copy of `model` with plain batch norm and the same weights.

  The twin is built from `dataclasses.replace(model.config, global_bn=False,
  train_mode="finetune", fine_tune_after_block=-1)` outside any strategy, in the model's dtype
  policy, and gets a copy of every weight (trainable or not, moving BN statistics included).
  `train_mode="finetune"` only drops the pretraining `stop_gradient` in front of the supervised
  head (which keeps the linear evaluation trained alongside pretraining from shaping the
  representation), and `fine_tune_after_block=-1` unfreezes layers a fine-tuning run froze:
  inference values are identical, and a consumer fine-tuning on `logits_sup` gets gradients in
  the encoder.

  Args:
    model: a built `SimCLRModel`, possibly created under a `tf.distribute` strategy.

  Returns:
    A built `SimCLRModel` whose call gives the same outputs as `model`'s.

  Raises:
    ValueError: when called inside a strategy scope or replica context, or when the twin's
      weights do not line up with the model's (path, shape or dtype).
  """
  if tf.distribute.has_strategy():
    raise ValueError(
      "Export outside `strategy.scope()` (and outside `strategy.run`): the "
      "exported twin must be a plain single-device model."
    )
  if not model.built or not model.weights:
    raise ValueError("The model has no weights yet; build it (model_lib.build_model) first.")
  config = dataclasses.replace(
    model.config, global_bn=False, train_mode="finetune", fine_tune_after_block=-1
  )
  # Building draws initializer seeds from Python's `random`; restore its state so that
  # exporting mid-training leaves the rest of the run's randomness unchanged.
  random_state = random.getstate()
  global_policy = keras.config.dtype_policy()
  try:
    # Sub-layers take the global policy at construction: build in the model's so that the twin
    # computes in the same precision as the model it reproduces.
    keras.config.set_dtype_policy(model.dtype_policy)
    twin = model_lib.SimCLRModel(config, name=model.name)
    twin(tf.zeros([1, _BUILD_SIZE, _BUILD_SIZE, 3]), training=False)
  finally:
    keras.config.set_dtype_policy(global_policy)
    random.setstate(random_state)
  _copy_weights(model.weights, twin.weights)
  return twin


def _copy_weights(source, target):
  """Assigns `source[i]` to `target[i]` after checking that the two lists describe one model."""
  if len(source) != len(target):
    raise ValueError(
      f"Export twin has {len(target)} weights, the model {len(source)}: the "
      "two models differ in structure."
    )
  for src, dst in zip(source, target):
    # Not trainability: the twin unfreezes what fine-tuning froze.
    if (src.path, tuple(src.shape), src.dtype) != (dst.path, tuple(dst.shape), dst.dtype):
      raise ValueError(
        "Export twin does not line up with the model: "
        f"model {src.path} {tuple(src.shape)} {src.dtype} vs twin "
        f"{dst.path} {tuple(dst.shape)} {dst.dtype}."
      )
  for src, dst in zip(source, target):
    # `numpy()` reads a distributed (e.g. mirrored) variable's value in cross-replica context.
    dst.assign(src.numpy())


def _regularization_losses(twin, weight_decay, optimizer_name):
  """Argument-free tf.functions returning the fine-tuning L2 term (none if weight_decay == 0)."""
  if weight_decay == 0:
    return []
  variables = list(twin.trainable_variables)

  @tf.function(input_signature=[], autograph=False)
  def l2_term():
    return optimizers.explicit_weight_decay(variables, weight_decay, optimizer_name)

  return [l2_term]


def export_saved_model(
  model: model_lib.SimCLRModel,
  export_dir: str,
  weight_decay: float = 0.0,
  optimizer_name: str = "lars",
) -> str:
  """Writes `model` as a reusable SavedModel to the new directory `export_dir`.

  The SavedModel is written to a temporary sibling directory and renamed into place, so a
  reader never sees a partial export (the rename is atomic on local file systems; on object
  stores such as gs:// it is a copy). An existing export is never touched.

  `regularization_losses` holds one function when `weight_decay > 0`, returning exactly the L2
  term training adds to its loss (`optimizers.explicit_weight_decay`, the reference's
  `add_weight_decay`), with `l2_loss(v) = sum(v**2) / 2`:
    * `optimizer_name="lars"`: `weight_decay * l2_loss` of the supervised head's kernel (LARS
      decays every other non-BN, non-bias weight itself, inside the update);
    * otherwise: `weight_decay * sum(l2_loss)` over all trainable weights except batch norm's
      (biases included, as in the reference).
  It is empty when `weight_decay == 0`.

  Args:
    model: a built `SimCLRModel` (see `make_export_twin` for what is exported; strategies and
      synchronized batch norm are fine). Must be called outside any strategy scope.
    export_dir: directory to create (local path or gs://...); must not exist. Its parent is
      created if needed.
    weight_decay: L2 coefficient of the run (`--weight_decay`), >= 0.
    optimizer_name: optimizer of the run (`--optimizer`), one of `optimizers.OPTIMIZERS`.

  Returns:
    `export_dir`.

  Raises:
    FileExistsError: `export_dir` already exists (the caller decides whether that is an error).
    ValueError: bad arguments, or see `make_export_twin`.
  """
  export_dir = os.fspath(export_dir).rstrip("/")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if optimizer_name not in optimizers.OPTIMIZERS:
    raise ValueError(
      f"optimizer_name must be one of {optimizers.OPTIMIZERS}, got {optimizer_name!r}"
    )
  if tf.io.gfile.exists(export_dir):
    raise FileExistsError(f"Export directory {export_dir} already exists; not overwriting it.")

  twin = make_export_twin(model)

  def call(images, training=False):
    return twin(images, training=training)

  # A tf.train.Checkpoint is a plain trackable container: unlike tf.Module, whose `variables`
  # and `trainable_variables` are read-only properties, it can store them as saved attributes.
  root = tf.train.Checkpoint()
  root.variables = [v.value for v in twin.variables]
  root.trainable_variables = [v.value for v in twin.trainable_variables]
  root.regularization_losses = _regularization_losses(twin, weight_decay, optimizer_name)
  root.__call__ = tf.function(call, autograph=False)
  images = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")
  # `training` is a Python bool, as Hub expects: one concrete function per value.
  serving = root.__call__.get_concrete_function(images, training=False)
  root.__call__.get_concrete_function(images, training=True)

  parent = os.path.dirname(export_dir)
  if parent:
    tf.io.gfile.makedirs(parent)
  tmp_dir = temporary_name(export_dir)
  try:
    tf.saved_model.save(root, tmp_dir, signatures={"serving_default": serving})
    _write_manifest(tmp_dir, twin)
    tf.io.gfile.rename(tmp_dir, export_dir, overwrite=False)
  except tf.errors.AlreadyExistsError as e:
    raise FileExistsError(
      f"Export directory {export_dir} appeared while exporting; not overwriting it."
    ) from e
  finally:
    if tf.io.gfile.exists(tmp_dir):
      tf.io.gfile.rmtree(tmp_dir)
  return export_dir


def _write_manifest(export_dir, twin):
  """Writes `MANIFEST`: the twin's config and its `variables` in the order they are saved."""
  manifest = {
    "format": _MANIFEST_FORMAT,
    "model_config": dataclasses.asdict(twin.config),
    "variables": [
      {"path": v.path, "shape": [int(d) for d in v.shape], "dtype": str(tf.as_dtype(v.dtype).name)}
      for v in twin.variables
    ],
  }
  path = os.path.join(export_dir, MANIFEST)
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.gfile.GFile(path, "w") as f:
    json.dump(manifest, f, indent=1)


# The manifest fields that decide what an export computes (the others are reset by the twin, or
# only initialised the weights).
_DEFINING = (*config_lib.MODEL_DEFINING, "num_classes")


def manifest_differences(export_dir: str, config: ModelConfig) -> list[str]:
  """`name: value there, value here` for each `_DEFINING` field of the export's manifest that
  differs from `config`; [] when none does, or the export has no readable manifest."""
  try:
    found = read_manifest(export_dir)["model_config"]
  except (ValueError, tf.errors.OpError):
    return []
  wanted = dataclasses.asdict(config)
  return [
    f"{k}: {found[k]} there, {wanted[k]} here"
    for k in _DEFINING
    if k in found and found[k] != wanted[k]
  ]


def is_saved_model(path: str) -> bool:
  """Whether `path` is a SavedModel directory (holds saved_model.pb)."""
  return bool(path) and tf.saved_model.contains_saved_model(path)


def read_manifest(export_dir: str) -> dict:
  """The `MANIFEST` of an export: {'format', 'model_config': dict, 'variables': [dict]}.

  Raises:
    ValueError: `export_dir` has none (not a tf_simclr export, or one of before the manifest).
  """
  path = os.path.join(export_dir, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise ValueError(
      f"SavedModel {export_dir} has no {MANIFEST}: it was not exported by this "
      "version of tf_simclr; give the checkpoint it was exported from instead"
    )
  with tf.io.gfile.GFile(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != _MANIFEST_FORMAT:
    raise ValueError(
      f"{path} has format {manifest.get('format')!r}; this tf_simclr reads "
      f"format {_MANIFEST_FORMAT}"
    )
  return manifest


def manifest_model_config(manifest: dict) -> ModelConfig:
  """The exported model's ModelConfig (fields this version does not know are ignored)."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in manifest["model_config"].items() if k in known})


def restore_from_saved_model(model: model_lib.SimCLRModel, export_dir: str) -> None:
  """Initialises `model`'s weights from one of our exports, matching variables by path.

  Every weight of `model` (moving BN statistics included) must be in the export with the same
  shape; export weights the model lacks are ignored. Values are read from the export's
  `variables/` checkpoint without loading its graph, so this works under any strategy scope.

  Args:
    model: a built SimCLRModel (any strategy, any `fine_tune_after_block`).
    export_dir: `model_dir/saved_model/<step>` of a tf_simclr run.

  Raises:
    ValueError: not a readable tf_simclr export.
    checkpoints.CheckpointMismatchError: a weight of `model` is missing or has another shape.
  """
  manifest = read_manifest(export_dir)
  by_path = {e["path"]: (i, tuple(e["shape"])) for i, e in enumerate(manifest["variables"])}
  try:
    reader = tf.train.load_checkpoint(os.path.join(export_dir, "variables", "variables"))
    graph = checkpoints.object_graph(reader)
  except (tf.errors.OpError, ValueError) as err:
    raise ValueError(
      f"SavedModel {export_dir} has unreadable variables ({type(err).__name__})"
    ) from None
  for v in model.weights:
    index, shape = by_path.get(v.path, (None, None))
    if index is None or shape != tuple(v.shape):
      found = "no such weight" if index is None else f"shape {list(shape)}"
      raise checkpoints.CheckpointMismatchError(
        f"SavedModel {export_dir} does not match the model asked for ({v.path} "
        f"{list(v.shape)}: {found}); use the model flags it was trained with "
        f"(its {MANIFEST} lists them)"
      )
  for v in model.weights:
    index, _ = by_path[v.path]
    v.assign(reader.get_tensor(checkpoints.variable_key(graph, ["variables", str(index)])))


def temporary_name(name: str) -> str:
  """A fresh temporary name for writing `name`: `<name>.tmp-<uuid4 hex>`."""
  return f"{name}.tmp-{uuid.uuid4().hex}"


def remove_leftovers(parent_dir: str, pattern: re.Pattern = _TEMPORARY) -> list[str]:
  """Deletes the temporary directories of exports that were killed (`<step>.tmp-<hex>`).

  Only entries of `parent_dir` whose whole name matches `pattern` (default: our exports'
  temporary names) are deleted, each with a log line; nothing else is touched. Call it where
  no export of ours can be in progress (run.py: a training job holding the model_dir's lock).

  Returns:
    The deleted paths, sorted.
  """
  parent_dir = os.fspath(parent_dir)
  if not tf.io.gfile.isdir(parent_dir):
    return []
  removed = []
  for name in sorted(tf.io.gfile.listdir(parent_dir)):
    name = name.rstrip("/")
    if pattern.fullmatch(name):
      path = os.path.join(parent_dir, name)
      tf.io.gfile.rmtree(path)
      logging.warning("Removed %s, left by an interrupted export or conversion", path)
      removed.append(path)
  return removed


def prune_exports(parent_dir: str, keep_max: int) -> list[str]:
  """Deletes all but the `keep_max` newest exports `parent_dir/<step>/` (by step number).

  Only subdirectories whose name is a step number count; other names, temporary export
  directories (`<step>.tmp-*`) and files are left alone. `keep_max <= 0` keeps everything.

  Args:
    parent_dir: directory holding the exports (e.g. `model_dir/saved_model`); may not exist.
    keep_max: how many exports to keep.

  Returns:
    The deleted directories, oldest first.
  """
  parent_dir = os.fspath(parent_dir)
  if keep_max <= 0 or not tf.io.gfile.isdir(parent_dir):
    return []
  steps = []
  for name in tf.io.gfile.listdir(parent_dir):
    name = name.rstrip("/")  # object stores list directories with a trailing slash.
    path = os.path.join(parent_dir, name)
    if _NUMERIC.fullmatch(name) and tf.io.gfile.isdir(path):
      steps.append((int(name), name, path))
  doomed = [path for _, _, path in sorted(steps)[:-keep_max]]
  for path in doomed:
    tf.io.gfile.rmtree(path)
  return doomed
