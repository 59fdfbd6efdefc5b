"""collectives: the values and gradients of ReplicaContext's own methods (and of NumPy), and a
traced graph in which TF's custom-gradient walk stays inside the collective."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.ops import op_selector  # the walk whose size is measured

from tf_simclr import collectives


def _per_replica(strategy, shape):
  """Distinct values on each replica: replica r holds a seeded normal tensor of `shape`."""
  return strategy.experimental_distribute_values_from_function(
    lambda ctx: tf.random.stateless_normal(shape, seed=[7, ctx.replica_id_in_sync_group])
  )


def _value_and_grad(strategy, x, collective):
  """(collective(x), d<collective(x), w>/dx) per replica, with w a different weight per replica
  so that every slice of the gradient is distinct."""

  @tf.function
  def step(x):
    def replica_fn(x):
      ctx = tf.distribute.get_replica_context()
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = collective(ctx, x)
        w = tf.random.stateless_normal(tf.shape(y), seed=[5, ctx.replica_id_in_sync_group])
        loss = tf.reduce_sum(y * w)
      return y, tape.gradient(loss, x)

    return strategy.run(replica_fn, args=(x,))

  y, g = step(x)
  local = strategy.experimental_local_results
  return [v.numpy() for v in local(y)], [v.numpy() for v in local(g)]


CASES = {
  "all_sum": (
    lambda ctx, x: collectives.all_sum(ctx, x),
    lambda ctx, x: ctx.all_reduce(tf.distribute.ReduceOp.SUM, x),
  ),
  "all_gather_axis0": (
    lambda ctx, x: collectives.all_gather(ctx, x, axis=0),
    lambda ctx, x: ctx.all_gather(x, axis=0),
  ),
  "all_gather_axis1": (
    lambda ctx, x: collectives.all_gather(ctx, x, axis=1),
    lambda ctx, x: ctx.all_gather(x, axis=1),
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("num_replicas", [2, 4])
def test_values_and_gradients_are_those_of_the_replica_context(strategies, num_replicas, name):
  strategy = strategies[num_replicas]
  x = _per_replica(strategy, [2, 3, 4])
  ours, theirs = CASES[name]
  y_ours, g_ours = _value_and_grad(strategy, x, ours)
  y_tf, g_tf = _value_and_grad(strategy, x, theirs)
  xs = [v.numpy() for v in strategy.experimental_local_results(x)]
  # Independently: the sum or the concatenation in replica order; the gradient of replica r's
  # <y, w_r> summed over replicas is sum_r w_r, of which each replica gets its own slice.
  axis = {"all_sum": None, "all_gather_axis0": 0, "all_gather_axis1": 1}[name]
  want = sum(xs) if axis is None else np.concatenate(xs, axis)
  w = sum(tf.random.stateless_normal(want.shape, seed=[5, r]).numpy() for r in range(num_replicas))
  for r in range(num_replicas):
    want_grad = w if axis is None else np.split(w, num_replicas, axis)[r]
    np.testing.assert_allclose(y_ours[r], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_ours[r], want_grad, rtol=1e-6, atol=1e-6)
    # TF's own methods, to the last bits (the all-reduce may add in another order: 1 ulp).
    np.testing.assert_allclose(y_ours[r], y_tf[r], rtol=3e-7, atol=3e-7)
    np.testing.assert_allclose(g_ours[r], g_tf[r], rtol=3e-7, atol=3e-7)


def _largest_walk(strategy, collective, monkeypatch):
  """The most ops TF's custom-gradient walk visits while tracing a per-replica stack of 10 dense
  layers, each followed by `collective`, and its gradient."""
  sizes = []
  walk = op_selector.get_backward_walk_ops

  def counted(*args, **kwargs):
    ops = walk(*args, **kwargs)
    sizes.append(len(ops))
    return ops

  monkeypatch.setattr(op_selector, "get_backward_walk_ops", counted)
  x = _per_replica(strategy, [4, 8])

  @tf.function
  def step(x):
    def replica_fn(x):
      ctx = tf.distribute.get_replica_context()
      with tf.GradientTape() as tape:
        tape.watch(x)
        h = x
        for i in range(10):
          h = tf.tanh(tf.matmul(h, tf.eye(8) * (1.0 + 0.01 * i)))
          h = h - collective(ctx, tf.reduce_mean(h, 0)) / 4.0
        loss = tf.reduce_sum(h)
      return tape.gradient(loss, x)

    return strategy.run(replica_fn, args=(x,))

  step.get_concrete_function(x)
  return max(sizes)


def test_the_gradient_walk_stays_inside_the_collective(strategies, monkeypatch):
  # ReplicaContext.all_reduce's walk runs through the other replicas' layers (so it grows with
  # the depth of the graph); ours visits a bounded handful of ops whatever the depth.
  strategy = strategies[4]
  theirs = _largest_walk(strategy, CASES["all_sum"][1], monkeypatch)
  ours = _largest_walk(strategy, CASES["all_sum"][0], monkeypatch)
  assert theirs > 200, theirs
  assert ours < 30, ours
