"""NT-Xent tested three ways: a naive NumPy Algorithm 1, closed forms, symmetry; then replicas."""

import numpy as np
import pytest
import tensorflow as tf

from runs import numpy_nt_xent
from tf_simclr import losses


def numpy_loss_grad(hidden, hidden_norm, temperature, eps=1e-6):
  """Central finite differences of `numpy_nt_xent` in float64."""
  h = np.asarray(hidden, np.float64)
  grad = np.zeros_like(h)
  for idx in np.ndindex(*h.shape):
    up, down = h.copy(), h.copy()
    up[idx] += eps
    down[idx] -= eps
    grad[idx] = (
      numpy_nt_xent(up, hidden_norm, temperature)[0]
      - numpy_nt_xent(down, hidden_norm, temperature)[0]
    ) / (2 * eps)
  return grad


@pytest.mark.parametrize(
  "n,d,temperature,norm",
  [(4, 8, 0.1, True), (8, 16, 0.5, True), (6, 5, 1.0, False), (3, 4, 0.2, True)],
)
def test_matches_numpy_algorithm_1(n, d, temperature, norm):
  rng = np.random.default_rng(n * 100 + d)
  hidden = rng.normal(size=(2 * n, d)).astype(np.float32)
  if not norm:
    hidden *= 0.3  # keep unnormalised logits in a sane range
  loss, logits_ab, labels = losses.contrastive_loss(
    hidden, hidden_norm=norm, temperature=temperature
  )
  want, sim = numpy_nt_xent(hidden, norm, temperature)
  np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)
  np.testing.assert_allclose(logits_ab.numpy(), sim[:n, n:], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(labels.numpy(), np.eye(n, 2 * n))


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(7)
  hidden = rng.normal(size=(6, 4)).astype(np.float32)
  for norm, temperature in [(True, 0.3), (False, 1.0)]:
    h = tf.Variable(hidden)
    with tf.GradientTape() as tape:
      loss, _, _ = losses.contrastive_loss(h, hidden_norm=norm, temperature=temperature)
    got = tape.gradient(loss, h).numpy()
    want = numpy_loss_grad(hidden, norm, temperature)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5)


def test_closed_forms():
  n, tau = 5, 0.25
  # All rows identical: every logit is 1/tau, the positive is one of 2N-1 equal terms.
  same = np.ones((2 * n, 3), np.float32)
  loss, _, _ = losses.contrastive_loss(same, temperature=tau)
  np.testing.assert_allclose(loss.numpy(), 2 * np.log(2 * n - 1), rtol=1e-6)
  # Views equal, pairs orthonormal: the positive has logit 1/tau, the 2N-2 negatives 0.
  eye = np.eye(n, 8, dtype=np.float32)
  loss, _, _ = losses.contrastive_loss(np.concatenate([eye, eye]), temperature=tau)
  want = 2 * np.log(1 + (2 * n - 2) * np.exp(-1 / tau))
  np.testing.assert_allclose(loss.numpy(), want, rtol=1e-5)


def test_symmetries():
  rng = np.random.default_rng(3)
  n = 6
  hidden = rng.normal(size=(2 * n, 10)).astype(np.float32)
  base = losses.contrastive_loss(hidden, temperature=0.2)[0].numpy()
  swapped = np.concatenate([hidden[n:], hidden[:n]])
  perm = rng.permutation(n)
  permuted = np.concatenate([hidden[:n][perm], hidden[n:][perm]])
  scaled = hidden * 3.7  # normalisation removes the scale
  for other in (swapped, permuted, scaled):
    np.testing.assert_allclose(
      losses.contrastive_loss(other, temperature=0.2)[0].numpy(), base, rtol=1e-5
    )
  # Breaking a pair changes the loss: the test above could not pass on a constant.
  broken = np.concatenate([hidden[:n], hidden[n:][np.roll(np.arange(n), 1)]])
  assert abs(losses.contrastive_loss(broken, temperature=0.2)[0].numpy() - base) > 1e-2


def test_invalid_arguments():
  hidden = np.zeros((4, 3), np.float32)
  for bad in (0.0, -0.1):
    with pytest.raises(ValueError, match="temperature"):
      losses.contrastive_loss(hidden, temperature=bad)
  with pytest.raises(ValueError, match="even"):
    losses.contrastive_loss(np.zeros((5, 3), np.float32))
  with pytest.raises(ValueError, match="hidden"):
    losses.contrastive_loss(np.zeros((4,), np.float32))


def _local_rows(hidden, r, num_replicas):
  """Replica r's share of a global [2N, d] batch: its slice of view one, then of view two."""
  n = hidden.shape[0] // 2
  b = n // num_replicas
  return np.concatenate([hidden[r * b : (r + 1) * b], hidden[n + r * b : n + (r + 1) * b]])


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_cross_replica_equals_single_device(strategies, num_replicas):
  strategy = strategies[num_replicas]
  rng = np.random.default_rng(num_replicas)
  n, d, tau = 8, 6, 0.1
  hidden = rng.normal(size=(2 * n, d)).astype(np.float32)
  b = n // num_replicas

  # Single device, whole global batch.
  h = tf.Variable(hidden)
  with tf.GradientTape() as tape:
    global_loss, global_logits, _ = losses.contrastive_loss(h, temperature=tau)
  global_grad = tape.gradient(global_loss, h).numpy()
  want_loss, _ = numpy_nt_xent(hidden, True, tau)
  np.testing.assert_allclose(global_loss.numpy(), want_loss, rtol=1e-5)

  per_replica = strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.constant(_local_rows(hidden, ctx.replica_id_in_sync_group, num_replicas))
  )

  @tf.function
  def step(local):
    with tf.GradientTape() as tape:
      tape.watch(local)
      loss, logits_ab, labels = losses.contrastive_loss(local, temperature=tau)
      scaled = loss / num_replicas
    return loss, logits_ab, labels, tape.gradient(scaled, local)

  outs = strategy.run(step, args=(per_replica,))
  loss_r, logits_r, labels_r, grad_r = (strategy.experimental_local_results(o) for o in outs)
  np.testing.assert_allclose(np.mean([x.numpy() for x in loss_r]), global_loss.numpy(), rtol=1e-5)
  for r in range(num_replicas):
    # Replica r's anchors are global rows r*b..(r+1)*b; its positives sit at those columns.
    np.testing.assert_allclose(
      logits_r[r].numpy(), global_logits.numpy()[r * b : (r + 1) * b], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(np.argmax(labels_r[r].numpy(), 1), np.arange(b) + r * b)
    np.testing.assert_allclose(
      grad_r[r].numpy(), _local_rows(global_grad, r, num_replicas), rtol=1e-4, atol=1e-6
    )


def test_contrastive_metrics():
  n = 4
  eye = np.eye(n, 8, dtype=np.float32)
  hidden = np.concatenate([eye, eye[[0, 1, 3, 2]]])  # pairs 2 and 3 swapped in view two
  _, logits_ab, labels = losses.contrastive_loss(hidden, temperature=0.1)
  acc, entropy = losses.contrastive_metrics(logits_ab, labels)
  assert acc.numpy() == pytest.approx(0.5)
  p = tf.nn.softmax(logits_ab).numpy().astype(np.float64)
  np.testing.assert_allclose(entropy.numpy(), -np.mean(np.sum(p * np.log(p + 1e-8), 1)), rtol=1e-5)


def test_supervised_loss():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32)
  labels = np.array([0, 4, 2, 2, 1, 3])
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  per_example = -logp[np.arange(6), labels]
  np.testing.assert_allclose(
    losses.supervised_loss(tf.constant(labels), logits).numpy(), per_example.mean(), rtol=1e-6
  )
  mask = np.array([1, 1, 0, 1, 0, 1], np.float32)
  np.testing.assert_allclose(
    losses.supervised_loss(tf.constant(labels), logits, weights=mask).numpy(),
    (per_example * mask).sum() / mask.sum(),
    rtol=1e-6,
  )
