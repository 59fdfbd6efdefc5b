"""No silent wrong results around evaluation (issue 19): an evaluation checks the run it
evaluates and restores all of it; a model whose forward pass is not finite is neither scored
nor exported; a resume records its changed settings only once they took effect; what
TensorBoard shows is what the run trains on.

One tiny pretraining run (module fixture, in-process through run.run) stands for a model_dir.
"""

import dataclasses
import glob
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from flags import definitions
import run
import runs
from tf_simclr import checkpoints
from tf_simclr import distribute
from tf_simclr import evaluate
from tf_simclr import export
from tf_simclr import knn
from tf_simclr import model as model_lib
from tf_simclr import plan as plan_lib
from tf_simclr import rundir
from tf_simclr import train as train_lib
from tf_simclr import train_state
from tf_simclr import trainer as trainer_lib
from tf_simclr.data import sources

# One worker runs this module, so that its module-scoped fixtures are built once, not once
# per pytest-xdist worker (pytest.ini: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("eval_integrity")

TINY = dict(
  dataset="shapes10",
  train_split="train[:64]",
  eval_split="test[:40]",
  image_size=16,
  resnet_depth=18,
  width_multiplier=0.125,
  train_batch_size=8,
  eval_batch_size=40,
  warmup_epochs=0.0,
  learning_rate=0.1,
  lineareval_while_pretraining=True,
  use_tpu=False,
  seed=3,
  train_steps=1,
  checkpoint_steps=1,
)


def _values(model_dir, data_dir, **changes):
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(TINY, model_dir=str(model_dir), data_dir=data_dir)
  values.update(changes)
  return values


def _run(values):
  """run.run in this process; the model_dir lock it takes (released at exit in a process of
  its own) is released when it returns, so that the next run may take it."""
  releases, register = [], run.atexit.register
  run.atexit.register = releases.append
  try:
    return run.run(definitions.to_config(values), values)
  finally:
    run.atexit.register = register
    for release in releases:
      release()


def _listing(d):
  return sorted(os.path.relpath(p, d) for p in glob.glob(os.path.join(d, "**"), recursive=True))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """(model_dir, data_dir) of a finished 1-step pretraining run with a linear head."""
  data_dir = runs.shared_data_dir(tmp_path_factory)
  model_dir = str(tmp_path_factory.mktemp("eval_integrity") / "run")
  result = _run(_values(model_dir, data_dir, mode="train_then_eval"))
  assert result["eval/num_examples"] == 40
  return model_dir, data_dir


def _copy(tiny_run, tmp_path, without=()):
  """A copy of the tiny run's model_dir (its lock file left out), minus `without`."""
  d = str(tmp_path / "copy")
  shutil.copytree(tiny_run[0], d, ignore=shutil.ignore_patterns(rundir.LOCK_FILE, *without))
  return d


@pytest.mark.parametrize(
  "changes, named",
  [
    ({"image_size": 32}, "--image_size=16 there, 32 here"),
    (
      {"train_mode": "finetune", "ft_proj_selector": 1},
      "--train_mode=pretrain there, finetune here; --ft_proj_selector=0 there, 1 here",
    ),
  ],
)
def test_eval_refuses_settings_that_change_the_model(tiny_run, tmp_path, changes, named):
  d = _copy(tiny_run, tmp_path)
  before = {p: os.path.getmtime(os.path.join(d, p)) for p in _listing(d)}
  with pytest.raises(rundir.ModelDirError) as info:
    _run(_values(d, tiny_run[1], mode="eval", **changes))
  message = str(info.value)
  assert named in message and "--mode=eval" in message and "\n" not in message, message
  # Nothing written or overwritten: no result.json of another model, no export of it.
  assert {p: os.path.getmtime(os.path.join(d, p)) for p in _listing(d)} == before


def test_eval_scores_the_run_s_own_model(tiny_run, tmp_path):
  # Settings that only shaped training may differ; the run's own model is evaluated, as the
  # run itself evaluated it (same weights, same split).
  d = _copy(tiny_run, tmp_path)
  with open(os.path.join(tiny_run[0], "result.json")) as f:
    trained = json.load(f)
  result = _run(_values(d, tiny_run[1], mode="eval", learning_rate=5.0, eval_batch_size=20))
  for key in ("eval/label_top_1_accuracy", "eval/label_top_5_accuracy", "eval/num_examples"):
    assert result[key] == trained[key], key


def test_eval_of_a_model_of_other_shapes_is_one_line(tiny_run, tmp_path):
  # No flags.json to compare with (a model_dir copied without it): the restore itself refuses.
  d = _copy(tiny_run, tmp_path, without=("flags.json", "saved_model"))
  with pytest.raises(checkpoints.CheckpointMismatchError) as info:
    _run(_values(d, tiny_run[1], mode="eval", width_multiplier=0.25))
  message = str(info.value)
  assert f"checkpoint {d}/ckpt-1 does not match the model asked for" in message
  assert "\n" not in message and len(message) < 500, message
  assert not os.path.exists(os.path.join(d, "saved_model"))


def test_eval_restores_every_model_variable(tmp_path):
  # A checkpoint that lacks a variable of the model: an error, not a warning and the score of
  # a half-initialised model.
  saved = tf.train.Checkpoint(model=tf.train.Checkpoint(a=tf.Variable([1.0, 2.0])))
  tf.train.CheckpointManager(saved, str(tmp_path), 1).save(checkpoint_number=5)
  partial = tf.train.Checkpoint(
    model=tf.train.Checkpoint(a=tf.Variable([0.0, 0.0]), b=tf.Variable(3.0))
  )
  walk = evaluate.restored_checkpoints(partial, str(tmp_path), last_step=5, poll_secs=0.01)
  with pytest.raises(checkpoints.CheckpointMismatchError, match="ckpt-5 does not match"):
    next(walk)
  # Values of the file the model lacks (e.g. optimizer slots) are not needed to evaluate.
  only_a = tf.Variable([0.0, 0.0])
  walk = evaluate.restored_checkpoints(
    tf.train.Checkpoint(model=tf.train.Checkpoint(a=only_a)), str(tmp_path), 5
  )
  assert [step for step, _ in walk] == [5]
  np.testing.assert_array_equal(only_a.numpy(), [1.0, 2.0])


def _overflowing(state):
  """`state.model` with finite weights whose forward pass overflows float32 (as a diverged
  run's: --learning_rate=1e12)."""
  for v in state.model.trainable_variables:
    if "kernel" in v.path:
      v.assign(v * 1e8)
  assert train_lib.all_finite(state.model.variables)


def test_non_finite_forward_pass_is_neither_scored_nor_exported(tiny_run, tmp_path):
  d = _copy(tiny_run, tmp_path, without=("result*.json", "saved_model"))
  values = _values(d, tiny_run[1], mode="eval", knn_eval_every_n_steps=1)
  cfg = definitions.to_config(values)
  plan = plan_lib.make_plan(cfg)
  strategy = distribute.make_strategy("one_device")
  state = train_state.build_state(plan.cfg, strategy, plan.train_source.num_examples)
  checkpoints.restore_all(tf.train.Checkpoint(model=state.model), os.path.join(d, "ckpt-1"))
  _overflowing(state)
  with pytest.raises(evaluate.NonFiniteOutputError) as info:
    run._evaluate_and_export(plan.cfg, strategy, state, plan.eval_source, 1, True)
  message = str(info.value)
  assert "logits are not finite (NaN or inf) at step 1 on 40 of 40 examples" in message
  assert "\n" not in message
  assert not os.path.exists(os.path.join(d, "result.json"))
  assert not os.path.exists(os.path.join(d, "saved_model"))
  # The kNN monitor's features too (a run without a linear head is scored by kNN alone).
  with pytest.raises(evaluate.NonFiniteOutputError, match="features are not finite .* at step 1"):
    knn.knn_monitor(plan.cfg, strategy, state, plan.knn_sources, 1, True)
  assert not os.path.exists(os.path.join(d, "result.json"))


def test_resume_records_changed_settings_once_they_took_effect(tiny_run, tmp_path):
  d = _copy(tiny_run, tmp_path)
  os.makedirs(os.path.join(d, "ckpt-2.index"))  # The resume's checkpoint cannot be written.
  with pytest.raises(checkpoints.CheckpointWriteError):
    _run(_values(d, tiny_run[1], mode="train", train_steps=2))
  assert glob.glob(os.path.join(d, "flags_resumed_*.json")) == []
  os.rmdir(os.path.join(d, "ckpt-2.index"))
  _run(_values(d, tiny_run[1], mode="train", train_steps=2, eval_batch_size=20))
  (record,) = glob.glob(os.path.join(d, "flags_resumed_*.json"))
  changed = json.load(open(record))
  assert changed["eval_batch_size"] == {"before": 40, "now": 20}
  assert changed["train_steps"] == {"before": 1, "now": 2}


def test_a_run_removes_what_a_killed_export_left(tiny_run, tmp_path, caplog):
  d = _copy(tiny_run, tmp_path)
  ours = os.path.join(d, "saved_model", "1.tmp-" + "0123456789abcdef" * 2)
  others = [
    os.path.join(d, "saved_model", "1.tmp-mine"),  # not our pattern: kept
    os.path.join(d, "saved_model", "notes.tmp-" + "a" * 32),
  ]
  for path in [ours, *others]:
    os.makedirs(os.path.join(path, "variables"))
  caplog.set_level("WARNING")
  _run(_values(d, tiny_run[1], mode="train"))  # Nothing left to train: it only starts.
  assert not os.path.exists(ours) and all(os.path.isdir(p) for p in others)
  assert f"Removed {ours}, left by an interrupted export" in caplog.text


@pytest.mark.parametrize("train_mode", ["finetune", "distill"])
def test_augmented_views_are_what_the_run_trains_on(tiny_run, tmp_path, train_mode):
  values = _values(
    tmp_path / "m", tiny_run[1], train_mode=train_mode, teacher_checkpoint=tiny_run[0]
  )
  cfg = definitions.to_config(values)
  source = sources.load_source("shapes10", "train[:64]", tiny_run[1])
  shown = trainer_lib.view_examples(cfg, source)["images"].numpy()
  assert shown.shape == (4, 16, 16, 3)  # One view per example, not pretraining's two.
  model = model_lib.build_model(dataclasses.replace(cfg.model, num_classes=10))
  state = train_state.TrainState(model, None, None, None, None, 1, 1, teacher=model)
  trainer = trainer_lib.Trainer(cfg, distribute.make_strategy("one_device"), state)
  assert trainer.color_jitter_strength == 0.0 and not trainer.use_blur
  dataset = trainer.input_fn(source, 0)(tf.distribute.InputContext())
  trained = next(iter(dataset))["views"].numpy()[:4, 0]  # [b, V, s, s, 3]: step 0's first four
  np.testing.assert_array_equal(shown, trained)


def test_an_export_of_another_model_is_not_kept_silently(tiny_run, tmp_path, caplog):
  # As an evaluation with other settings wrote them before they were refused.
  d = _copy(tiny_run, tmp_path)
  manifest_path = os.path.join(d, "saved_model", "1", export.MANIFEST)
  with open(manifest_path) as f:
    manifest = json.load(f)
  cfg = plan_lib.make_plan(definitions.to_config(_values(d, tiny_run[1]))).cfg
  caplog.set_level("INFO", logger="absl")
  assert run._export(cfg, None, 1) == os.path.join(d, "saved_model", "1")
  assert "kept as it is" in caplog.text and "another model" not in caplog.text
  manifest["model_config"]["image_size"] = 32
  with open(manifest_path, "w") as f:
    json.dump(manifest, f)
  run._export(cfg, None, 1)
  assert (
    f"The export {d}/saved_model/1 is of another model than this run's (image_size: 32 "
    "there, 16 here)" in caplog.text
  )
