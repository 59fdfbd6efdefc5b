"""Checkpoint restore and save that never lose what a user has.

* The newest checkpoint that restores is used; an unreadable one (half-written, truncated) is
  skipped with a warning and renamed aside (`.corrupt`), never deleted.
* A checkpoint that does not fit the model asked for (other depth, width, heads) stops the run
  with one line: it belongs to another experiment.
* Writes are atomic where it matters. `tf.train.CheckpointManager.save` (TF 2.21) writes the
  data into `ckpt-N_temp/`, merges it into `ckpt-N.data-*` and `ckpt-N.index`, and only then
  rewrites the `checkpoint` index (to a temporary file, renamed over the old one). Only the
  checkpoints that index lists are restored, so a run killed mid-write leaves the previous
  checkpoint as the newest one; the next save of step N replaces the debris.
* A failed write (disk full, no permission) raises CheckpointWriteError, one line, after
  removing its own temporary files; the earlier checkpoints and the index are untouched.
* In multi-worker training every worker restores from the chief's `model_dir`; the others
  write their (identical) copies to `workertemp_<task>/`, deleted after each save.

Also the reading of other checkpoints: the object graph a TF2 checkpoint stores
(`ObjectGraph`, `object_graph`, `variable_key`), by which `model_source`, `reference_arch`,
`reference_weights` and `export` find values without building the saved objects.
"""

from __future__ import annotations

import os
import re

from absl import logging
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from tf_simclr import errors

# What reading a checkpoint raises when its files are missing or damaged: a truncated index file
# fails with a bare OpError of code UNKNOWN ("file is too short to be an sstable"), a data file
# cut short with IndexError ("Read less bytes than requested"). `_is_corrupt` tells damage from
# storage that cannot be reached now (UNAVAILABLE, PERMISSION_DENIED: raised, not skipped).
READ_ERRORS = (tf.errors.OpError, IndexError)
_CORRUPT_CODES = frozenset(
  {
    tf.errors.DATA_LOSS,
    tf.errors.NOT_FOUND,
    tf.errors.OUT_OF_RANGE,
    tf.errors.INVALID_ARGUMENT,
    tf.errors.UNKNOWN,
  }
)


def _is_corrupt(err) -> bool:
  return not isinstance(err, tf.errors.OpError) or err.error_code in _CORRUPT_CODES


class CheckpointMismatchError(ValueError):
  """A checkpoint's variables do not fit the model being built."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only or missing directory)."""


def worker_dir(model_dir: str) -> str:
  """Where a non-chief worker writes the checkpoints MultiWorkerMirroredStrategy requires."""
  task = tf.distribute.cluster_resolver.TFConfigClusterResolver().task_id or 0
  return os.path.join(model_dir, f"workertemp_{task}")


def _mismatch(path, err):
  first = errors.first_line(err)
  return CheckpointMismatchError(
    f"checkpoint {path} does not match the model asked for ({first[:200]}); use the flags it "
    "was trained with, or a new --model_dir"
  )


def _set_aside(path):
  """Renames a damaged checkpoint's files to `<name>.corrupt-N`, keeping their bytes."""
  for name in tf.io.gfile.glob(path + ".*"):
    if ".corrupt-" in name:  # set aside before (by a run that stopped before its next save)
      continue
    suffix = 0
    while tf.io.gfile.exists(f"{name}.corrupt-{suffix}"):
      suffix += 1
    tf.io.gfile.rename(name, f"{name}.corrupt-{suffix}")


def restore_all(checkpoint, path):
  """Restores `path` into every object of `checkpoint`, ignoring extra saved values.

  Values the file has and `checkpoint` lacks (e.g. optimizer slots, restoring into
  `Checkpoint(model=model)` for evaluation, which they do not change) are not an error.

  Raises:
    CheckpointMismatchError: a variable of `checkpoint` is missing from `path` or has another
      shape (TF reports the latter as a ValueError during restore).
    READ_ERRORS: the files cannot be read.
  """
  _check_shapes(checkpoint, path)
  # The save counter exists before the restore, so it is read with the other values. TF would
  # create it after them and read it from `path` again: a file pruned in between (a training
  # job's keep_checkpoint_max) left that read pending, and it failed every later restore.
  _ = checkpoint.save_counter
  try:
    status = checkpoint.restore(path)
    status.expect_partial()
    status.assert_existing_objects_matched()
  except (AssertionError, ValueError) as err:
    raise _mismatch(path, err) from None
  return status


def _check_shapes(checkpoint, path):
  """CheckpointMismatchError when a variable of `checkpoint` has another shape in `path`.

  Checked before restoring: a restore that fails part-way logs a warning for each value it did
  not restore (~80 lines before the one-line error). Unreadable files are left to the restore.
  """
  try:
    reader = tf.train.load_checkpoint(path)
    graph = object_graph(reader)
  except (*READ_ERRORS, ValueError):
    return
  shapes, view = reader.get_variable_to_shape_map(), tf.train.TrackableView(checkpoint)
  stack, seen = [(checkpoint, graph.nodes[0], "")], set()
  while stack:
    obj, node, where = stack.pop()
    if id(obj) in seen:
      continue
    seen.add(id(obj))
    keys = [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
    if keys and keys[0] in shapes and hasattr(obj, "shape"):
      if list(shapes[keys[0]]) != list(obj.shape):
        raise CheckpointMismatchError(
          f"checkpoint {path} does not match the model asked for ({where[1:]} has shape "
          f"{shapes[keys[0]]} there, {list(obj.shape)} here); use the flags it was trained "
          "with, or a new --model_dir"
        )
    children = view.children(obj)
    for child in node.children:
      if child.local_name in children:
        stack.append(
          (children[child.local_name], graph.nodes[child.node_id], f"{where}/{child.local_name}")
        )


def _listed_checkpoints(model_dir: str) -> list[str]:
  """The checkpoints the `checkpoint` index of `model_dir` lists, oldest first."""
  state = tf.train.get_checkpoint_state(model_dir)
  paths = list(state.all_model_checkpoint_paths) if state is not None else []
  if not paths:
    unlisted = tf.io.gfile.glob(os.path.join(model_dir, "ckpt-*.index"))
    if unlisted:
      logging.warning(
        "Ignoring %s: no `checkpoint` index lists it (a run stopped while "
        "writing its first checkpoint leaves this)",
        ", ".join(sorted(unlisted)),
      )
  return paths


def restore_latest(
  checkpoint: tf.train.Checkpoint, manager: tf.train.CheckpointManager, model_dir: str
) -> bool:
  """Restores the newest readable checkpoint of `model_dir`; False when there is none.

  `manager` is the one that saves this process's checkpoints: in `model_dir` on the chief
  (which alone renames damaged checkpoints aside), in a `worker_dir` on other workers.

  Raises:
    CheckpointMismatchError: the newest readable checkpoint does not fit the model.
  """
  # Create the save counter now rather than inside a restore: under MultiWorkerMirroredStrategy
  # creating a variable is a collective, which a worker with nothing to restore would not join.
  _ = checkpoint.save_counter
  owner = os.path.normpath(manager.directory) == os.path.normpath(model_dir)
  candidates = list(reversed(_listed_checkpoints(model_dir)))
  for i, path in enumerate(candidates):
    try:
      restore_all(checkpoint, path)
    except READ_ERRORS as err:
      if not _is_corrupt(err):
        raise
      logging.warning(
        "Checkpoint %s is unreadable (%s); trying the previous one. Its files are "
        "kept as *.corrupt-N.",
        path,
        type(err).__name__,
      )
      if owner:
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
    raise ValueError(
      f"no checkpoint in {model_dir} could be read (the damaged ones were kept "
      "as *.corrupt-N); move them away to start afresh"
    )
  return False


def restore_weights(model, path: str) -> None:
  """Initialises `model` from the tf_simclr checkpoint prefix `path`: weights only.

  `model_source.identify` turns what a user gives (one of the checkpoint's files, a directory)
  into the prefix. Variables of the checkpoint the model does not have (e.g. optimizer slots)
  are ignored; a model variable the checkpoint lacks, or of another shape, is a
  CheckpointMismatchError.
  """
  try:
    restore_all(tf.train.Checkpoint(model=model), path)
  except READ_ERRORS as err:
    if not _is_corrupt(err):
      raise
    raise ValueError(f"--checkpoint={path} is unreadable ({type(err).__name__})") from None
  logging.info("Initialised weights from %s", path)


def _remove_temporary(prefix):
  """Deletes `<prefix>_temp/`, where TF writes a checkpoint's data before merging it."""
  if tf.io.gfile.exists(prefix + "_temp"):
    tf.io.gfile.rmtree(prefix + "_temp")


def save(manager: tf.train.CheckpointManager, step: int, temporary: bool = False) -> str:
  """Saves checkpoint `ckpt-<step>`; returns its path.

  Args:
    manager: writes into its directory; see the module docstring for the write order.
    step: the checkpoint's number.
    temporary: a non-chief worker's copy (MultiWorkerMirroredStrategy needs every worker to
      save): deleted, with its directory, once written.

  Raises:
    CheckpointWriteError: the write failed; the previous checkpoints are intact.
  """
  prefix = os.path.join(manager.directory, f"ckpt-{step}")
  try:
    # Debris of an earlier write of this checkpoint, interrupted: TF would keep it forever.
    _remove_temporary(prefix)
    path = manager.save(checkpoint_number=step)
  except tf.errors.OpError as err:
    try:
      _remove_temporary(prefix)  # what this failed write left
    except tf.errors.OpError:
      pass
    # TF says "<temporary file>; File too large [Op:SaveV2]": keep the reason.
    reason = re.sub(r"\s*\[Op:\w+\]$", "", errors.first_line(err)).rsplit("; ", 1)[-1]
    raise CheckpointWriteError(
      f"cannot write checkpoint {prefix} ({type(err).__name__}: {reason[:300]}); is the disk "
      "full or the directory read-only? The earlier checkpoints are intact"
    ) from None
  if temporary:
    tf.io.gfile.rmtree(manager.directory)
  else:
    logging.info("Saved %s", path)
  return path


# ----------------------------------------------------------------------------------------------
# The object graph of a TF2 checkpoint: values by object path, without building the objects.


def object_graph(reader) -> trackable_object_graph_pb2.TrackableObjectGraph:
  """The object graph a TF2 checkpoint stores (`reader`: `tf.train.load_checkpoint`)."""
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
  return graph


def object_node(graph, names):
  """The node of `graph` at object path `names` (attribute names from the root; KeyError)."""
  node = graph.nodes[0]
  for name in names:
    ids = [c.node_id for c in node.children if c.local_name == name]
    if not ids:
      raise KeyError("/".join(names))
    node = graph.nodes[ids[0]]
  return node


def variable_key(graph, names) -> str:
  """Key in a TF2 checkpoint of the variable at object path `names` from the root.

  A checkpoint keys each value by one of the paths that reach it (the shortest, e.g. through
  the optimizer); the object graph it stores resolves any path. A SavedModel's `variables/`
  is such a checkpoint: `variable_key(graph, ["variables", "3"])` is `obj.variables[3]`.

  Args:
    graph: `object_graph(reader)`.
    names: attribute names (list indices as strings), e.g. ["model", "supervised_head",
      "dense", "kernel"].

  Raises:
    KeyError: no such path.
  """
  keys = [
    a.checkpoint_key for a in object_node(graph, names).attributes if a.name == "VARIABLE_VALUE"
  ]
  if not keys:
    raise KeyError("/".join(names))
  return keys[0]


def variable_keys_under(graph, names) -> list[str]:
  """Keys of every variable reachable from the object at path `names` (KeyError: no such)."""
  keys, seen, stack = [], set(), [object_node(graph, names)]
  while stack:
    node = stack.pop()
    keys += [a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"]
    for child in node.children:
      if child.node_id not in seen:
        seen.add(child.node_id)
        stack.append(graph.nodes[child.node_id])
  return keys


class ObjectGraph:
  """A TF2 checkpoint's values addressed by object path (tuples of attribute names).

  Raises (on construction) tf.errors.OpError or ValueError when the checkpoint is unreadable.
  """

  def __init__(self, prefix: str):
    self.reader = tf.train.load_checkpoint(prefix)
    self.graph = object_graph(self.reader)
    self.shapes = self.reader.get_variable_to_shape_map()

  def node(self, names):
    """The node at object path `names`; None when there is none."""
    try:
      return object_node(self.graph, list(names))
    except KeyError:
      return None

  def children(self, names) -> list[str]:
    node = self.node(names)
    return [] if node is None else [c.local_name for c in node.children]

  def items(self, names) -> list[int]:
    """Indices of the list at `names` whose items hold variables, in order."""
    found = [int(n) for n in self.children(names) if n.isdigit()]
    return sorted(i for i in found if variable_keys_under(self.graph, list(names) + [str(i)]))

  def shape(self, names) -> tuple | None:
    """Shape of the variable at `names`; None when there is none."""
    try:
      return tuple(self.shapes[variable_key(self.graph, list(names))])
    except KeyError:
      return None

  def shapes_under(self, names) -> list[tuple]:
    """Shapes of every variable reachable from the object at `names` ([] when there is none)."""
    try:
      return [tuple(self.shapes[k]) for k in variable_keys_under(self.graph, list(names))]
    except KeyError:
      return []

  def value(self, names):
    return self.reader.get_tensor(variable_key(self.graph, list(names)))
