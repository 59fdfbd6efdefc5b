"""End-to-end runs of run.py in subprocesses: replica invariance, export, errors.

Each configuration of logical devices needs its own process (TensorFlow fixes them at start-up),
so every run here is a `python run.py ...` subprocess on the built-in shapes10 dataset at 16 px
(runs.COMMON). Bad input is checked in-process through the steps run.py takes (to_config,
check_batch, make_plan, build_state), and three cases through run.py itself for the one-line
contract. Interrupted and resumed runs are in test_faults.py, multi-worker runs in
test_multiworker.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from flags import definitions
import runs
from runs import COMMON
from runs import assert_one_line_error
from runs import global_relative
from runs import model_variables
from runs import run_py_concurrently

pytestmark = pytest.mark.slow
# One pytest-xdist worker runs every user of the session fixture `replica_runs`, so that its runs
# are made once (conftest.py); tests that do not need them stay out of the group.
REPLICA_RUNS = pytest.mark.xdist_group("replica_runs")


@REPLICA_RUNS
def test_replicas_give_the_same_weights(replica_runs):
  ref_dir = replica_runs[1][0]
  ref1, ref3 = (model_variables(os.path.join(ref_dir, f"ckpt-{s}")) for s in (1, 3))
  assert len(ref3) > 150  # weights, BN statistics and the optimizer's momentum buffers
  ref_update = {k: ref3[k] - ref1[k] for k in ref3}
  moved = [k for k in ref3 if np.abs(ref_update[k]).max() > 1e-7]
  assert len(moved) > 0.9 * len(ref3)
  for replicas in (2, 4):
    d = replica_runs[replicas][0]
    got1, got3 = (model_variables(os.path.join(d, f"ckpt-{s}")) for s in (1, 3))
    assert got3.keys() == ref3.keys()
    # Weights (and optimizer state) after 3 steps: the same up to float rounding. Measured:
    # ~1e-7 relative overall, ~2e-6 at worst for any single value.
    assert global_relative(ref3, got3, ref3) < 1e-5
    for k in ref3:
      assert np.abs(got3[k] - ref3[k]).max() < 2e-5, (replicas, k)
    # LARS moves weights by ~1e-4 of their norm per step, so also compare the updates of steps
    # 2 and 3 themselves: local-only negatives or unsynchronized BN change them at O(1).
    got_update = {k: got3[k] - got1[k] for k in ref3}
    assert global_relative(ref_update, got_update, ref3) < 1e-4, replicas


def _numpy_accuracies(model_dir, step):
  """Top-1 and top-5 of the export `saved_model/<step>` on the run's eval split, in NumPy."""
  from tf_simclr.data import pipeline  # pylint: disable=g-import-not-at-top
  from tf_simclr.data import sources  # pylint: disable=g-import-not-at-top

  flags_json = json.load(open(os.path.join(model_dir, "flags.json")))
  source = sources.load_source(
    flags_json["dataset"], flags_json["eval_split"], flags_json["data_dir"]
  )
  batch = next(
    iter(pipeline.eval_dataset(source, source.num_examples, 1, 0, flags_json["image_size"]))
  )
  real = batch["mask"].numpy() == 1
  exported = tf.saved_model.load(os.path.join(model_dir, "saved_model", step))
  logits = exported(batch["image"], training=False)["logits_sup"].numpy()[real]
  labels = batch["label"].numpy()[real]
  assert len(labels) == source.num_examples
  top5 = np.argsort(-logits, axis=1)[:, :5]
  return np.mean(top5[:, 0] == labels), np.mean((top5 == labels[:, None]).any(axis=1))


@REPLICA_RUNS
def test_train_then_eval_writes_results_and_export(replica_runs):
  d, res = replica_runs[1]
  result = json.load(open(os.path.join(d, "result.json")))
  assert result["global_step"] == 3
  assert result["eval/num_examples"] == 1000
  top1, top5 = _numpy_accuracies(d, "3")
  assert result["eval/label_top_1_accuracy"] == pytest.approx(top1, abs=1e-9)
  assert result["eval/label_top_5_accuracy"] == pytest.approx(top5, abs=1e-9)
  assert os.path.exists(os.path.join(d, "result_3.json"))
  flags_json = json.load(open(os.path.join(d, "flags.json")))
  assert flags_json["resnet_depth"] == 18 and flags_json["temperature"] == 0.5
  assert os.path.isdir(os.path.join(d, "saved_model", "3"))
  assert "SavedModel:" in res.stdout and "top-1" in res.stdout
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(d))


@REPLICA_RUNS
def test_export_loads_without_tf_simclr_and_fine_tunes(replica_runs, tmp_path):
  from tf_simclr import checkpoints
  from tf_simclr import model as model_lib
  from tf_simclr.config import ModelConfig

  d = replica_runs[1][0]
  images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  script = textwrap.dedent(f"""
      import numpy as np, tensorflow as tf
      try:
        import tf_simclr
        raise SystemExit("tf_simclr importable")
      except ImportError:
        pass
      m = tf.saved_model.load({os.path.join(d, "saved_model", "3")!r})
      x = tf.constant(np.load("images.npy"))
      out = m(x, training=False)
      np.savez("out.npz", **{{k: v.numpy() for k, v in out.items()}})
      with tf.GradientTape() as tape:
        logits = m(x, training=True)["logits_sup"]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.constant([0, 1, 2, 3]), logits))
      grads = tape.gradient(loss, m.trainable_variables)
      missing = sum(g is None for g in grads)
      print("GRADS", len(grads), missing)
      """)
  env = {"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3"}
  res = subprocess.run(
    [sys.executable, "-c", script],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  n_grads, missing = map(int, res.stdout.split("GRADS")[1].split())
  assert n_grads > 50 and missing == 0
  loaded = np.load(tmp_path / "out.npz")
  model = model_lib.build_model(
    ModelConfig(resnet_depth=18, width_multiplier=0.125, image_size=16, num_classes=10)
  )
  checkpoints.restore_weights(model, os.path.join(d, "ckpt-3"))
  want = model(images, training=False)
  for k in ("final_avg_pool", "proj_head_output", "logits_sup", "block_group2"):
    np.testing.assert_allclose(loaded[k], want[k].numpy(), rtol=1e-4, atol=1e-5)


# (flags, words of the error) of bad input, refused before anything is written. {tmp}: the
# test's directory, holding ids.txt (a label file naming id 99999), {teacher}: a 10-class
# tf_simclr checkpoint, and images/ (a 2-class image folder).
BAD_INPUT = {
  "temperature": (["--temperature=0"], ["temperature"]),
  "dataset": (["--dataset=shapes11"], ["shapes11", "shapes10"]),
  "folder": (["--dataset=image_folder", "--data_dir=/nonexistent/folder"], ["/nonexistent/folder"]),
  "batch": (["--cpu_replicas=2", "--train_batch_size=7"], ["train_batch_size=7", "2"]),
  "checkpoint": (
    ["--train_mode=finetune", "--checkpoint={tmp}/none"],
    ["--checkpoint", "does not exist"],
  ),
  "fraction": (
    ["--train_mode=finetune", "--train_label_fraction=0"],
    ["--train_label_fraction", "(0, 1]"],
  ),
  "label_file": (
    ["--train_mode=finetune", "--train_label_file={tmp}/ids.txt"],
    ["label file", "ids.txt", "99999"],
  ),
  "no_teacher": (["--train_mode=distill"], ["--teacher_checkpoint"]),
  "teacher_missing": (
    ["--train_mode=distill", "--teacher_checkpoint={tmp}/none"],
    ["{tmp}/none", "not exist"],
  ),
  "teacher_classes": (
    [
      "--train_mode=distill",
      "--teacher_checkpoint={teacher}",
      "--dataset=image_folder",
      "--data_dir={tmp}/images",
    ],
    ["predicts 10 classes", "have 2"],
  ),
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A fine-tuned 10-class tf_simclr checkpoint prefix, with flags.json beside it."""
  from tf_simclr import model as model_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr.config import ModelConfig  # pylint: disable=g-import-not-at-top

  d = tmp_path_factory.mktemp("teacher")
  settings = dict(resnet_depth=18, width_multiplier=0.125, image_size=16, train_mode="finetune")
  model = model_lib.build_model(ModelConfig(num_classes=10, **settings))
  prefix = tf.train.Checkpoint(model=model).save(str(d / "ckpt"))
  (d / "flags.json").write_text(json.dumps(settings))
  return prefix


def _bad_input(case, tmp_path, data_dir, teacher_prefix=None):
  """(flags of run.py, words of its error, model_dir): a BAD_INPUT case in `tmp_path`."""
  extra, words = BAD_INPUT[case]
  fill = {"tmp": str(tmp_path), "teacher": teacher_prefix}
  (tmp_path / "ids.txt").write_text("3\n99999\n")
  runs.two_class_folder(tmp_path / "images")
  model_dir = tmp_path / "m"
  model_dir.mkdir()
  (model_dir / "keep.txt").write_text("a user's file")
  args = (
    COMMON
    + [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--train_steps=1"]
    + [a.format(**fill) for a in extra]
  )
  return args, [w.format(**fill) for w in words], model_dir


def _assert_untouched(model_dir):
  """Nothing written into (or over) the model_dir."""
  assert os.listdir(model_dir) == ["keep.txt"]
  assert (model_dir / "keep.txt").read_text() == "a user's file"


def _run_in_process(args, strategies):
  """What run.py does before training, in this process: parse, check the batch, plan, build."""
  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
  from tf_simclr import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr import train_state  # pylint: disable=g-import-not-at-top

  definitions.FLAGS.unparse_flags()
  try:
    definitions.FLAGS(["run.py", *args])
    values = definitions.FLAGS.flag_values_dict()
  finally:
    definitions.FLAGS.unparse_flags()
  cfg = definitions.to_config(values)
  strategy = strategies[cfg.runtime.cpu_replicas or 1]
  distribute.check_batch(cfg.train.train_batch_size, strategy.num_replicas_in_sync)
  plan = plan_lib.make_plan(cfg)
  train_state.build_state(plan.cfg, strategy, plan.train_source.num_examples)


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_with_its_words(case, tmp_path, data_dir, teacher, strategies):
  args, words, model_dir = _bad_input(case, tmp_path, data_dir, teacher)
  with pytest.raises(ValueError) as err:
    _run_in_process(args, strategies)
  message = str(err.value)
  assert "\n" not in message and all(w in message for w in words), message
  _assert_untouched(model_dir)


def test_bad_input_is_one_line(tmp_path, data_dir):
  # The one-line contract of run.py itself, for a bad flag, bad data and a bad batch split
  # (the other cases' messages are checked in-process above): run at once.
  made = []
  for case in ("temperature", "label_file", "batch"):
    (tmp_path / case).mkdir()
    made.append(_bad_input(case, tmp_path / case, data_dir))
  results = run_py_concurrently([args for args, _, _ in made])
  for (_, words, model_dir), res in zip(made, results):
    assert_one_line_error(res, words)
    _assert_untouched(model_dir)


@REPLICA_RUNS
def test_bad_checkpoints_are_refused_and_kept(replica_runs, data_dir, tmp_path):
  d = replica_runs[2][0]
  before = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
  # Another model in this model_dir: refused (its flags.json says so), nothing written; and
  # fine-tuning with nothing to start from. Run at once.
  other_model, no_start = run_py_concurrently(
    [
      COMMON
      + [
        f"--data_dir={data_dir}",
        f"--model_dir={d}",
        "--train_steps=6",
        "--resnet_depth=34",
        "--mode=train",
      ],
      COMMON
      + [
        f"--data_dir={data_dir}",
        f"--model_dir={tmp_path / 'ft'}",
        "--train_steps=2",
        "--train_mode=finetune",
        "--mode=train",
      ],
    ]
  )
  assert_one_line_error(other_model, ["--resnet_depth=18 there, 34 here", "new --model_dir"])
  assert_one_line_error(no_start, ["--checkpoint"])
  after = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
  assert after == before
