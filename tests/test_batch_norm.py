"""batch_norm.BatchNorm against Keras's own layer; synchronized BN against BN of the whole batch."""

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import batch_norm


@pytest.mark.parametrize("shape", [(6, 5, 5, 7), (12, 7)], ids=["conv_fused", "dense"])
@pytest.mark.parametrize("center,scale", [(True, True), (False, True)])
def test_batch_norm_matches_keras(shape, center, scale):
  # Our BN (fused kernel where it can) against Keras 3's own layer: outputs, moving statistics
  # and gradients, in training and inference mode.
  x = tf.random.stateless_normal(shape, seed=[9, 9]) * 3.0 + 2.0
  ours = batch_norm.BatchNorm(momentum=0.9, epsilon=1e-5, center=center, scale=scale)
  ref = tf.keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, center=center, scale=scale)
  ours.build(x.shape)
  ref.build(x.shape)
  for a, b in zip(ours.weights, ref.weights):
    a.assign(tf.random.stateless_uniform(a.shape, seed=[len(a.shape), a.shape[0]]) + 0.5)
    b.assign(a)
  initial_mean = ours.moving_mean.numpy()
  for training in (True, False):
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      y_ours = ours(x, training=training)
      y_ref = ref(x, training=training)
      w = tf.random.stateless_normal(shape, seed=[1, 3])
      l_ours, l_ref = tf.reduce_sum(y_ours * w), tf.reduce_sum(y_ref * w)
    np.testing.assert_allclose(y_ours.numpy(), y_ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      tape.gradient(l_ours, x).numpy(), tape.gradient(l_ref, x).numpy(), rtol=1e-4, atol=1e-5
    )
    for a, b in zip(ours.trainable_weights, ref.trainable_weights):
      np.testing.assert_allclose(
        tape.gradient(l_ours, a).numpy(), tape.gradient(l_ref, b).numpy(), rtol=1e-4, atol=1e-4
      )
    np.testing.assert_allclose(ours.moving_mean.numpy(), ref.moving_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.moving_variance.numpy(), ref.moving_variance.numpy(), rtol=1e-5)
  # Training mode moved the statistics (the comparison above is not between two no-ops).
  want = initial_mean * 0.9 + 0.1 * x.numpy().reshape(-1, shape[-1]).mean(0)
  np.testing.assert_allclose(ours.moving_mean.numpy(), want, rtol=1e-5)
  assert np.abs(want - initial_mean).min() > 1e-3


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_synchronized_bn_equals_bn_on_concatenated_batch(strategies, num_replicas):
  strategy = strategies[num_replicas]
  x = tf.random.stateless_normal([8, 3, 3, 5], seed=[3, 4]) * 2.0 + 1.0
  reference = batch_norm.BatchNormRelu(relu=True, decay=0.9, synchronized=False)
  want = reference(x, training=True).numpy()
  b = 8 // num_replicas
  with strategy.scope():
    synced = batch_norm.BatchNormRelu(relu=True, decay=0.9, synchronized=True)
    synced(x[:1], training=False)
  local = strategy.experimental_distribute_values_from_function(
    lambda ctx: x[ctx.replica_id_in_sync_group * b : (ctx.replica_id_in_sync_group + 1) * b]
  )
  got = strategy.run(tf.function(lambda v: synced(v, training=True)), args=(local,))
  got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(got)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  mean = x.numpy().mean(axis=(0, 1, 2))
  var = x.numpy().var(axis=(0, 1, 2))  # biased, as Keras and the reference use
  np.testing.assert_allclose(synced.bn.moving_mean.numpy(), 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(synced.bn.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)
  np.testing.assert_allclose(reference.bn.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)
  # Without synchronisation replica 0 would have normalised with its own moments.
  unsynced_first = tf.nn.relu(
    tf.nn.batch_normalization(x[:b], *tf.nn.moments(x[:b], [0, 1, 2]), None, None, 1e-5)
  ).numpy()
  assert np.abs(unsynced_first - want[:b]).max() > 1e-2
