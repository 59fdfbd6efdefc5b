"""End to end after pretraining: kNN monitor, linear evaluation, few labels, distillation and
continuous evaluation, all as `run.py` subprocesses, after one small shapes10 pretraining.

The pretraining is the 1-replica run of the session fixture `replica_runs` (conftest.py; 3 steps,
then eval and export), which test_run_e2e.py also uses. Then, at once (~2-3 steps each):
  lin        linear evaluation (fine_tune_after_block=4) from the pretraining's SavedModel, on a
             10% label subset, with the kNN monitor every step, then eval;
  dis        distillation with the pretraining's checkpoint as teacher, same subset, labelled
             weight 0.5, on 2 CPU replicas (MirroredStrategy, teacher included),
             keep_checkpoint_max=1 (checkpoints pruned as it goes);
  dis_eval   --mode=eval on dis's model_dir while dis trains: evaluates and exports.
Whether fine-tuning from a pretraining beats training from scratch needs minutes of training
on shapes10, so it is measured outside the suite (README).
"""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from runs import COMMON
from runs import checkpoint_values
from runs import numpy_knn
from runs import run_py_concurrently
from tf_simclr import checkpoints
from tf_simclr.data import label_subsets
from tf_simclr.data import pipeline
from tf_simclr.data import sources

# xdist_group: one pytest-xdist worker runs every user of the session fixture `replica_runs`,
# so that its runs are made once (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("replica_runs")]


@pytest.fixture(scope="module")
def pretrained(replica_runs):
  return replica_runs[1][0]  # ckpt-1..3, saved_model/3, flags.json


@pytest.fixture(scope="module")
def after(pretrained, data_dir, tmp_path_factory):
  pre = pretrained
  dirs = {name: str(tmp_path_factory.mktemp(name)) for name in ("lin", "dis")}
  few = COMMON + [
    f"--data_dir={data_dir}",
    "--eval_split=test[:200]",
    "--checkpoint_steps=1",
    "--train_label_fraction=0.1",
  ]
  distill = few + [
    f"--model_dir={dirs['dis']}",
    "--train_mode=distill",
    "--train_steps=3",
    f"--teacher_checkpoint={pre}",
    "--distill_label_weight=0.5",
    "--distill_temperature=2",
    "--keep_checkpoint_max=1",
    "--cpu_replicas=2",
    "--width_multiplier=0.25",  # another width than the teacher's: the export tells them apart
  ]
  commands = {
    "lin": few
    + [
      f"--model_dir={dirs['lin']}",
      "--train_mode=finetune",
      "--mode=train_then_eval",
      "--fine_tune_after_block=4",
      "--zero_init_logits_layer",
      "--optimizer=momentum",
      "--learning_rate=0.1",
      "--weight_decay=0",
      "--train_steps=2",
      "--knn_eval_every_n_steps=1",
      "--knn_k=20",
      f"--checkpoint={os.path.join(pre, 'saved_model', '3')}",
    ],
    "dis": distill + ["--mode=train"],
    "dis_eval": distill + ["--mode=eval"],
  }
  results = dict(zip(commands, run_py_concurrently(list(commands.values()))))
  for name in ("lin", "dis"):
    assert results[name].returncode == 0, (name, results[name].stderr[-3000:])
  return dirs, results


def _numpy_knn_accuracy(lin, k):
  """kNN top-1 of the pretraining export's features: bank the run's label subset, queries
  test[:200], as the monitor (T = 0.07, the default), in NumPy."""
  flags_json = json.load(open(os.path.join(lin, "flags.json")))
  export = tf.saved_model.load(flags_json["checkpoint"])
  data_dir, size = flags_json["data_dir"], flags_json["image_size"]
  ids = label_subsets.read_label_file(os.path.join(lin, "label_subset.txt"))
  bank_and_queries = [
    label_subsets.subset_source(sources.load_source("shapes10", "train", data_dir), ids),
    sources.load_source("shapes10", "test[:200]", data_dir),
  ]
  features, labels = [], []
  for source in bank_and_queries:
    batch = next(iter(pipeline.eval_dataset(source, source.num_examples, 1, 0, size)))
    real = batch["mask"].numpy() == 1
    features.append(export(batch["image"], training=False)["final_avg_pool"].numpy()[real])
    labels.append(batch["label"].numpy()[real])
  assert [len(x) for x in labels] == [500, 200]
  predicted = numpy_knn(features[1], features[0], labels[0], 10, k, 0.07)
  return float(np.mean(predicted == labels[1]))


def test_knn_monitor_writes_tensorboard_and_results(after):
  d, res = after[0]["lin"], after[1]["lin"]
  at_1 = json.load(open(os.path.join(d, "result_1.json")))  # the monitor, mid-training
  assert at_1["global_step"] == 1 and at_1["knn/k"] == 20
  # The bank is the labelled subset (10% of 5000), the queries the eval split.
  assert at_1["knn/bank_size"] == 500 and at_1["knn/num_examples"] == 200
  # The encoder is frozen (fine_tune_after_block=4): its features at step 1 are the
  # pretraining export's. Wu et al.'s kNN over them in NumPy; one query's slack for a near tie
  # that float rounding (export vs training process) can flip.
  expected = _numpy_knn_accuracy(after[0]["lin"], k=20)
  assert abs(at_1["knn/top_1_accuracy"] - expected) <= 1 / 200 + 1e-9, expected
  final = json.load(open(os.path.join(d, "result.json")))  # the evaluation, with the monitor's
  assert final["global_step"] == 2
  assert {"eval/label_top_1_accuracy", "knn/top_1_accuracy"} <= final.keys()
  assert "kNN top-1" in res.stdout
  tags = set()
  for name in os.listdir(d):
    if name.startswith("events.out.tfevents"):
      for event in tf.compat.v1.train.summary_iterator(os.path.join(d, name)):
        tags.update(v.tag for v in event.summary.value)
  assert "knn/top_1_accuracy" in tags


def test_linear_eval_leaves_the_backbone_bit_for_bit(pretrained, after):
  # Started from the pretraining's SavedModel (mapped by variable path), two steps of linear
  # evaluation (kNN monitor and evaluation included): every encoder and projection-head
  # variable, BN moving statistics included, is still exactly the pretraining checkpoint's; the
  # classifier has moved off its zero start.
  pre, lin = pretrained, after[0]["lin"]
  for part in ("model/encoder", "model/projection_head"):
    before = checkpoint_values(os.path.join(pre, "ckpt-3"), part)
    got = checkpoint_values(os.path.join(lin, "ckpt-2"), part)
    assert got.keys() == before.keys()
    assert sum("moving_variance" in k for k in got) >= (20 if "encoder" in part else 3)
    for k in before:
      np.testing.assert_array_equal(got[k], before[k], err_msg=k)
  head = checkpoint_values(os.path.join(lin, "ckpt-2"), "model/supervised_head")
  assert len(head) == 2 and all(np.abs(v).max() > 0 for v in head.values())


def test_label_subset_is_class_balanced_and_repeatable(after, data_dir):
  dirs = after[0]
  subsets = [open(os.path.join(dirs[n], "label_subset.txt")).read() for n in ("lin", "dis")]
  assert subsets[0] == subsets[1]  # same seed, two runs (fine-tuning and distillation)
  ids = np.array([int(line) for line in subsets[0].split()])
  assert len(ids) == len(set(ids)) == 500  # 10% of 5000
  source = sources.load_source("shapes10", "train", data_dir)
  labels = {int(r["id"]): int(r["label"]) for r in source.records.as_numpy_iterator()}
  counts = np.bincount([labels[i] for i in ids], minlength=10)
  np.testing.assert_array_equal(counts, np.full(10, 50))


def test_distillation_exports_a_student_that_loads(after, pretrained):
  dis = after[0]["dis"]
  res = after[1]["dis"]
  assert "teacher_agreement" in res.stderr  # the progress line (absl logs to stderr)
  assert json.load(open(os.path.join(dis, "flags.json")))["train_mode"] == "distill"
  model = tf.saved_model.load(os.path.join(dis, "saved_model", "3"))
  images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 2])
  out = model(images, training=False)
  logits = out["logits_sup"].numpy()
  assert logits.shape == (4, 10) and np.isfinite(logits).all()
  assert len(model.trainable_variables) > 60
  # The student's export, not the teacher's: the student's width (0.25: 128 features, the
  # teacher has runs.COMMON's 0.125: 64) and the student's weights at step 3 (ckpt-3, restored
  # into a fresh student).
  from tf_simclr import model as model_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr.config import ModelConfig  # pylint: disable=g-import-not-at-top

  teacher_flags = json.load(open(os.path.join(pretrained, "flags.json")))
  assert float(teacher_flags["width_multiplier"]) != 0.25  # else pick another student width
  assert out["final_avg_pool"].shape == (4, 128)
  student = model_lib.build_model(
    ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=16, num_classes=10)
  )
  checkpoints.restore_weights(student, os.path.join(dis, "ckpt-3"))
  want = student(images, training=False)["logits_sup"].numpy()
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-5)


def test_continuous_eval_beside_training_evaluates_each_checkpoint_once(after):
  dis = after[0]["dis"]
  res = after[1]["dis_eval"]
  assert res.returncode == 0, res.stderr[-3000:]
  steps = [int(s) for s in re.findall(r"^Step (\d+): top-1", res.stdout, re.M)]
  assert steps and steps == sorted(set(steps)) and steps[-1] == 3, res.stdout
  final = json.load(open(os.path.join(dis, "result.json")))
  assert final["global_step"] == 3 and final["eval/num_examples"] == 200
