"""NT-Xent (SimCLR's contrastive loss) with negatives from every replica, and the supervised loss.

Scale: `contrastive_loss` returns the mean over the N positive pairs of l(i, j) + l(j, i), i.e.
twice the per-view mean of Algorithm 1 in the paper. The reference implementation computes this
and its learning rates and weight decay were tuned with it, so we keep it.
"""

from __future__ import annotations

import numbers

import tensorflow as tf

from tf_simclr import collectives

# Subtracted from an example's similarity with itself; in config, which bounds --temperature.
from tf_simclr.config import LARGE_NUM


def _replica_context():
  """The replica context when several replicas run in sync, else None."""
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync <= 1:
    return None
  return ctx


def contrastive_loss(
  hidden: tf.types.experimental.TensorLike,
  hidden_norm: bool = True,
  temperature: float | tf.Tensor = 1.0,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """NT-Xent loss of two views, negatives gathered from all replicas.

  Args:
    hidden: `[2N, d]` float; rows 0..N-1 are view one, N..2N-1 view two (row i and row N+i are
      a positive pair).
    hidden_norm: L2-normalise rows first (cosine similarity).
    temperature: softmax temperature tau > 0.

  Inside a replica context with R > 1 replicas, every replica's rows serve as negatives: the
  local N anchors are compared with the R*N gathered rows of each view. Gradients flow back to
  the replica that owns each row (`all_gather`'s gradient all-reduces the upstream gradient),
  so the sum over replicas of each replica's gradient of `loss / R` is the gradient of the
  global loss.

  Returns:
    loss: scalar float32, mean over the local N pairs of l(i, N+i) + l(N+i, i).
    logits_ab: `[N, R*N]` view-one anchors against gathered view-two rows, / tau.
    labels: `[N, 2*R*N]` one-hot of each anchor's positive in `[logits_ab, logits_aa]`.
  """
  if isinstance(temperature, numbers.Number) and not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  hidden = tf.convert_to_tensor(hidden)
  if hidden.shape.rank != 2:
    raise ValueError(f"hidden must be [2N, d], got shape {hidden.shape}")
  rows = hidden.shape[0]
  if rows is not None and rows % 2:
    raise ValueError(f"hidden must have an even number of rows (two views), got {rows}")
  hidden = tf.cast(hidden, tf.float32)
  if hidden_norm:
    hidden = tf.math.l2_normalize(hidden, axis=-1)
  hidden1, hidden2 = tf.split(hidden, 2, axis=0)
  batch_size = tf.shape(hidden1)[0]

  ctx = _replica_context()
  if ctx is not None:
    # One collective for both views: [2, N, d] -> [2, R*N, d], replica-major along axis 1.
    gathered = collectives.all_gather(ctx, tf.stack([hidden1, hidden2]), axis=1)
    hidden1_large, hidden2_large = gathered[0], gathered[1]
    replica_id = tf.cast(ctx.replica_id_in_sync_group, tf.int32)
  else:
    hidden1_large, hidden2_large = hidden1, hidden2
    replica_id = 0
  large_batch = tf.shape(hidden1_large)[0]

  # The local anchors' positives sit at these columns of the gathered rows.
  positives = tf.range(batch_size) + replica_id * batch_size
  labels = tf.one_hot(positives, large_batch * 2)
  self_mask = tf.one_hot(positives, large_batch)

  logits_aa = tf.matmul(hidden1, hidden1_large, transpose_b=True) / temperature
  logits_aa -= self_mask * LARGE_NUM
  logits_bb = tf.matmul(hidden2, hidden2_large, transpose_b=True) / temperature
  logits_bb -= self_mask * LARGE_NUM
  logits_ab = tf.matmul(hidden1, hidden2_large, transpose_b=True) / temperature
  logits_ba = tf.matmul(hidden2, hidden1_large, transpose_b=True) / temperature

  loss_a = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ab, logits_aa], 1))
  loss_b = tf.nn.softmax_cross_entropy_with_logits(labels, tf.concat([logits_ba, logits_bb], 1))
  loss = tf.reduce_mean(loss_a + loss_b)
  return loss, logits_ab, labels


def contrastive_metrics(logits_ab: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Contrastive accuracy and entropy over the local anchors (the reference's summaries).

  Args:
    logits_ab: `[N, M]` from `contrastive_loss`.
    labels: `[N, 2M]` from `contrastive_loss`.
  Returns:
    (accuracy, entropy): scalars; accuracy is the fraction of view-one anchors whose most
    similar view-two row is their positive, entropy the mean entropy of softmax(logits_ab).
  """
  num_cols = tf.shape(logits_ab)[1]
  target = tf.argmax(labels[:, :num_cols], axis=1)
  accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits_ab, axis=1), target), tf.float32))
  prob = tf.nn.softmax(logits_ab)
  entropy = -tf.reduce_mean(tf.reduce_sum(prob * tf.math.log(prob + 1e-8), axis=-1))
  return accuracy, entropy


def supervised_loss(
  labels: tf.Tensor, logits: tf.Tensor, weights: tf.Tensor | None = None
) -> tf.Tensor:
  """Mean softmax cross-entropy over the local batch.

  Args:
    labels: `[B]` int class ids, or `[B, C]` (soft) one-hot targets.
    logits: `[B, C]`.
    weights: optional `[B]` per-example weights (e.g. a padding mask); the mean is then over
      the weighted examples.
  Returns:
    scalar float32.
  """
  logits = tf.cast(logits, tf.float32)
  if labels.shape.rank == 1:
    labels = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1])
  losses = tf.nn.softmax_cross_entropy_with_logits(tf.cast(labels, tf.float32), logits)
  if weights is None:
    return tf.reduce_mean(losses)
  weights = tf.cast(weights, tf.float32)
  return tf.math.divide_no_nan(tf.reduce_sum(losses * weights), tf.reduce_sum(weights))
