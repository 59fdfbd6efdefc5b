"""Distillation: the loss against NumPy, teachers from checkpoints and SavedModels, and the
real training step (the student learns the teacher; the teacher stays put). Two replicas: the
distillation run of test_after_pretraining.py.

Also the pieces fine-tuning relies on: restoring an export onto a freshly built model by
variable path, and the continuous-evaluation checkpoint walk.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from flags import definitions
from tf_simclr import checkpoints
from tf_simclr import config as C
from tf_simclr import distill
from tf_simclr import evaluate
from tf_simclr import export
from tf_simclr import model as model_lib
from tf_simclr import plan as plan_lib
from tf_simclr import train_state
from tf_simclr import trainer as trainer_lib
from tf_simclr.data import sources

# One worker runs this module, so that its module-scoped fixtures are built once, not once
# per pytest-xdist worker (pytest.ini: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("distill")

SMALL = dict(resnet_depth=18, image_size=16, num_classes=10, train_mode="finetune", global_bn=False)


def _softmax(x):
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 4.0])
def test_distillation_loss_matches_numpy(temperature):
  rng = np.random.default_rng(0)
  teacher = rng.normal(size=(6, 5)).astype(np.float32) * 3
  student = tf.Variable(rng.normal(size=(6, 5)).astype(np.float32))
  p_t = _softmax(teacher / temperature)
  want = -np.mean(np.sum(p_t * np.log(_softmax(student.numpy() / temperature)), axis=1))
  with tf.GradientTape() as tape:
    loss = distill.distillation_loss(teacher, student, temperature)
  np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
  # d/ds of the mean cross-entropy: (softmax(s / T) - softmax(t / T)) / (T B).
  want_grad = (_softmax(student.numpy() / temperature) - p_t) / (temperature * 6)
  np.testing.assert_allclose(tape.gradient(loss, student).numpy(), want_grad, atol=1e-6)
  # Its minimum is at the teacher's distribution: the student equal to the teacher is optimal.
  at_teacher = distill.distillation_loss(teacher, teacher, temperature).numpy()
  entropy = -np.mean(np.sum(p_t * np.log(p_t), axis=1))
  np.testing.assert_allclose(at_teacher, entropy, rtol=1e-5)
  assert loss.numpy() > at_teacher


def test_labels_only_for_keeps_images_and_masks_labels():
  source = sources.load_source("shapes10", "test")
  ids = np.array([3, 10, 11, 500])
  masked = distill.labels_only_for(source, ids)
  assert masked.num_examples == source.num_examples
  got = {int(r["id"]): int(r["label"]) for r in masked.records.as_numpy_iterator()}
  want = {int(r["id"]): int(r["label"]) for r in source.records.as_numpy_iterator()}
  assert got.keys() == want.keys()
  for i in want:
    assert got[i] == (want[i] if i in ids else -1), i
  assert distill.labels_only_for(source, None) is source


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A fine-tuned-like model (random weights, moved BN statistics) and its export."""
  tf.keras.utils.set_random_seed(1)
  model = model_lib.build_model(C.ModelConfig(**SMALL, ft_proj_selector=1))
  for v in model.weights:  # Distinct values everywhere, moving statistics included.
    v.assign(v + tf.random.uniform(v.shape, 0.1, 0.2))
  path = str(tmp_path_factory.mktemp("export") / "saved_model" / "7")
  export.export_saved_model(model, path)
  return model, path


def test_restore_from_saved_model_maps_every_weight_by_path(exported):
  model, path = exported
  manifest = export.read_manifest(path)
  assert len(manifest["variables"]) == len(model.weights)
  # A linear-evaluation model (frozen layers: another trainable order) built with another seed.
  tf.keras.utils.set_random_seed(2)
  fresh = model_lib.build_model(
    C.ModelConfig(**dict(SMALL, fine_tune_after_block=4), ft_proj_selector=1)
  )
  assert len(fresh.trainable_weights) == 2
  export.restore_from_saved_model(fresh, path)
  for a, b in zip(model.weights, fresh.weights):
    assert a.path == b.path
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_restore_from_saved_model_refuses_another_model(exported):
  other = model_lib.build_model(C.ModelConfig(**dict(SMALL, num_classes=3)))
  with pytest.raises(checkpoints.CheckpointMismatchError) as err:
    export.restore_from_saved_model(other, exported[1])
  message = str(err.value)
  assert "\n" not in message and "does not match" in message, message
  assert "head_supervised/dense/kernel [512, 3]: shape [512, 10]" in message, message


def test_teacher_from_saved_model_and_checkpoint_predicts_as_the_model(exported, tmp_path):
  model, path = exported
  images = tf.random.stateless_uniform([4, 16, 16, 3], seed=[5, 6])
  want = model(images, training=False)["logits_sup"].numpy()
  # The same weights as a training checkpoint, with the flags.json a run writes beside it.
  ckpt_dir = tmp_path / "run"
  tf.train.CheckpointManager(
    tf.train.Checkpoint(model=model), str(ckpt_dir), 1, checkpoint_name="ckpt"
  ).save(checkpoint_number=7)
  flags = dict(
    resnet_depth=18,
    image_size=16,
    ft_proj_selector=1,
    train_mode="finetune",
    global_bn=True,
    proj_head_mode="nonlinear",
    width_multiplier=1,
    seed=0,
  )
  (ckpt_dir / "flags.json").write_text(json.dumps(flags))
  for source in (path, str(ckpt_dir)):  # a SavedModel; a model_dir (its newest checkpoint)
    config = distill.teacher_source(source).config
    assert (config.num_classes, config.ft_proj_selector, config.global_bn) == (10, 1, False)
    teacher = distill.load_teacher(source)
    assert not teacher.trainable_weights
    np.testing.assert_allclose(
      teacher(images, training=False)["logits_sup"].numpy(), want, rtol=1e-5, atol=1e-6
    )
  with pytest.raises(
    ValueError, match="predicts 10 classes, but the student and the dataset have 3"
  ):
    distill.check_classes(distill.teacher_source(path).config, 3, path)
  os.remove(ckpt_dir / "flags.json")
  with pytest.raises(ValueError, match="no flags.json"):
    distill.teacher_source(str(ckpt_dir / "ckpt-7"))  # a checkpoint prefix
  with pytest.raises(ValueError, match="does not exist"):
    distill.teacher_source(str(tmp_path / "nothing"))


def test_distill_step_learns_the_teacher(exported, strategies, tmp_path):
  # The real step (Trainer.compute_gradients) under a strategy: on one fixed batch the
  # student's agreement with the teacher rises from chance and the distillation loss falls;
  # the teacher's weights (BN statistics included) do not move.
  _, teacher_path = exported
  cfg = C.RunConfig(
    C.DataConfig(dataset="synthetic"),
    C.ModelConfig(**dict(SMALL, train_mode="distill")),
    C.OptimConfig(optimizer="adam", learning_rate=0.02, warmup_epochs=0, weight_decay=0.0),
    C.TrainConfig(
      model_dir=str(tmp_path),
      train_batch_size=16,
      train_steps=30,
      checkpoint_steps=10,
      teacher_checkpoint=teacher_path,
      distill_temperature=2.0,
    ),
    C.RuntimeConfig(),
  )
  strategy = strategies[1]
  state = train_state.build_state(cfg, strategy, num_examples=16)
  teacher_before = [v.numpy().copy() for v in state.teacher.weights]
  trainer = trainer_lib.Trainer(cfg, strategy, state)
  rng = np.random.default_rng(0)
  batch = {
    "views": tf.constant(rng.uniform(size=(16, 1, 16, 16, 3)).astype(np.float32)),
    "label": tf.constant(np.full([16], -1), tf.int64),  # unlabeled: distillation only
    "id": tf.range(16, dtype=tf.int64),
  }
  iterator = iter(
    strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())
  )
  first = {k: float(v) for k, v in trainer.run_loop(iterator, 1).items()}
  for _ in range(2):
    last = {k: float(v) for k, v in trainer.run_loop(iterator, 10).items()}
  assert first["supervised_loss"] == last["supervised_loss"] == 0.0  # no label in the batch
  assert last["distill_loss"] < first["distill_loss"] - 0.2, (first, last)
  assert last["teacher_agreement"] > 0.9 > first["teacher_agreement"] + 0.3, (first, last)
  for before, v in zip(teacher_before, state.teacher.weights):
    np.testing.assert_array_equal(v.numpy(), before, err_msg=v.path)


def _saved(directory, steps, **others):
  """Checkpoints of a scalar `value` (10 * step) at `steps`, listed in the `checkpoint` index;
  `others` are checkpointed beside it. Returns (value, the tf.train.Checkpoint, its manager)."""
  value = tf.Variable(0.0)
  ckpt = tf.train.Checkpoint(value=value, **others)
  manager = tf.train.CheckpointManager(ckpt, str(directory), max_to_keep=10)
  for step in steps:
    value.assign(step * 10.0)
    manager.save(checkpoint_number=step)
  return value, ckpt, manager


def test_restored_checkpoints_skips_pruned_and_yields_each_once(tmp_path):
  value, ckpt, manager = _saved(tmp_path, (1, 2, 3))
  for name in tf.io.gfile.glob(str(tmp_path / "ckpt-2.*")):  # pruned after being listed
    tf.io.gfile.remove(name)
  walk = evaluate.restored_checkpoints(ckpt, str(tmp_path), last_step=4, poll_secs=0.01)
  seen = []
  for step, path in walk:
    seen.append((step, float(value.numpy())))
    if step == 3:  # a new checkpoint appears while the walk waits
      value.assign(40.0)
      manager.save(checkpoint_number=4)
      value.assign(-1.0)
  assert seen == [(1, 10.0), (3, 30.0), (4, 40.0)]


class _PrunesWhileRestored(tf.__internal__.tracking.Trackable):
  """A checkpointed object whose restore deletes the files of `victim`: the training job's
  --keep_checkpoint_max pruning at that moment of an evaluator's restore."""

  def __init__(self, victim=None):
    self.victim = victim

  def _serialize_to_tensors(self):
    return {"x": tf.constant(0.0)}

  def _restore_from_tensors(self, restored_tensors):
    for name in tf.io.gfile.glob(self.victim + ".*") if self.victim else []:
      tf.io.gfile.remove(name)
    self.victim = None
    return tf.no_op()


def test_a_checkpoint_pruned_during_the_first_restore_does_not_spoil_the_next(tmp_path):
  # Seen in CI beside a run with --keep_checkpoint_max=1: the evaluator's first restore lost
  # its files after the model's values were read, before its save counter (created then) was;
  # every later checkpoint failed, the last with "does not match" (save counter unbound).
  _saved(tmp_path, (1, 2), job=_PrunesWhileRestored())
  value = tf.Variable(0.0)
  job = _PrunesWhileRestored(victim=str(tmp_path / "ckpt-1"))
  evaluator = tf.train.Checkpoint(value=value, job=job)  # fresh, as the evaluator's: no counter
  walk = evaluate.restored_checkpoints(evaluator, str(tmp_path), last_step=2, poll_secs=0.01)
  assert [(step, float(value.numpy())) for step, _ in walk] == [(1, 10.0), (2, 20.0)]
  assert job.victim is None and not tf.io.gfile.glob(str(tmp_path / "ckpt-1.*"))  # it did prune
  assert int(evaluator.save_counter.numpy()) == 2  # from ckpt-2


def test_restored_checkpoints_skips_a_checkpoint_cut_short(tmp_path):
  # A data file cut short makes TF's reader raise IndexError, not an OpError: skipped with a
  # log line like any unreadable checkpoint, instead of ending the evaluation in a traceback.
  value, ckpt, _ = _saved(tmp_path, (1, 2))
  (data1,) = tf.io.gfile.glob(str(tmp_path / "ckpt-1.data*"))
  os.truncate(data1, os.path.getsize(data1) - 8)
  with pytest.raises(IndexError):
    tf.train.load_checkpoint(str(tmp_path / "ckpt-1")).get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH")
  value.assign(-1.0)
  walk = evaluate.restored_checkpoints(ckpt, str(tmp_path), last_step=2, poll_secs=0.01)
  assert [(step, float(value.numpy())) for step, _ in walk] == [(2, 20.0)]


def test_restored_checkpoints_looks_again_at_the_newest_and_never_waits_forever(tmp_path):
  # A listed checkpoint whose data file is missing for a moment (as while it is replaced) is
  # restored at the next look; when the run's last checkpoint stays unreadable the walk ends
  # with one line instead of waiting for a newer one that will never come.
  value, ckpt, _ = _saved(tmp_path, (1, 2))
  (data2,) = tf.io.gfile.glob(str(tmp_path / "ckpt-2.data*"))
  tf.io.gfile.rename(data2, data2 + ".away")
  looks = []

  def check():  # called before each restore: the file comes back after the first failure
    looks.append(len(looks))
    if len(looks) == 3:
      tf.io.gfile.rename(data2 + ".away", data2)

  # (timeout_secs: a walk that skipped ckpt-2 for good would end after 5 s instead of hanging)
  walk = evaluate.restored_checkpoints(
    ckpt, str(tmp_path), last_step=2, poll_secs=0.01, timeout_secs=5, check=check
  )
  assert [(step, float(value.numpy())) for step, _ in walk] == [(1, 10.0), (2, 20.0)]
  assert len(looks) == 3  # ckpt-1, ckpt-2 (missing), ckpt-2 again
  tf.io.gfile.remove(data2)
  value.assign(-1.0)
  walk = evaluate.restored_checkpoints(
    ckpt, str(tmp_path), last_step=2, poll_secs=0.01, timeout_secs=5
  )
  assert next(walk)[0] == 1
  with pytest.raises(ValueError, match=r"the run's last checkpoint .*ckpt-2 could not be restored"):
    next(walk)


def test_write_results_merge_keeps_same_step_only(tmp_path):
  d = str(tmp_path)
  evaluate.write_results(d, {"eval/label_top_1_accuracy": 0.5}, 10)
  evaluate.write_results(d, {"knn/top_1_accuracy": 0.25}, 10, merge=True)
  got = json.load(open(os.path.join(d, "result.json")))
  assert got == {"eval/label_top_1_accuracy": 0.5, "knn/top_1_accuracy": 0.25, "global_step": 10}
  evaluate.write_results(d, {"knn/top_1_accuracy": 0.5}, 20, merge=True)
  assert json.load(open(os.path.join(d, "result.json"))) == {
    "knn/top_1_accuracy": 0.5,
    "global_step": 20,
  }
  assert json.load(open(os.path.join(d, "result_10.json")))["knn/top_1_accuracy"] == 0.25


def test_linear_eval_model_trains_only_the_head(exported):
  # fine_tune_after_block=4 freezes encoder and projection head (BN in inference mode): a
  # training-mode forward and a gradient step touch nothing but the classifier.
  config = C.ModelConfig(**dict(SMALL, fine_tune_after_block=4), ft_proj_selector=2)
  model = model_lib.build_model(config)
  assert [v.path for v in model.trainable_weights] == [
    "simclr_model/head_supervised/dense/kernel",
    "simclr_model/head_supervised/dense/bias",
  ]
  before = [v.numpy().copy() for v in model.weights]
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(model(tf.random.uniform([8, 16, 16, 3]), training=True)["logits_sup"])
  assert all(g is not None for g in tape.gradient(loss, model.trainable_weights))
  for v, b in zip(model.weights, before):
    np.testing.assert_array_equal(v.numpy(), b, err_msg=v.path)
  # The export of such a model is an ordinary, fully trainable one.
  twin = export.make_export_twin(model)
  assert twin.config.fine_tune_after_block == -1
  assert [v.path for v in twin.trainable_weights] == [v.path for v in exported[0].trainable_weights]


def test_a_teacher_of_another_image_size_is_refused(exported, tmp_path):
  # The teacher labels the student's views at the student's size: a 16 px teacher at 32 px
  # would label images unlike any it was trained on, without a word.
  for i in range(4):
    path = tmp_path / "images" / "train" / f"{i}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(tf.fill([4, 4, 3], tf.constant(i * 60, tf.uint8))).numpy())
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(
    model_dir=str(tmp_path / "run"),
    dataset="image_folder",
    data_dir=str(tmp_path / "images"),
    train_mode="distill",
    teacher_checkpoint=exported[1],
    train_steps=1,
    mode="train",
  )
  with pytest.raises(ValueError) as info:
    plan_lib.make_plan(definitions.to_config(dict(values, image_size=32)))
  assert str(info.value) == (
    f"teacher {exported[1]} was trained at --image_size=16, but this run's --image_size=32: "
    "the teacher labels the student's views at their size. Use --image_size=16, or fine-tune "
    "a teacher at 32 px"
  )
  assert not (tmp_path / "run").exists()
  plan = plan_lib.make_plan(definitions.to_config(dict(values, image_size=16)))
  assert plan.teacher.image_size == 16 and plan.cfg.model.num_classes == 10
