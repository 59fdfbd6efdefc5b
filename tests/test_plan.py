"""The run plan (`plan.make_plan`): heads, classes, label subsets, evaluation and kNN sources.

On image folders of tiny PNGs in tmp_path (labelled: 3 classes of 10 training images), and a
distillation teacher saved as a tf_simclr checkpoint with its flags.json.
"""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from flags import definitions
from tf_simclr import model as model_lib
from tf_simclr import plan as plan_lib
from tf_simclr.config import ModelConfig

CLASSES = ("a", "b", "c")
PER_CLASS = 10


def _write_images(root, names):
  """Writes a 4x4 PNG at each `root/<name>.png` (names may hold class folders)."""
  for i, name in enumerate(names):
    path = os.path.join(root, f"{name}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = np.random.default_rng(i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    with open(path, "wb") as f:
      f.write(tf.io.encode_png(image).numpy())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """{'labelled': data_dir, 'unlabelled': data_dir}, each with splits 'train' and 'test'."""
  root = tmp_path_factory.mktemp("images")
  labelled, unlabelled = str(root / "labelled"), str(root / "unlabelled")
  _write_images(
    os.path.join(labelled, "train"), [f"{c}/{i}" for c in CLASSES for i in range(PER_CLASS)]
  )
  _write_images(os.path.join(labelled, "test"), [f"{c}/{i}" for c in CLASSES for i in range(2)])
  _write_images(os.path.join(labelled, "loose"), [str(i) for i in range(4)])
  for split, n in (("train", 12), ("test", 4)):
    _write_images(os.path.join(unlabelled, split), [str(i) for i in range(n)])
  return {"labelled": labelled, "unlabelled": unlabelled}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A fine-tuned tf_simclr checkpoint of 3 classes, with flags.json beside it."""
  d = tmp_path_factory.mktemp("teacher")
  config = ModelConfig(
    resnet_depth=18, width_multiplier=0.125, image_size=16, num_classes=3, train_mode="finetune"
  )
  prefix = tf.train.Checkpoint(model=model_lib.build_model(config)).save(str(d / "ckpt"))
  flags = dict(resnet_depth=18, width_multiplier=0.125, image_size=16, train_mode="finetune")
  (d / "flags.json").write_text(json.dumps(flags))
  return prefix


def _config(tmp_path, data_dir, **flags):
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(
    model_dir=str(tmp_path / "run"),
    dataset="image_folder",
    data_dir=data_dir,
    eval_split="test",
    train_steps=1,
    image_size=16,
  )
  values.update(flags)
  return definitions.to_config(values)


def _ids_and_labels(source):
  records = list(source.records.map(lambda r: (r["id"], r["label"])).as_numpy_iterator())
  return np.array([i for i, _ in records]), np.array([label for _, label in records])


def _only_classes_changed(plan, cfg, num_classes):
  """The plan's config is `cfg` with `num_classes` classes."""
  assert plan.cfg.model.num_classes == num_classes
  assert (
    dataclasses.replace(
      plan.cfg, model=dataclasses.replace(plan.cfg.model, num_classes=cfg.model.num_classes)
    )
    == cfg
  )


def test_pretraining_heads(folders, tmp_path):
  cfg = _config(tmp_path, folders["labelled"], mode="train_then_eval")
  plan = plan_lib.make_plan(cfg)
  _only_classes_changed(plan, cfg, 3)  # the linear evaluation trained alongside
  assert plan.train_source.num_examples == 3 * PER_CLASS
  assert (plan.eval_source.split, plan.eval_source.num_examples) == ("test", 6)
  assert plan.label_ids is None and plan.knn_sources is None and plan.teacher is None
  # mode=train: nothing to evaluate; no linear evaluation: no head, nothing to evaluate either.
  assert plan_lib.make_plan(_config(tmp_path, folders["labelled"])).eval_source is None
  plan = plan_lib.make_plan(
    _config(
      tmp_path, folders["labelled"], mode="train_then_eval", lineareval_while_pretraining=False
    )
  )
  assert plan.cfg.model.num_classes == 0 and plan.eval_source is None
  # Unlabelled images: pretraining drops the head, rather than training it on no labels.
  cfg = _config(tmp_path, folders["unlabelled"], mode="train_then_eval")
  plan = plan_lib.make_plan(cfg)
  _only_classes_changed(plan, cfg, 0)
  assert plan.train_source.num_examples == 12 and plan.eval_source is None


def test_labels_the_run_needs_are_refused_when_missing(folders, tmp_path):
  unlabelled = folders["unlabelled"]
  with pytest.raises(
    ValueError,
    match="train_mode=finetune needs labels, but image_folder split 'train' is unlabeled",
  ):
    plan_lib.make_plan(_config(tmp_path, unlabelled, train_mode="finetune"))
  with pytest.raises(
    ValueError,
    match="--knn_eval_every_n_steps needs labels, but image_folder split 'train' is unlabeled",
  ):
    plan_lib.make_plan(_config(tmp_path, unlabelled, knn_eval_every_n_steps=5))
  # Labelled training images, but queries without labels.
  with pytest.raises(
    ValueError,
    match="--knn_eval_every_n_steps needs labels, but image_folder split 'loose' is unlabeled",
  ):
    plan_lib.make_plan(
      _config(tmp_path, folders["labelled"], knn_eval_every_n_steps=5, eval_split="loose")
    )


def test_knn_monitor_sources(folders, tmp_path):
  plan = plan_lib.make_plan(_config(tmp_path, folders["labelled"], knn_eval_every_n_steps=5))
  bank, queries = plan.knn_sources
  assert bank is plan.train_source and queries is plan.eval_source
  assert (bank.num_examples, queries.num_examples, queries.num_classes) == (30, 6, 3)
  # Labels by class folder name: the same class has the same label in both splits.
  assert queries.class_names == bank.class_names == CLASSES


def test_finetuning_on_a_label_subset(folders, tmp_path):
  plan = plan_lib.make_plan(
    _config(
      tmp_path,
      folders["labelled"],
      train_mode="finetune",
      train_label_fraction=0.2,
      knn_eval_every_n_steps=5,
    )
  )
  ids = plan.label_ids
  # 20% of each class's 10 examples: 2 per class, distinct, sorted.
  assert len(ids) == 6 and list(ids) == sorted(set(ids))
  all_ids, all_labels = _ids_and_labels(
    plan_lib.make_plan(_config(tmp_path, folders["labelled"])).train_source
  )
  np.testing.assert_array_equal(np.bincount(all_labels[np.searchsorted(all_ids, ids)]), [2, 2, 2])
  # Fine-tuning trains on the subset only, and the kNN bank is that subset.
  got_ids, _ = _ids_and_labels(plan.train_source)
  np.testing.assert_array_equal(got_ids, ids)
  assert plan.train_source.num_examples == 6 and plan.knn_sources[0] is plan.train_source
  # An evaluation job needs no subset.
  plan = plan_lib.make_plan(
    _config(
      tmp_path, folders["labelled"], train_mode="finetune", train_label_fraction=0.2, mode="eval"
    )
  )
  assert plan.label_ids is None and plan.train_source.num_examples == 30


def test_distillation_takes_the_teacher_s_classes(folders, teacher, tmp_path):
  # Unlabelled images: the student gets the teacher's 3 classes; there is nothing to score.
  cfg = _config(
    tmp_path,
    folders["unlabelled"],
    train_mode="distill",
    teacher_checkpoint=teacher,
    mode="train_then_eval",
  )
  plan = plan_lib.make_plan(cfg)
  _only_classes_changed(plan, cfg, 3)
  assert plan.teacher.num_classes == 3 and plan.teacher.width_multiplier == 0.125
  assert plan.eval_source is None and plan.train_source.num_examples == 12
  with pytest.raises(ValueError, match="--distill_label_weight=0.5 needs labels"):
    plan_lib.make_plan(
      dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, distill_label_weight=0.5))
    )
  # Labelled images of as many classes: evaluated; a subset keeps every image, labels on 6.
  plan = plan_lib.make_plan(
    _config(
      tmp_path,
      folders["labelled"],
      train_mode="distill",
      teacher_checkpoint=os.path.dirname(teacher),
      train_label_fraction=0.2,
      mode="train_then_eval",
    )
  )
  assert plan.eval_source.num_examples == 6 and plan.cfg.model.num_classes == 3
  ids, labels = _ids_and_labels(plan.train_source)
  assert len(ids) == 30 and list(ids[labels >= 0]) == list(plan.label_ids)
  assert (labels >= 0).sum() == 6


def test_distillation_refuses_a_teacher_of_other_classes(folders, teacher, tmp_path):
  two_classes = str(tmp_path / "two")
  _write_images(os.path.join(two_classes, "train"), [f"{c}/{i}" for c in "xy" for i in range(3)])
  with pytest.raises(
    ValueError, match="predicts 3 classes, but the student and the dataset have 2"
  ):
    plan_lib.make_plan(
      _config(tmp_path, two_classes, train_mode="distill", teacher_checkpoint=teacher)
    )


def test_one_class_and_an_unlabelled_eval_split_are_said(folders, tmp_path, caplog):
  # Labelled training images, an eval split without class folders: no evaluation, and why.
  plan = plan_lib.make_plan(
    _config(tmp_path, folders["labelled"], mode="train_then_eval", eval_split="loose")
  )
  assert plan.cfg.model.num_classes == 3 and plan.eval_source is None
  assert "image_folder split 'loose' is unlabelled: the supervised head is not evaluated" in (
    caplog.text
  )
  assert "one class" not in caplog.text
  # One class folder: a head that scores 100% whatever it learnt.
  one = str(tmp_path / "one")
  _write_images(os.path.join(one, "train"), [f"a/{i}" for i in range(3)])
  _write_images(os.path.join(one, "test"), ["a/0"])
  plan = plan_lib.make_plan(_config(tmp_path, one, mode="train_then_eval"))
  assert plan.cfg.model.num_classes == 1
  assert "image_folder split 'train' has one class" in caplog.text
