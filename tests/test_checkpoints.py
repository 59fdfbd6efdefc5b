"""Checkpoint restore: newest readable wins, damaged ones are kept aside, mismatches stop."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import checkpoints


def _model(width=4):
  m = keras.Sequential([keras.layers.Dense(width, name="d1"), keras.layers.Dense(2, name="d2")])
  m.build((None, 3))
  return m


def _manager(model, directory, step=None):
  step = step if step is not None else tf.Variable(0, dtype=tf.int64)
  ckpt = tf.train.Checkpoint(model=model, step=step)
  return (
    ckpt,
    tf.train.CheckpointManager(ckpt, directory, max_to_keep=5, checkpoint_name="ckpt"),
    step,
  )


def _save_three(directory):
  model = _model()
  ckpt, manager, step = _manager(model, directory)
  values = []
  for s in (1, 2, 3):
    for v in model.weights:
      v.assign(tf.fill(v.shape, float(s)))
    step.assign(s)
    checkpoints.save(manager, s)
    values.append(s)
  return values


def test_restores_newest(tmp_path):
  _save_three(str(tmp_path))
  model = _model()
  ckpt, manager, step = _manager(model, str(tmp_path))
  assert checkpoints.restore_latest(ckpt, manager, str(tmp_path))
  assert int(step.numpy()) == 3
  np.testing.assert_array_equal(model.weights[0].numpy(), 3.0)


def test_corrupt_latest_falls_back_and_keeps_files(tmp_path):
  d = str(tmp_path)
  _save_three(d)
  data = [f for f in os.listdir(d) if f.startswith("ckpt-3.data")][0]
  with open(os.path.join(d, data), "r+b") as f:  # a write cut short
    f.truncate(10)
  before = sorted(os.listdir(d))
  model = _model()
  ckpt, manager, step = _manager(model, d)
  assert checkpoints.restore_latest(ckpt, manager, d)
  assert int(step.numpy()) == 2
  np.testing.assert_array_equal(model.weights[0].numpy(), 2.0)
  after = os.listdir(d)
  # Nothing deleted: the damaged files are still there under a new name.
  assert len(after) == len(before)
  assert any(f.startswith(data + ".corrupt-") for f in after)
  # The next save at step 3 does not collide with the damaged checkpoint's bytes.
  checkpoints.save(manager, 3)
  assert tf.train.latest_checkpoint(d).endswith("ckpt-3")


def test_mismatched_model_is_refused(tmp_path):
  d = str(tmp_path)
  _save_three(d)
  model = _model(width=5)  # another experiment's shapes
  ckpt, manager, _ = _manager(model, d)
  before = sorted(os.listdir(d))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="does not match"):
    checkpoints.restore_latest(ckpt, manager, d)
  assert sorted(os.listdir(d)) == before  # untouched
  assert not any(".corrupt" in f for f in os.listdir(d))


def test_empty_dir_restores_nothing(tmp_path):
  ckpt, manager, _ = _manager(_model(), str(tmp_path))
  assert not checkpoints.restore_latest(ckpt, manager, str(tmp_path))


def test_restore_weights_from_a_prefix(tmp_path):
  # What a user may give (a directory, one of a checkpoint's files) is resolved to the prefix by
  # model_source.identify: test_model_source.py.
  d = str(tmp_path)
  _save_three(d)
  model = _model()
  checkpoints.restore_weights(model, os.path.join(d, "ckpt-2"))
  np.testing.assert_array_equal(model.weights[0].numpy(), 2.0)
  with pytest.raises(checkpoints.CheckpointMismatchError):
    checkpoints.restore_weights(_model(width=6), os.path.join(d, "ckpt-3"))


def test_set_aside_checkpoint_stays_aside_on_the_next_restore(tmp_path):
  # A run that set a damaged checkpoint aside and stopped before its next save leaves it in
  # the index: the next restore falls back again, without renaming the kept files twice.
  d = str(tmp_path)
  _save_three(d)
  with open(os.path.join(d, "ckpt-3.index"), "r+b") as f:
    f.truncate(5)
  for _ in range(2):
    model = _model()
    ckpt, manager, step = _manager(model, d)
    assert checkpoints.restore_latest(ckpt, manager, d)
    assert int(step.numpy()) == 2
  aside = sorted(f for f in os.listdir(d) if ".corrupt-" in f)
  assert aside == ["ckpt-3.data-00000-of-00001.corrupt-0", "ckpt-3.index.corrupt-0"]


def test_other_worker_restores_from_model_dir_and_leaves_files(tmp_path):
  d = str(tmp_path / "model")
  _save_three(d)
  with open(os.path.join(d, "ckpt-3.index"), "r+b") as f:
    f.truncate(5)
  before = sorted(os.listdir(d))
  model = _model()
  step = tf.Variable(0, dtype=tf.int64)
  ckpt = tf.train.Checkpoint(model=model, step=step)
  manager = tf.train.CheckpointManager(
    ckpt, str(tmp_path / "model" / "workertemp_1"), max_to_keep=5, checkpoint_name="ckpt"
  )
  assert checkpoints.restore_latest(ckpt, manager, d)
  assert int(step.numpy()) == 2  # the chief's newest readable checkpoint
  assert sorted(os.listdir(d)) == before  # setting aside is the chief's job


def test_temporary_save_writes_then_leaves_nothing(tmp_path):
  # A non-chief worker's save must really write (under MultiWorkerMirroredStrategy saving is a
  # collective every worker joins), then delete its copy.
  d = tmp_path / "model" / "workertemp_1"
  ckpt, manager, _ = _manager(_model(), str(d))
  for s in (1, 2):
    path = checkpoints.save(manager, s, temporary=True)
    assert path == str(d / f"ckpt-{s}")
    assert not d.exists()
    assert int(ckpt.save_counter.numpy()) == s  # the checkpoint's own save ran
    assert manager.latest_checkpoint == path
  # Where nothing can be written, the write fails as the chief's would: it was attempted.
  blocked = tmp_path / "a_file"
  blocked.write_text("")
  ckpt, manager, _ = _manager(_model(), str(blocked / "workertemp_1"))
  with pytest.raises(checkpoints.CheckpointWriteError, match="cannot write checkpoint"):
    checkpoints.save(manager, 1, temporary=True)


def test_save_replaces_debris_of_an_interrupted_write(tmp_path):
  d = str(tmp_path)
  ckpt, manager, _ = _manager(_model(), d)
  os.makedirs(os.path.join(d, "ckpt-1_temp"))  # as a process killed mid-write leaves it
  open(
    os.path.join(d, "ckpt-1_temp", "part-00000-of-00001.data-00000-of-00001.tempstate1"), "w"
  ).close()
  checkpoints.save(manager, 1)
  assert sorted(os.listdir(d)) == ["checkpoint", "ckpt-1.data-00000-of-00001", "ckpt-1.index"]


def test_failed_save_is_one_line_and_keeps_the_index(tmp_path):
  # A directory under a regular file cannot be written, whoever runs the test.
  (tmp_path / "a_file").write_text("")
  ckpt, manager, _ = _manager(_model(), str(tmp_path / "a_file" / "model"))
  with pytest.raises(checkpoints.CheckpointWriteError) as info:
    checkpoints.save(manager, 7)
  message = str(info.value)
  assert "ckpt-7" in message and "earlier checkpoints are intact" in message
  assert "\n" not in message and "function_node" not in message
  assert isinstance(info.value, OSError)  # run.py reports OSErrors as one line


def test_unlisted_checkpoint_is_not_restored(tmp_path):
  # Killed after writing its first checkpoint's files but before the index: start afresh.
  d = str(tmp_path)
  _save_three(d)
  os.remove(os.path.join(d, "checkpoint"))
  ckpt, manager, step = _manager(_model(), d)
  assert not checkpoints.restore_latest(ckpt, manager, d)
  assert int(step.numpy()) == 0


def test_a_shape_mismatch_is_one_line_naming_the_variable(tmp_path, caplog):
  d = str(tmp_path)
  _save_three(d)
  ckpt, manager, step = _manager(_model(width=5), d)
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    checkpoints.restore_all(ckpt, os.path.join(d, "ckpt-3"))
  message = str(info.value)
  assert "\n" not in message
  # The first variable met of either layer whose shape the width changes.
  assert any(
    f"has shape {a} there, {b} here" in message
    for a, b in (("[3, 4]", "[3, 5]"), ("[4]", "[5]"), ("[4, 2]", "[5, 2]"))
  ), message
  assert message.startswith(f"checkpoint {d}/ckpt-3 does not match the model asked for (model/")
  # Refused before restoring anything: no value of the other model was assigned.
  assert int(step.numpy()) == 0
