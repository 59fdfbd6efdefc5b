"""A model_dir belongs to one run (tf_simclr.rundir), and what a careless user can pass in.

Settings compared on resume, flags.json kept, the training lock; non-finite flags refused at
parse time; results that stay valid JSON; an eval job that says what it waits for.
"""

import json
import logging
import math
import os
import socket
import threading

import pytest
import tensorflow as tf

from flags import definitions
from tf_simclr import evaluate
from tf_simclr import rundir


def _flag_defaults(**changes):
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(model_dir="/tmp/m", **changes)
  return values


def _checkpointed_dir(path, values):
  """A model_dir with a checkpoint and the flags.json of the run (`values`) that wrote it."""
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(path), 2)
  manager.save(checkpoint_number=3)
  rundir.record_flags(str(path), values)
  return str(path)


def test_resume_with_another_run_is_refused_and_flags_json_kept(tmp_path):
  pretrain = _flag_defaults(train_mode="pretrain", train_steps=10)
  d = _checkpointed_dir(tmp_path, pretrain)
  original = open(os.path.join(d, "flags.json")).read()
  with pytest.raises(rundir.ModelDirError) as info:
    rundir.check_resume(
      d, dict(pretrain, train_mode="finetune", learning_rate=0.1, checkpoint="/pre/ckpt-3")
    )
  message = str(info.value)
  assert "\n" not in message
  for words in (
    "--train_mode=pretrain there, finetune here",
    "--learning_rate=0.3 there, 0.1",
    "--checkpoint=None there, /pre/ckpt-3 here",
    "new --model_dir",
  ):
    assert words in message, message
  # Settings that may change: extend, other eval batch, devices. Leaving out --checkpoint too.
  resumed = dict(pretrain, train_steps=20, eval_batch_size=64, cpu_replicas=2)
  assert rundir.check_resume(d, resumed) is True
  path = rundir.record_flags(d, resumed)
  assert open(os.path.join(d, "flags.json")).read() == original
  assert os.path.basename(path).startswith("flags_resumed_")
  assert json.load(open(path)) == {
    "train_steps": {"before": 10, "now": 20},
    "eval_batch_size": {"before": 256, "now": 64},
    "cpu_replicas": {"before": 0, "now": 2},
  }
  # Without a checkpoint there is nothing to resume: a new run, whatever flags.json says.
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  (fresh / "flags.json").write_text(original)
  assert rundir.check_resume(str(fresh), dict(pretrain, train_mode="finetune")) is False


def test_training_lock_names_its_holder_and_is_taken_over_when_gone(tmp_path, caplog):
  d = str(tmp_path / "m")
  first = rundir.TrainingLock(d)
  first.acquire()
  held = json.load(open(os.path.join(d, "train.lock")))
  assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
  # Another holder (a second open file description, as another process has) is refused.
  with pytest.raises(rundir.ModelDirError) as info:
    rundir.TrainingLock(d).acquire()
  assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(info.value)
  assert "--mode=eval" in str(info.value)
  first.release()
  assert not os.path.exists(d)  # created by the lock and left empty: removed again
  # A crashed holder leaves its file, but no lock (the kernel drops it with the process).
  os.makedirs(d)
  with open(os.path.join(d, "train.lock"), "w") as f:
    json.dump({"host": "gone-host", "pid": 123456, "started": "earlier"}, f)
  with rundir.TrainingLock(d):
    assert json.load(open(os.path.join(d, "train.lock")))["pid"] == os.getpid()
  assert "Taking over" in caplog.text and "pid 123456 on host gone-host" in caplog.text
  assert os.listdir(d) == []


@pytest.mark.parametrize(
  "changes,words",
  [
    ({"learning_rate": math.nan}, "--learning_rate must be a finite number, got nan"),
    ({"momentum": math.inf}, "--momentum must be a finite number, got inf"),
    ({"weight_decay": math.nan}, "--weight_decay must be a finite number"),
    ({"temperature": math.nan}, "--temperature must be > 0, got nan"),
    ({"sk_ratio": -1.0}, "--sk_ratio must be >= 0, got -1.0"),
    ({"keep_checkpoint_max": 0}, "--keep_checkpoint_max must be >= 1"),
    ({"eval_timeout_s": -1.0}, "--eval_timeout_s must be >= 0"),
  ],
)
def test_flags_refused_at_parse_time(changes, words):
  definitions.validate(_flag_defaults())  # the defaults pass
  with pytest.raises(ValueError, match=words.replace("(", r"\(")):
    definitions.validate(_flag_defaults(**changes))


def test_results_of_a_diverged_model_are_valid_json(tmp_path):
  evaluate.write_results(
    str(tmp_path), {"eval/label_top_1_accuracy": 0.1, "eval/regularization_loss": math.nan}, 4
  )

  def strict(name):
    raise ValueError(f"not JSON: {name}")

  got = json.loads((tmp_path / "result.json").read_text(), parse_constant=strict)
  assert got == {
    "eval/label_top_1_accuracy": 0.1,
    "eval/regularization_loss": None,
    "global_step": 4,
  }


def test_eval_waits_with_a_bound_and_says_so(tmp_path, caplog):
  caplog.set_level(logging.INFO, logger="absl")
  ckpt = tf.train.Checkpoint(value=tf.Variable(0.0))
  walk = evaluate.restored_checkpoints(
    ckpt, str(tmp_path), last_step=4, poll_secs=0.01, timeout_secs=0.1
  )
  with pytest.raises(
    ValueError,
    match=f"no checkpoint appeared in {tmp_path} within "
    r"--eval_timeout_s=0.1 s",
  ):
    next(walk)
  assert f"Waiting for a checkpoint in {tmp_path} (up to 0.1 s; --eval_timeout_s)" in caplog.text
  # After some checkpoints, a timeout ends the walk (a training job that stopped early).
  manager = tf.train.CheckpointManager(ckpt, str(tmp_path), max_to_keep=3)
  manager.save(checkpoint_number=2)
  walk = evaluate.restored_checkpoints(
    ckpt, str(tmp_path), last_step=4, poll_secs=0.01, timeout_secs=0.1
  )
  assert [step for step, _ in walk] == [2]
  assert "No new checkpoint" in caplog.text


def test_eval_beside_training_evaluates_every_checkpoint_in_turn(tmp_path):
  """What `--mode=eval` walks (run.py): each checkpoint the training job writes, in order, the
  intermediate ones too, restored (the value read is the one saved at that step)."""
  written = tf.Variable(0.0)
  manager = tf.train.CheckpointManager(tf.train.Checkpoint(value=written), str(tmp_path), 2)
  for s in (1, 2):  # two listed before the evaluator's first look: both are evaluated
    written.assign(float(s))
    manager.save(checkpoint_number=s)
  evaluated, seen = [], {s: threading.Event() for s in (2, 3, 4)}

  def train():  # the next checkpoints come only once the evaluator is at the previous one
    for s in (3, 4):
      assert seen[s - 1].wait(60)
      written.assign(float(s))
      manager.save(checkpoint_number=s)  # max_to_keep=2: older ones are pruned meanwhile

  trainer = threading.Thread(target=train)
  trainer.start()
  read = tf.Variable(0.0)
  try:
    walk = evaluate.restored_checkpoints(
      tf.train.Checkpoint(value=read), str(tmp_path), last_step=4, poll_secs=0.01, timeout_secs=60
    )
    for step, _ in walk:
      evaluated.append((step, float(read.numpy())))
      if step in seen:
        seen[step].set()
  finally:
    for event in seen.values():
      event.set()
    trainer.join()
  assert evaluated == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
