"""Checkpoint restore and save that never lose what a user has.

* The newest checkpoint that restores is used; an unreadable one (half-written, truncated) is
  skipped with a warning and renamed aside (`.corrupt`), never deleted.
* A checkpoint that does not fit the model asked for (other depth, width, heads) stops the run
  with one line: it belongs to another experiment.
* `tf.train.CheckpointManager` writes the data files first and the `checkpoint` index last, by
  rename, so a run killed mid-write leaves the previous checkpoint as the newest one.
"""
from __future__ import annotations

import os

from absl import logging
import tensorflow as tf

# Reading errors that mean "this file is damaged", as opposed to "this is another model".
_CORRUPT_ERRORS = (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError,
                   tf.errors.InvalidArgumentError, IndexError)


class CheckpointMismatchError(ValueError):
  """A checkpoint's variables do not fit the model being built."""


def worker_dir(model_dir: str) -> str:
  """Where a non-chief worker writes the checkpoints MultiWorkerMirroredStrategy requires."""
  task = tf.distribute.cluster_resolver.TFConfigClusterResolver().task_id or 0
  return os.path.join(model_dir, f"workertemp_{task}")


def _mismatch(path, err):
  first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return CheckpointMismatchError(
      f"checkpoint {path} does not match the model asked for ({first[:200]}); use the flags it "
      "was trained with, or a new --model_dir")


def _set_aside(path):
  """Renames a damaged checkpoint's files to `<name>.corrupt-N`, keeping their bytes."""
  for name in tf.io.gfile.glob(path + ".*"):
    suffix = 0
    while tf.io.gfile.exists(f"{name}.corrupt-{suffix}"):
      suffix += 1
    tf.io.gfile.rename(name, f"{name}.corrupt-{suffix}")


def _restore(checkpoint, path):
  """Restores `path` into `checkpoint`, ignoring extra saved values (e.g. optimizer slots).

  Raises:
    CheckpointMismatchError: a variable of `checkpoint` is missing from `path` or has another
      shape (TF reports the latter as a ValueError during restore).
    _CORRUPT_ERRORS: the files cannot be read.
  """
  try:
    status = checkpoint.restore(path)
    status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as err:
    raise _mismatch(path, err) from None
  return status


def restore_latest(checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager,
                   model_dir: str) -> bool:
  """Restores the newest readable checkpoint in `manager`; False when there is none.

  Raises:
    CheckpointMismatchError: the newest readable checkpoint does not fit the model.
  """
  candidates = list(reversed(manager.checkpoints))
  for i, path in enumerate(candidates):
    try:
      _restore(checkpoint, path)
    except _CORRUPT_ERRORS as err:
      logging.warning("Checkpoint %s is unreadable (%s); trying the previous one. Its files are "
                      "kept as *.corrupt-N.", path, type(err).__name__)
      _set_aside(path)
      # Forget it, so the next save's index does not list a checkpoint that is not there.
      # (CheckpointManager has no public way to drop one; guarded in case its internals move.)
      getattr(manager, "_maybe_delete", {}).pop(path, None)
      continue
    if i:
      logging.warning("Resumed from %s, not the newest checkpoint", path)
    logging.info("Restored %s", path)
    return True
  if candidates:
    raise ValueError(f"no checkpoint in {model_dir} could be read (the damaged ones were kept "
                     "as *.corrupt-N); move them away to start afresh")
  return False


def restore_weights(model, path: str) -> None:
  """Initialises `model` from a tf_simclr checkpoint (prefix or directory): weights only.

  Variables of the checkpoint the model does not have (e.g. optimizer slots) are ignored; a
  model variable the checkpoint lacks, or of another shape, is a CheckpointMismatchError.
  """
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise ValueError(f"--checkpoint={path} is a directory without a checkpoint")
    path = latest
  elif not tf.io.gfile.exists(path + ".index"):
    raise ValueError(f"--checkpoint={path} does not exist (expected a checkpoint prefix such "
                     "as model_dir/ckpt-1000, or a directory holding checkpoints)")
  try:
    _restore(tf.train.Checkpoint(model=model), path)
  except _CORRUPT_ERRORS as err:
    raise ValueError(f"--checkpoint={path} is unreadable ({type(err).__name__})") from None
  logging.info("Initialised weights from %s", path)


def save(manager: tf.train.CheckpointManager, step: int) -> str:
  """Saves checkpoint `ckpt-<step>`; returns its path."""
  path = manager.save(checkpoint_number=step)
  logging.info("Saved %s", path)
  return path
