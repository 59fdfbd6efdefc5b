"""The real per-replica training step learns: it overfits one fixed batch."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as C
from tf_simclr import objective
from tf_simclr import train
from tf_simclr import train_state
from tf_simclr import trainer as trainer_lib

# The fixed-batch runs' encoder: ResNet-18 at half width trains in half the time of width 1 with
# the same margins (seeds 0 and 1: contrast accuracy 1.0, supervised accuracy 0.75-0.77 against
# 0.93, bf16 within 0.2% of float32).
FIXED_BATCH_MODEL = dict(resnet_depth=18, width_multiplier=0.5, image_size=16, num_classes=4)


def test_step_learns_a_fixed_batch(tmp_path):
  # Contrastive accuracy on one repeated batch rises from chance to near 1 only if gradients
  # reach the encoder through the loss, the step applies them, and the pairs line up.
  cfg = C.RunConfig(
    C.DataConfig(dataset="synthetic"),
    C.ModelConfig(**FIXED_BATCH_MODEL),
    C.OptimConfig(optimizer="adam", learning_rate=0.008, warmup_epochs=0, weight_decay=0.0),
    C.TrainConfig(
      model_dir=str(tmp_path),
      train_batch_size=32,
      train_steps=30,
      checkpoint_steps=10,
      temperature=0.5,
    ),
    C.RuntimeConfig(),
  )
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  state = train_state.build_state(cfg, strategy, num_examples=32)
  trainer = trainer_lib.Trainer(cfg, strategy, state)
  rng = np.random.default_rng(0)
  base = rng.uniform(size=(32, 16, 16, 3)).astype(np.float32)
  # View two keeps half of each image under fresh noise: random features barely pair them.
  other = 0.5 * base + 0.5 * rng.uniform(size=base.shape)
  views = np.stack([base, other.astype(np.float32)], axis=1)
  batch = {
    "views": tf.constant(views.astype(np.float32)),
    "label": tf.constant(np.arange(32) % 4, tf.int64),
    "id": tf.range(32, dtype=tf.int64),
  }
  iterator = iter(
    strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())
  )
  first = {k: float(v) for k, v in trainer.run_loop(iterator, 1).items()}
  for _ in range(2):
    last = {k: float(v) for k, v in trainer.run_loop(iterator, 10).items()}
  assert int(state.optimizer.iterations.numpy()) == 21
  assert first["contrast_acc"] < 0.6
  assert last["contrast_acc"] > 0.9, last
  assert last["contrast_loss"] < first["contrast_loss"] - 1.0
  # The linear head learns the labels from stop-gradient features too.
  assert last["supervised_acc"] > 0.5, last


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def _numpy_l2(values, names):
  return sum(0.5 * np.sum(np.asarray(values[n], np.float64) ** 2) for n in names)


@pytest.fixture
def loss_inputs():
  """A replica's batch of N = 4 examples, 2 views (rows view-major), 3 classes, no model."""
  rng = np.random.default_rng(3)
  labels = np.tile([0, -1, 2, 1], 2)  # example 1 is unlabelled, in both its views
  values = {
    "head_supervised/kernel": rng.normal(size=(5, 3)),
    "head_supervised/bias": rng.normal(size=3),
    "conv/kernel": rng.normal(size=(2, 5)),
    "batch_normalization/gamma": rng.normal(size=5),
  }
  logits = rng.normal(size=(8, 3)).astype(np.float32)
  logits[labels < 0, 0] += 5.0  # class 0 (label -1 clipped to 0) for the unlabelled rows
  return {
    "proj": rng.normal(size=(8, 6)).astype(np.float32),
    "logits": logits,
    "teacher": (2 * rng.normal(size=(8, 3))).astype(np.float32),
    "labels": labels,
    "values": values,
    "variables": [tf.Variable(v.astype(np.float32), name=n) for n, v in values.items()],
  }


def test_compute_losses_pretraining_matches_numpy(loss_inputs):
  # Contrastive loss (Algorithm 1) + linear head's cross-entropy on the labelled rows only
  # + LARS's leftover weight decay (the supervised head's kernel alone).
  from runs import numpy_nt_xent  # pylint: disable=g-import-not-at-top

  x = loss_inputs
  outputs = {"proj_head_output": tf.constant(x["proj"]), "logits_sup": tf.constant(x["logits"])}
  with tf.GradientTape() as tape:
    tape.watch(outputs["logits_sup"])
    loss, metrics = objective.compute_losses(
      outputs,
      tf.constant(x["labels"], tf.int64),
      x["variables"],
      temperature=0.5,
      hidden_norm=True,
      weight_decay=0.1,
      optimizer_name="lars",
    )
  con, sim = numpy_nt_xent(x["proj"], True, 0.5)
  labelled = x["labels"] >= 0
  log_p = _log_softmax(x["logits"])[labelled]
  sup = -np.mean(log_p[np.arange(len(log_p)), x["labels"][labelled]])
  sup_acc = np.mean(np.argmax(x["logits"], 1)[labelled] == x["labels"][labelled])
  decay = 0.1 * _numpy_l2(x["values"], ["head_supervised/kernel"])
  logits_ab = sim[:4, 4:]
  p = np.exp(_log_softmax(logits_ab))
  want = {
    "contrast_loss": con,
    "contrast_acc": np.mean(np.argmax(logits_ab, 1) == np.arange(4)),
    "contrast_entropy": -np.mean(np.sum(p * np.log(p + 1e-8), 1)),
    "supervised_loss": sup,
    "supervised_acc": sup_acc,
    "weight_decay": decay,
    "total_loss": con + sup + decay,
  }
  assert sorted(metrics) == sorted(want)
  for k, v in want.items():
    np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, err_msg=k)
  assert float(loss) == float(metrics["total_loss"])
  # The unlabelled rows (1 and 5) get no gradient: only the labelled ones are in the loss.
  grad = tape.gradient(loss, outputs["logits_sup"]).numpy()
  np.testing.assert_array_equal(grad[~labelled], 0.0)
  assert np.all(np.abs(grad[labelled]).sum(1) > 0)


@pytest.mark.parametrize("label_weight", [0.0, 0.3])
def test_compute_losses_distillation_matches_numpy(loss_inputs, label_weight):
  # (1 - w) * distillation on every row + w * cross-entropy on the labelled rows, + every
  # non-BN weight's decay for momentum (biases included); no contrastive loss.
  x = loss_inputs
  outputs = {"proj_head_output": tf.constant(x["proj"]), "logits_sup": tf.constant(x["logits"])}
  for labels in (x["labels"], np.full(8, -1)):  # some labels; none (distillation alone)
    loss, metrics = objective.compute_losses(
      outputs,
      tf.constant(labels, tf.int64),
      x["variables"],
      tf.constant(x["teacher"]),
      contrastive=False,
      distill_temperature=2.0,
      distill_label_weight=label_weight,
      weight_decay=0.01,
      optimizer_name="momentum",
    )
    targets = np.exp(_log_softmax(x["teacher"] / 2.0))
    distill = -np.mean(np.sum(targets * _log_softmax(x["logits"] / 2.0), 1))
    labelled = labels >= 0
    log_p = _log_softmax(x["logits"])[labelled]
    sup = -np.mean(log_p[np.arange(len(log_p)), labels[labelled]]) if labelled.any() else 0.0
    decay = 0.01 * _numpy_l2(
      x["values"], ["head_supervised/kernel", "head_supervised/bias", "conv/kernel"]
    )
    want = {
      "distill_loss": distill,
      "supervised_loss": sup,
      "weight_decay": decay,
      "teacher_agreement": np.mean(np.argmax(x["logits"], 1) == np.argmax(x["teacher"], 1)),
      "total_loss": (1 - label_weight) * distill + label_weight * sup + decay,
    }
    assert sorted(metrics) == sorted([*want, "supervised_acc"])
    for k, v in want.items():
      np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-7, err_msg=k)
    assert float(loss) == float(metrics["total_loss"])
  assert float(metrics["supervised_acc"]) == 0.0  # no labelled row: 0, not NaN


def _fixed_batch_run(tmp_path, policy, steps, jit_compile=False, strategy=None):
  """Contrastive losses of `steps` steps on one fixed batch under a Keras dtype policy."""
  import keras  # pylint: disable=g-import-not-at-top

  keras.mixed_precision.set_dtype_policy("float32" if policy == "none" else policy)
  try:
    cfg = C.RunConfig(
      C.DataConfig(dataset="synthetic"),
      C.ModelConfig(**FIXED_BATCH_MODEL),
      C.OptimConfig(optimizer="adam", learning_rate=0.008, warmup_epochs=0, weight_decay=0.0),
      C.TrainConfig(
        model_dir=str(tmp_path / policy),
        train_batch_size=16,
        train_steps=30,
        checkpoint_steps=10,
        temperature=0.5,
      ),
      C.RuntimeConfig(mixed_precision=policy, jit_compile=jit_compile),
    )
    strategy = strategy or tf.distribute.OneDeviceStrategy("/cpu:0")
    state = train_state.build_state(cfg, strategy, num_examples=16)
    trainer = trainer_lib.Trainer(cfg, strategy, state)
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  rng = np.random.default_rng(1)
  base = rng.uniform(size=(16, 16, 16, 3)).astype(np.float32)
  other = (0.5 * base + 0.5 * rng.uniform(size=base.shape)).astype(np.float32)
  batch = {
    "views": tf.constant(np.stack([base, other], axis=1)),
    "label": tf.constant(np.arange(16) % 4, tf.int64),
    "id": tf.range(16, dtype=tf.int64),
  }
  iterator = iter(
    strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat())
  )
  losses = [float(trainer.run_loop(iterator, 1)["contrast_loss"]) for _ in range(steps)]
  return np.array(losses), state


def test_mixed_precision_trains_like_float32(tmp_path):
  # bfloat16 (TPU, this CPU) and float16 with loss scaling (GPU) compute the convolutions in
  # 16 bits; BN statistics, variables, the loss and the optimizer stay float32, so the loss
  # curve follows float32's closely (bf16 keeps 8 mantissa bits: ~0.4% per op).
  fp32, _ = _fixed_batch_run(tmp_path, "none", 6)
  bf16, state = _fixed_batch_run(tmp_path, "mixed_bfloat16", 6)
  assert fp32[-1] < fp32[0] - 1.0  # it learns, so the comparison is of two curves
  np.testing.assert_allclose(bf16, fp32, rtol=0.02)
  assert state.model.encoder.stem[0].dtype_policy.compute_dtype == "bfloat16"
  for v in state.model.variables + state.optimizer.variables:
    assert v.dtype not in ("bfloat16", "float16"), v.path
  fp16, state16 = _fixed_batch_run(tmp_path, "mixed_float16", 3)
  assert isinstance(state16.optimizer, keras.optimizers.LossScaleOptimizer)
  np.testing.assert_allclose(fp16, fp32[:3], rtol=0.02)


def test_jit_compile_refuses_mirrored_replicas(tmp_path):
  from conftest import mirrored  # pylint: disable=g-import-not-at-top

  with pytest.raises(ValueError, match="one replica per process"):
    _fixed_batch_run(tmp_path, "none", 1, jit_compile=True, strategy=mirrored(2))


def test_non_finite_training_stops_before_its_checkpoint(tmp_path):
  # A NaN learning rate (refused as a flag, accepted by the library) makes every weight NaN
  # in step 1: training stops there with one line, and ckpt-0 stays the newest checkpoint.
  from tf_simclr import checkpoints  # pylint: disable=g-import-not-at-top
  from tf_simclr import model as model_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr.data import sources  # pylint: disable=g-import-not-at-top

  for i in range(4):
    (tmp_path / "images" / "train" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
    png = tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(50 * i, tf.uint8))).numpy()
    (tmp_path / "images" / "train" / "ab"[i % 2] / f"{i}.png").write_bytes(png)
  source = sources.load_source("image_folder", "train", str(tmp_path / "images"))
  model_dir = str(tmp_path / "m")
  # Linear evaluation (only the head trains) keeps the traced step small.
  model_cfg = C.ModelConfig(
    resnet_depth=18, image_size=16, num_classes=2, train_mode="finetune", fine_tune_after_block=4
  )
  start = tf.train.Checkpoint(model=model_lib.build_model(model_cfg)).save(str(tmp_path / "start"))
  cfg = C.RunConfig(
    C.DataConfig(dataset="image_folder"),
    model_cfg,
    C.OptimConfig(learning_rate=float("nan"), warmup_epochs=0),
    C.TrainConfig(
      model_dir=model_dir, checkpoint=start, train_batch_size=4, train_steps=3, checkpoint_steps=1
    ),
    C.RuntimeConfig(),
  )
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  state = train_state.build_state(cfg, strategy, source.num_examples)
  checkpoints.save(state.manager, 0)  # the initial, finite weights
  with pytest.raises(
    train.NonFiniteError,
    match=(
      r"a weight is not finite \(NaN or inf\) at step 1, so no checkpoint was written for it; "
      f"the last finite checkpoint is {model_dir}/ckpt-0"
    ),
  ) as info:
    train.train(cfg, strategy, source, state)
  assert "\n" not in str(info.value)
  assert tf.train.latest_checkpoint(model_dir).endswith("ckpt-0")
  assert not tf.io.gfile.glob(f"{model_dir}/ckpt-1*")
  assert not train.all_finite(state.model.variables)


def test_loss_watch_warns_once_when_the_loss_grows_tenfold():
  watch = train.LossWatch()
  # The learning-rate-100 run of issue 14: 2,600 -> 190,000 in 4 steps.
  assert [watch.update(s, v) for s, v in ((1, 2600.0), (2, 9000.0), (3, 20000.0))] == [None] * 3
  message = watch.update(4, 190000.0)
  assert message.startswith("The loss grew from 2600 to 1.9e+05 by step 4 (x73)")
  assert watch.update(5, 1e9) is None  # once
  calm = train.LossWatch()
  assert all(calm.update(s, 10.0 / s) is None for s in range(1, 50))  # a falling loss: quiet


def test_a_batch_larger_than_the_split_is_warned(caplog):
  from tf_simclr.data import sources  # pylint: disable=g-import-not-at-top

  source = sources.Source("image_folder", "train", 6, 2, tf.data.Dataset.range(6))
  assert train.warn_batch_over_split(6, source) is None
  message = train.warn_batch_over_split(8, source)
  assert message.startswith(
    "--train_batch_size=8 is larger than the 6 examples of image_folder split 'train'"
  )
  assert message in caplog.text
