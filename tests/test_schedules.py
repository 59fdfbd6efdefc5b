"""tf_simclr.schedules: closed forms per phase, and the reference's schedule transcribed."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import schedules


def reference_schedule(
  base, num_examples, batch, warmup_epochs, train_epochs, scaling="linear", train_steps=0
):
  """The reference's `WarmUpAndCosineDecay.__call__` (simclr tf2/model.py), transcribed with its
  flags as arguments: its own step counts, its own scaling, and Keras's CosineDecay (what the
  reference's tf.keras.experimental.CosineDecay is in Keras 3) for the decay."""
  warmup_steps = int(round(warmup_epochs * num_examples // batch))
  if scaling == "linear":
    scaled_lr = base * batch / 256.0
  else:
    scaled_lr = base * math.sqrt(batch)
  total_steps = train_steps or (num_examples * train_epochs // batch + 1)
  cosine_decay = keras.optimizers.schedules.CosineDecay(scaled_lr, total_steps - warmup_steps)

  def lr(step):
    step = np.asarray(step, np.float64)
    learning_rate = step / float(warmup_steps) * scaled_lr if warmup_steps else scaled_lr
    decayed = np.asarray(cosine_decay(tf.constant(step - warmup_steps, tf.float32)), np.float64)
    return np.where(step < warmup_steps, learning_rate, decayed)

  return lr


def test_get_train_steps():
  # ImageNet, batch 4096, 100 epochs: 128,116,700 // 4096 + 1.
  assert schedules.get_train_steps(1281167, 100, 4096) == 31279
  # CIFAR-10, batch 512, 1000 epochs: 50,000,000 // 512 + 1.
  assert schedules.get_train_steps(50000, 1000, 512) == 97657
  # An explicit step count wins.
  assert schedules.get_train_steps(50000, 1000, 512, train_steps=123) == 123


def test_scaled_learning_rate():
  assert schedules.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(4.8)
  assert schedules.scaled_learning_rate(0.075, 4096, "sqrt") == pytest.approx(4.8)
  assert schedules.scaled_learning_rate(1.0, 512, "linear") == 2.0
  with pytest.raises(ValueError, match="learning_rate_scaling.*'cubic'"):
    schedules.scaled_learning_rate(1.0, 512, "cubic")
  with pytest.raises(ValueError, match="learning_rate_scaling"):
    schedules.WarmUpAndCosineDecay(1.0, 100, 10, 1, 10, learning_rate_scaling="log")


@pytest.mark.parametrize(
  "num_examples,batch,epochs,warmup_epochs,warmup_steps,total_steps",
  [
    (1281167, 4096, 100, 10, 3127, 31279),  # 12,811,670 // 4096.
    (50000, 512, 1000, 10, 976, 97657),  # 500,000 // 512.
    (50000, 512, 1000, 0.5, 48, 97657),  # round(48.0).
  ],
)
def test_reference_step_counts(
  num_examples, batch, epochs, warmup_epochs, warmup_steps, total_steps
):
  schedule = schedules.WarmUpAndCosineDecay(1.0, num_examples, batch, warmup_epochs, epochs)
  assert schedule.warmup_steps == warmup_steps
  assert schedule.total_steps == total_steps


@pytest.mark.parametrize(
  "scaling,base,peak",
  [
    ("linear", 0.3, 0.3 * 4096 / 256),
    ("sqrt", 0.075, 0.075 * 64.0),
  ],
)
def test_imagenet_values(scaling, base, peak):
  schedule = schedules.WarmUpAndCosineDecay(
    base, 1281167, 4096, warmup_epochs=10, train_epochs=100, learning_rate_scaling=scaling
  )
  warmup, total = 3127, 31279
  mid_cosine = (warmup + total) // 2
  cases = {
    0: 0.0,
    1000: peak * 1000 / warmup,
    warmup - 1: peak * (warmup - 1) / warmup,
    warmup: peak,
    mid_cosine: peak * 0.5 * (1 + math.cos(math.pi * (mid_cosine - warmup) / (total - warmup))),
    total: 0.0,
    total + 100: 0.0,
  }
  reference = reference_schedule(base, 1281167, 4096, 10, 100, scaling)
  for step, expected in cases.items():
    np.testing.assert_allclose(float(reference(step)), expected, rtol=1e-6, atol=1e-6)
    got = schedule(tf.constant(step, tf.int64))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(float(got), expected, rtol=1e-6, atol=1e-6)
  # Halfway through the decay is half the peak.
  half = warmup + (total - warmup) / 2
  np.testing.assert_allclose(float(schedule(tf.constant(half))), peak / 2, rtol=1e-6)


def test_dense_grid_matches_numpy_in_tf_function():
  schedule = schedules.WarmUpAndCosineDecay(
    1.0,
    num_examples=50000,
    train_batch_size=512,
    warmup_epochs=10,
    train_epochs=1000,
    learning_rate_scaling="linear",
  )
  steps = np.arange(0, 97657 + 1, 97)
  fn = tf.function(lambda s: tf.map_fn(schedule, s, fn_output_signature=tf.float32))
  got = fn(tf.constant(steps, tf.int64)).numpy()
  expected = reference_schedule(1.0, 50000, 512, 10, 1000)(steps)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The grid crosses both phases: warm-up up to step 976, then the decay to 0 at 97,657.
  assert got[0] == 0 and got.max() > 1.99 and got[-1] < 1e-4


@pytest.mark.parametrize(
  "args",
  [
    (0.3, 1281167, 4096, 10, 100, "linear", 0),
    (0.075, 1281167, 4096, 10, 100, "sqrt", 0),
    (1.0, 50000, 512, 0.5, 1000, "linear", 0),  # fractional warm-up: round(48.0)
    (0.5, 10000, 128, 1, 16, "sqrt", 500),  # an explicit step count cuts the decay short
    (2.56, 100, 10, 0, 1, "linear", 0),  # no warm-up
  ],
)
def test_every_step_matches_the_reference(args):
  schedule = schedules.WarmUpAndCosineDecay(
    *args[:5], train_steps=args[6], learning_rate_scaling=args[5]
  )
  steps = np.unique(
    np.concatenate(
      [np.linspace(0, schedule.total_steps + 10, 200).astype(int), [schedule.warmup_steps]]
    )
  )
  got = tf.function(lambda s: tf.map_fn(schedule, s, fn_output_signature=tf.float32))(
    tf.constant(steps, tf.int64)
  )
  np.testing.assert_allclose(got.numpy(), reference_schedule(*args)(steps), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.float32, tf.float64])
def test_step_dtypes(dtype):
  schedule = schedules.WarmUpAndCosineDecay(2.56, 100, 10, 0.3, 1)  # W=3, T=11
  got = tf.function(schedule)(tf.constant(2, dtype))
  np.testing.assert_allclose(float(got), 0.1 * 2 / 3, rtol=1e-6)
  # Peak 2.56 * 10 / 256 = 0.1; step 7 is 4 of the 8 decay steps: cos(pi / 2) = 0.
  np.testing.assert_allclose(float(schedule(7)), 0.1 * 0.5, rtol=1e-6)


def test_no_warmup_and_no_decay_room():
  schedule = schedules.WarmUpAndCosineDecay(2.56, 100, 10, 0, 1)  # W=0, T=11
  assert schedule.warmup_steps == 0
  np.testing.assert_allclose(float(schedule(0)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(
    float(schedule(5)), 0.1 * 0.5 * (1 + math.cos(math.pi * 5 / 11)), rtol=1e-6
  )
  # train_steps == warmup steps: warm-up, then 0, never NaN.
  schedule = schedules.WarmUpAndCosineDecay(2.56, 100, 10, 1, 1, train_steps=10)  # W = T = 10.
  values = [float(schedule(s)) for s in (0, 5, 9, 10, 20)]
  np.testing.assert_allclose(values, [0, 0.05, 0.09, 0, 0], atol=1e-7)


def test_config_round_trip():
  schedule = schedules.WarmUpAndCosineDecay(
    0.075, 1281167, 4096, 10, 100, train_steps=5000, learning_rate_scaling="sqrt", name="lr"
  )
  config = schedule.get_config()
  clone = schedules.WarmUpAndCosineDecay.from_config(config)
  assert clone.get_config() == config
  assert (clone.warmup_steps, clone.total_steps) == (3127, 5000)
  restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
  assert isinstance(restored, schedules.WarmUpAndCosineDecay)
  for step in (0, 1000, 4000):
    assert float(restored(step)) == float(schedule(step))
