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

import keras
import pytest
import tensorflow as tf

from flags import definitions
from tf_simclr import config as config_lib
from tf_simclr import evaluate
from tf_simclr import rundir
from tf_simclr.data import label_subsets


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
    ({"temperature": 1e-30}, "--temperature=1e-30 is below 2e-09"),
    ({"temperature": 1e-39, "hidden_norm": False}, "--temperature=1e-39 is below 1.18e-38"),
    ({"train_batch_size": 1}, "pretraining needs a global batch of at least 2"),
    ({"image_size": 100000}, "--image_size must be <= 2048"),
    ({"strategy": "one_device", "cpu_replicas": 4}, "--strategy=one_device runs on one device"),
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


def _main_status(monkeypatch, capsys, failure):
  """(exit status, stderr) of run.main when the run itself fails by calling `failure()`."""
  import run  # pylint: disable=g-import-not-at-top

  monkeypatch.delenv("TF_SIMCLR_TRACEBACK", raising=False)
  monkeypatch.setattr(run.definitions, "to_config", lambda values: None)
  monkeypatch.setattr(run, "run", lambda cfg, values: failure())
  with pytest.raises(SystemExit) as info:
    run.main(["run.py"])
  return info.value.code, capsys.readouterr().err


def _file_under_a_file(path):
  path.write_text("")
  tf.io.gfile.GFile(str(path / "x.txt"), "w").write("x")


@pytest.mark.parametrize(
  "failure,words",
  [
    # A `raise` of ours, and one of our classes.
    (lambda: config_lib.check_width(0.001), "error: width_multiplier must be a positive"),
    (lambda: label_subsets.read_label_file("/nonexistent/ids.txt"), "error: label file"),
    (lambda: open("/nonexistent/dir/x"), "error: [Errno 2] No such file or directory"),
  ],
)
def test_bad_input_and_its_environment_are_one_line(monkeypatch, capsys, failure, words):
  status, err = _main_status(monkeypatch, capsys, failure)
  assert status == 1 and "Traceback" not in err, err
  assert err.strip().splitlines()[-1].startswith(words)


def test_a_full_or_unwritable_disk_from_tensorflow_stays_one_line(monkeypatch, capsys, tmp_path):
  status, err = _main_status(monkeypatch, capsys, lambda: _file_under_a_file(tmp_path / "f"))
  assert status == 1 and "Traceback" not in err, err
  assert err.strip().splitlines()[-1].startswith("error: FailedPreconditionError: ")


@pytest.mark.parametrize(
  "failure,kind",
  [
    # ValueErrors raised inside TensorFlow and Keras: not the user's input.
    (lambda: tf.reshape(tf.zeros([3]), [2]), "InvalidArgumentError"),
    (lambda: keras.layers.Dense(4)(tf.zeros([2])), "ValueError"),
    (lambda: tf.ones([2]).numpy().reshape(3), "ValueError"),  # NumPy's
    (lambda: int("three"), "ValueError"),  # a builtin's in our code: not a `raise` of ours
    (lambda: {}["key"], "KeyError"),
  ],
)
def test_internal_errors_keep_their_traceback_and_say_they_are_bugs(
  monkeypatch, capsys, failure, kind
):
  status, err = _main_status(monkeypatch, capsys, failure)
  assert status == 70, err
  assert "Traceback" in err, err
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"internal error ({kind}): this is a bug in tf_simclr"), last


def test_run_py_refuses_a_batch_without_negatives_in_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  args = [sys.executable, os.path.join(root, "run.py"), f"--model_dir={tmp_path / 'm'}"]
  res = subprocess.run(
    args + ["--train_steps=1", "--train_batch_size=1"], capture_output=True, text=True
  )
  assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
  assert res.stderr.strip().splitlines() == [
    "error: --train_batch_size=1: pretraining needs a global batch of at least 2 (each "
    "example's negatives are the other examples of the batch)"
  ]
  assert not os.path.exists(tmp_path / "m")


def test_eval_must_evaluate_the_run_s_own_model(tmp_path):
  pretrain = _flag_defaults(train_mode="pretrain", image_size=16, train_steps=10)
  d = _checkpointed_dir(tmp_path, pretrain)
  # Settings that only shaped training may differ (and a training job's flags.json may not
  # exist yet: nothing to compare).
  rundir.check_eval(d, dict(pretrain, learning_rate=9.0, train_batch_size=7, mode="eval"))
  rundir.check_eval(str(tmp_path / "not_yet"), dict(pretrain, image_size=32))
  with pytest.raises(rundir.ModelDirError) as info:
    rundir.check_eval(d, dict(pretrain, image_size=32, ft_proj_selector=1, learning_rate=9.0))
  assert str(info.value) == (
    f"{d} holds the checkpoints of another run (--image_size=16 there, 32 here; "
    "--ft_proj_selector=0 there, 1 here): --mode=eval evaluates them as the run that wrote "
    f"them. Give that run's settings ({d}/flags.json)"
  )


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
