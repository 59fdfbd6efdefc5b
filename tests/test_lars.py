"""Tests of tf_simclr.lars.LARS and tf_simclr.optimizers against NumPy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import lars
from tf_simclr import optimizers
from tf_simclr import schedules

# Rather large eeta/lr/weight decay so every term moves the weights visibly.
LR = 0.5
EETA = 0.2
WD = 0.05
MOMENTUM = 0.9
NUM_STEPS = 4


def np_lars_step(w, v, g, lr, *, momentum, nesterov, classic, eeta, wd, decay, adapt):
  """One LARS step in float64, written from the update rule. Returns (w, v)."""
  w, v, g = (np.asarray(a, np.float64) for a in (w, v, g))
  if decay:
    g = g + wd * w

  def trust(x):
    wn, xn = np.linalg.norm(w), np.linalg.norm(x)
    if not adapt or wn == 0 or xn == 0:
      return 1.0
    return eeta * wn / xn

  if classic:
    scaled_lr = lr * trust(g)
    v_new = momentum * v + scaled_lr * g
    update = momentum * v_new + scaled_lr * g if nesterov else v_new
    return w - update, v_new
  v_new = momentum * v + g
  update = momentum * v_new + g if nesterov else v_new
  return w - lr * trust(update) * update, v_new


def make_variables():
  """A Dense + BN + Dense model's weights plus explicitly named variables.

  Returns:
    (variables, paths): Keras variables with real `path`s.
  """
  keras.utils.set_random_seed(0)
  inputs = keras.Input((3,))
  x = keras.layers.Dense(4, bias_initializer="ones", name="dense")(inputs)
  x = keras.layers.BatchNormalization(name="batch_normalization")(x)
  x = keras.layers.Dense(2, name="head")(x)
  model = keras.Model(inputs, x, name="simclr_model")
  extra = [
    # Starts at zero: trust ratio 1 on the first step.
    keras.Variable(np.zeros((2, 3), np.float32), name="zero_init"),
    keras.Variable(np.full((5,), 0.3, np.float32), name="scale_vector"),
  ]
  variables = list(model.trainable_variables) + extra
  return variables, [v.path for v in variables]


def make_gradients(variables, num_steps, seed=1):
  """Per-step float32 gradients; some are exactly zero (trust ratio 1)."""
  rng = np.random.default_rng(seed)
  steps = []
  for step in range(num_steps):
    grads = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
    if step == 0:
      grads[1] = np.zeros_like(grads[1])  # dense/bias (ones): trust ratio 1.
    if step == 1:
      grads[0] = np.zeros_like(grads[0])  # dense/kernel, decayed: g = wd * w.
      grads[1] = np.zeros_like(grads[1])
      grads[-1] = np.zeros_like(grads[-1])  # scale_vector.
    steps.append(grads)
  return steps


def run_numpy(init, grad_steps, flags, lrs, **kw):
  """Applies np_lars_step over steps; flags[i] = (decay, adapt)."""
  ws = [np.asarray(w, np.float64) for w in init]
  vs = [np.zeros_like(w) for w in ws]
  for grads, lr in zip(grad_steps, lrs):
    for i, g in enumerate(grads):
      decay, adapt = flags[i]
      ws[i], vs[i] = np_lars_step(ws[i], vs[i], g, lr, decay=decay, adapt=adapt, **kw)
  return ws, vs


def assert_close(actual, expected, rtol=2e-6, atol=1e-7):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol)


EXPECTED_PATHS = [
  "dense/kernel",
  "dense/bias",
  "batch_normalization/gamma",
  "batch_normalization/beta",
  "head/kernel",
  "head/bias",
  "zero_init",
  "scale_vector",
]


@pytest.mark.parametrize("classic", [True, False])
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_numpy(classic, nesterov):
  variables, paths = make_variables()
  assert paths == EXPECTED_PATHS
  init = [v.numpy() for v in variables]
  grad_steps = make_gradients(variables, NUM_STEPS)
  # Decay and adaptation excluded separately, to see both flags act alone:
  # biases keep adaptation, batch norm keeps decay, scale_vector has neither.
  opt = lars.LARS(
    LR,
    momentum=MOMENTUM,
    use_nesterov=nesterov,
    weight_decay=WD,
    exclude_from_weight_decay=["bias", "scale_"],
    exclude_from_layer_adaptation=["batch_normalization", r"scale_vec"],
    classic_momentum=classic,
    eeta=EETA,
  )
  flags = [
    (True, True),
    (False, True),
    (True, False),
    (True, False),
    (True, True),
    (False, True),
    (True, True),
    (False, False),
  ]

  @tf.function
  def step(grads):
    opt.apply_gradients(zip(grads, variables))

  opt.apply_gradients(zip(grad_steps[0], variables))  # Eager first step.
  for grads in grad_steps[1:]:
    step([tf.constant(g) for g in grads])

  ws, vs = run_numpy(
    init,
    grad_steps,
    flags,
    [LR] * NUM_STEPS,
    momentum=MOMENTUM,
    nesterov=nesterov,
    classic=classic,
    eeta=EETA,
    wd=WD,
  )
  assert_close([v.numpy() for v in variables], ws)
  assert_close([m.numpy() for m in opt.momentums], vs)
  # The exclusions matter: with all flags on, NumPy disagrees.
  ws_wrong, _ = run_numpy(
    init,
    grad_steps,
    [(True, True)] * len(flags),
    [LR] * NUM_STEPS,
    momentum=MOMENTUM,
    nesterov=nesterov,
    classic=classic,
    eeta=EETA,
    wd=WD,
  )
  for i in (1, 2, 7):
    assert not np.allclose(variables[i].numpy(), ws_wrong[i], rtol=1e-4)
  assert int(opt.iterations.numpy()) == NUM_STEPS


def test_default_layer_adaptation_exclusion_follows_weight_decay():
  variables, _ = make_variables()
  init = [v.numpy() for v in variables]
  grad_steps = make_gradients(variables, 2, seed=3)
  opt = lars.LARS(
    LR, weight_decay=WD, exclude_from_weight_decay=["batch_normalization", "bias"], eeta=EETA
  )
  for grads in grad_steps:
    opt.apply_gradients(zip(grads, variables))
  excluded = {1, 2, 3, 5}
  flags = [(i not in excluded,) * 2 for i in range(len(variables))]
  ws, _ = run_numpy(
    init, grad_steps, flags, [LR] * 2, momentum=0.9, nesterov=False, classic=True, eeta=EETA, wd=WD
  )
  assert_close([v.numpy() for v in variables], ws)


def test_zero_weight_decay_and_no_exclusions():
  variables, _ = make_variables()
  init = [v.numpy() for v in variables]
  grad_steps = make_gradients(variables, 2, seed=4)
  opt = lars.LARS(LR, eeta=EETA)
  for grads in grad_steps:
    opt.apply_gradients(zip(grads, variables))
  ws, _ = run_numpy(
    init,
    grad_steps,
    [(False, True)] * len(variables),
    [LR] * 2,
    momentum=0.9,
    nesterov=False,
    classic=True,
    eeta=EETA,
    wd=0.0,
  )
  assert_close([v.numpy() for v in variables], ws)


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_mirrored_equals_single_device_with_summed_gradients(strategies, num_replicas):
  """Keras sums per-replica gradients: N replicas == one step on the sum."""
  grad_steps = make_gradients(make_variables()[0], 3 * num_replicas, seed=5)
  # Steps of per-replica gradients.
  per_replica = [grad_steps[i * num_replicas : (i + 1) * num_replicas] for i in range(3)]
  kw = dict(
    momentum=MOMENTUM,
    weight_decay=WD,
    eeta=EETA,
    exclude_from_weight_decay=["batch_normalization", "bias"],
  )

  def run(strategy, replica_grads_per_step):
    with strategy.scope():
      variables, _ = make_variables()
      opt = lars.LARS(LR, **kw)

    @tf.function
    def step(grads):
      strategy.run(lambda g: opt.apply_gradients(zip(g, variables)), args=(grads,))

    for replica_grads in replica_grads_per_step:
      grads = strategy.experimental_distribute_values_from_function(
        lambda ctx, rg=replica_grads: [tf.constant(g) for g in rg[ctx.replica_id_in_sync_group]]
      )
      step(grads)
    return [v.numpy() for v in variables]

  multi = run(strategies[num_replicas], per_replica)
  summed = [[[sum(r[i] for r in step) for i in range(len(step[0]))]] for step in per_replica]
  single = run(strategies[1], summed)
  assert_close(multi, single, rtol=1e-5, atol=1e-6)

  # And the check has teeth: the mean of the gradients gives other weights.
  mean = [[[g / num_replicas for g in s[0]]] for s in summed]
  single_mean = run(strategies[1], mean)
  assert not np.allclose(multi[1], single_mean[1], rtol=1e-3)  # dense/bias


def test_learning_rate_schedule():
  schedule = schedules.WarmUpAndCosineDecay(
    base_learning_rate=2.56,
    num_examples=100,
    train_batch_size=10,
    warmup_epochs=0.3,
    train_epochs=1,
  )  # peak 0.1, W = 3, T = 11.
  variables, _ = make_variables()
  init = [v.numpy() for v in variables]
  grad_steps = make_gradients(variables, 5, seed=6)
  opt = lars.LARS(
    schedule, weight_decay=WD, eeta=EETA, exclude_from_weight_decay=["batch_normalization", "bias"]
  )
  lrs = [float(schedule(i)) for i in range(5)]
  np.testing.assert_allclose(lrs[:4], [0.0, 0.1 / 3, 0.2 / 3, 0.1], rtol=1e-6)

  @tf.function
  def step(grads):
    opt.apply_gradients(zip(grads, variables))

  for grads in grad_steps:
    step(grads)
  excluded = {1, 2, 3, 5}
  flags = [(i not in excluded,) * 2 for i in range(len(variables))]
  ws, _ = run_numpy(
    init, grad_steps, flags, lrs, momentum=0.9, nesterov=False, classic=True, eeta=EETA, wd=WD
  )
  assert_close([v.numpy() for v in variables], ws)
  np.testing.assert_allclose(float(opt.learning_rate), float(schedule(5)))


def test_get_config_round_trip():
  opt = lars.LARS(
    0.3,
    momentum=0.8,
    use_nesterov=True,
    weight_decay=1e-6,
    exclude_from_weight_decay=["bias"],
    exclude_from_layer_adaptation=["batch_normalization"],
    classic_momentum=False,
    eeta=0.002,
    name="my_lars",
  )
  config = opt.get_config()
  assert config["weight_decay"] == 1e-6
  assert config["exclude_from_layer_adaptation"] == ["batch_normalization"]
  clone = lars.LARS.from_config(config)
  assert clone.get_config() == config
  assert (clone.momentum, clone.use_nesterov, clone.classic_momentum, clone.eeta, clone.name) == (
    0.8,
    True,
    False,
    0.002,
    "my_lars",
  )

  # None stays None (i.e. "same as weight decay"), and a schedule survives
  # Keras' generic (de)serialization.
  schedule = schedules.WarmUpAndCosineDecay(0.3, 1000, 64, 1, 10)
  opt = lars.LARS(schedule, exclude_from_weight_decay=["bias"])
  restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
  assert isinstance(restored, lars.LARS)
  assert restored.get_config()["exclude_from_layer_adaptation"] is None
  assert restored._adapt_exclude == ["bias"]
  assert isinstance(restored._learning_rate, schedules.WarmUpAndCosineDecay)
  assert restored._learning_rate.get_config() == schedule.get_config()


def test_loss_scale_optimizer_wrapping():
  variables, _ = make_variables()
  init = [v.numpy() for v in variables]
  grad_steps = make_gradients(variables, 2, seed=7)
  inner = lars.LARS(
    LR, weight_decay=WD, eeta=EETA, exclude_from_weight_decay=["batch_normalization", "bias"]
  )
  opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=1024.0)
  opt.build(variables)

  @tf.function
  def step(grads):
    # Gradients of a loss scaled by the current loss scale.
    opt.apply_gradients(zip([g * opt.dynamic_scale for g in grads], variables))

  for grads in grad_steps:
    step(grads)
  excluded = {1, 2, 3, 5}
  flags = [(i not in excluded,) * 2 for i in range(len(variables))]
  ws, _ = run_numpy(
    init, grad_steps, flags, [LR] * 2, momentum=0.9, nesterov=False, classic=True, eeta=EETA, wd=WD
  )
  assert_close([v.numpy() for v in variables], ws)

  # A non-finite gradient skips the step and leaves the weights alone.
  before = [v.numpy() for v in variables]
  bad = [np.full(v.shape, np.inf, np.float32) for v in variables]
  step(bad)
  assert_close([v.numpy() for v in variables], before, rtol=0, atol=0)
  assert float(opt.dynamic_scale) == 512.0


def test_build_optimizer():
  opt = optimizers.build_optimizer("momentum", 0.1, momentum=0.8)
  assert isinstance(opt, keras.optimizers.SGD)
  assert (opt.momentum, opt.nesterov) == (0.8, True)
  np.testing.assert_allclose(float(opt.learning_rate), 0.1)

  opt = optimizers.build_optimizer("adam", 0.01, weight_decay=0.5)
  assert isinstance(opt, keras.optimizers.Adam)
  assert opt.weight_decay is None  # The decay goes in the loss instead.
  np.testing.assert_allclose(float(opt.learning_rate), 0.01)

  schedule = schedules.WarmUpAndCosineDecay(0.3, 1000, 64, 1, 10)
  opt = optimizers.build_optimizer("lars", schedule, momentum=0.7, weight_decay=1e-6)
  assert isinstance(opt, lars.LARS)
  config = opt.get_config()
  assert config["momentum"] == 0.7
  assert config["weight_decay"] == 1e-6
  assert config["exclude_from_weight_decay"] == ["batch_normalization", "bias", "head_supervised"]
  assert config["exclude_from_layer_adaptation"] is None
  assert not config["use_nesterov"] and config["classic_momentum"]
  assert config["eeta"] == 0.001
  assert opt._learning_rate is schedule
  assert optimizers.LARS_EXCLUDE_FROM_WEIGHT_DECAY == (
    "batch_normalization",
    "bias",
    "head_supervised",
  )

  with pytest.raises(ValueError, match="optimizer name.*'sgd'"):
    optimizers.build_optimizer("sgd", 0.1)


def test_explicit_weight_decay():
  keras.utils.set_random_seed(0)
  inputs = keras.Input((3,))
  x = keras.layers.Dense(4, bias_initializer="ones", name="dense")(inputs)
  x = keras.layers.BatchNormalization(name="batch_normalization")(x)
  x = keras.layers.Dense(2, bias_initializer="ones", name="head_supervised")(x)
  model = keras.Model(inputs, x)
  values = {v.path: v.numpy().astype(np.float64) for v in model.trainable_variables}
  assert sorted(values) == [
    "batch_normalization/beta",
    "batch_normalization/gamma",
    "dense/bias",
    "dense/kernel",
    "head_supervised/bias",
    "head_supervised/kernel",
  ]

  def l2(*names):
    return sum(0.5 * np.sum(values[n] ** 2) for n in names)

  got = optimizers.explicit_weight_decay(model.trainable_variables, 0.1, "lars")
  assert got.dtype == tf.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), 0.1 * l2("head_supervised/kernel"), rtol=1e-6)

  got = optimizers.explicit_weight_decay(model.trainable_variables, 0.1, "adam")
  np.testing.assert_allclose(
    float(got),
    0.1 * l2("dense/kernel", "dense/bias", "head_supervised/kernel", "head_supervised/bias"),
    rtol=1e-6,
  )

  # No supervised head: 0.0 as a float32 scalar tensor.
  got = optimizers.explicit_weight_decay(model.trainable_variables[:4], 0.1, "lars")
  assert got.dtype == tf.float32 and float(got) == 0.0
  got = optimizers.explicit_weight_decay([], 0.1, "momentum")
  assert got.dtype == tf.float32 and float(got) == 0.0


def test_checkpoint_round_trip(tmp_path):
  """Momentum buffers are saved and restored by tf.train.Checkpoint."""
  variables, _ = make_variables()
  grad_steps = make_gradients(variables, 3, seed=8)
  opt = lars.LARS(LR, weight_decay=WD, eeta=EETA)
  opt.apply_gradients(zip(grad_steps[0], variables))
  path = tf.train.Checkpoint(optimizer=opt, variables=variables).save(str(tmp_path / "ckpt"))
  opt.apply_gradients(zip(grad_steps[1], variables))
  expected = [v.numpy() for v in variables]

  restored = lars.LARS(LR, weight_decay=WD, eeta=EETA)
  restored.build(variables)
  tf.train.Checkpoint(optimizer=restored, variables=variables).restore(path).assert_consumed()
  assert int(restored.iterations.numpy()) == 1
  restored.apply_gradients(zip(grad_steps[1], variables))
  assert_close([v.numpy() for v in variables], expected, rtol=0, atol=0)
