"""ResNet: the reference's parameter counts, endpoints, synchronized BN, freezing, config."""

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import resnet


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


# Trainable parameters of the reference's encoders (no heads): pinned so that the reference's
# released weights can be mapped onto ours.
REFERENCE_COUNTS = [
  (dict(depth=18, cifar_stem=True), 32, 11_173_056),
  (dict(depth=34, cifar_stem=True), 32, 21_281_216),
  (dict(depth=50), 64, 23_508_032),
  (dict(depth=50, width_multiplier=2), 64, 93_907_072),
  (dict(depth=50, sk_ratio=0.0625), 64, 35_215_584),
  (dict(depth=101), 64, 42_500_160),
]


@pytest.mark.parametrize(
  "kwargs,size,count",
  REFERENCE_COUNTS,
  ids=["r18_cifar", "r34_cifar", "r50", "r50_2x", "r50_sk", "r101"],
)
def test_parameter_counts_match_reference(kwargs, size, count):
  net = resnet.ResNet(**kwargs)
  out = net(tf.zeros([1, size, size, 3]), training=False)
  assert _count(net.trainable_variables) == count
  assert out["final_avg_pool"].shape == (1, net.output_dim)


def _basic_cifar_count(w, blocks=2):
  """Trainable parameters of a basic-block ResNet (CIFAR stem) at width w, written out by hand.

  `blocks` per group: 2 is ResNet-18, 1 ResNet-10. Conv kernels have no bias; every BN has gamma
  and beta. Channels are round(c * w).
  """
  conv_bn = lambda k, cin, cout: k * k * cin * cout + 2 * cout
  c = [round(base * w) for base in (64, 128, 256, 512)]
  total = conv_bn(3, 3, c[0])  # stem
  cin = c[0]
  for f in c:  # the first block of a group has a 1x1 projection shortcut
    total += conv_bn(1, cin, f) + conv_bn(3, cin, f) + conv_bn(3, f, f)
    total += (blocks - 1) * (conv_bn(3, f, f) + conv_bn(3, f, f))
    cin = f
  return total


@pytest.mark.parametrize("w", [1, 0.5, 0.25, 0.125, 0.3])
def test_fractional_width_channels_and_count(w):
  # The hand count reproduces the pinned reference count at w = 1, so it is the same formula.
  assert _basic_cifar_count(1) == REFERENCE_COUNTS[0][2]
  net = resnet.ResNet(depth=18, width_multiplier=w, cifar_stem=True)
  out = net(tf.zeros([1, 8, 8, 3]), training=False)
  assert _count(net.trainable_variables) == _basic_cifar_count(w)
  widths = [round(c * w) for c in (64, 128, 256, 512)]
  assert [out[f"block_group{g + 1}"].shape[-1] for g in range(4)] == widths
  assert out["initial_conv"].shape[-1] == widths[0]
  assert out["final_avg_pool"].shape == (1, widths[3]) and net.output_dim == widths[3]


@pytest.mark.parametrize("w", [1, 0.25])
def test_resnet10_one_block_per_group(w):
  # ResNet-10 (the quick start's CPU-sized encoder): ResNet-18 with one basic block per group.
  net = resnet.ResNet(depth=10, width_multiplier=w, cifar_stem=True)
  out = net(tf.zeros([2, 16, 16, 3]), training=False)
  assert _count(net.trainable_variables) == _basic_cifar_count(w, blocks=1)
  # At w = 1: the reference ResNet-18 less the second basic block (2 conv + BN) of each group.
  second_blocks = sum(2 * (9 * f * f + 2 * f) for f in (64, 128, 256, 512))
  assert _basic_cifar_count(1, blocks=1) == REFERENCE_COUNTS[0][2] - second_blocks == 4_902_336
  assert out["final_avg_pool"].shape == (2, round(512 * w))


def test_fractional_width_bottleneck_and_selective_kernel():
  # w = 0.125: stem 8 (the ResNet-D stem's first two convs 4), groups 8..64, outputs 4x.
  net = resnet.ResNet(depth=50, width_multiplier=0.125, sk_ratio=0.0625)
  out = net(tf.zeros([1, 32, 32, 3]), training=False)
  assert [out[f"block_group{g + 1}"].shape[-1] for g in range(4)] == [32, 64, 128, 256]
  assert net.stem_conv_a.weights[0].shape == (3, 3, 3, 4)
  assert net.stem_conv.weights[0].shape == (3, 3, 4, 8)
  assert net.output_dim == 256


def test_integer_widths_unchanged_by_float_spelling():
  # --width_multiplier is a float flag: 2.0 must build the network 2 builds (names and shapes).
  # ResNet-18 rather than 50: the same width arithmetic at a quarter of the weights to initialise.
  nets = [resnet.ResNet(depth=18, cifar_stem=True, width_multiplier=w) for w in (2, 2.0)]
  for net in nets:
    net(tf.zeros([1, 32, 32, 3]), training=False)
  # Paths without the first component, which Keras numbers per instance (res_net_1, res_net_2).
  layout = lambda net: [(v.path.split("/", 1)[1], tuple(v.shape)) for v in net.weights]
  assert layout(nets[0]) == layout(nets[1])


def test_endpoints_shapes():
  net = resnet.ResNet(depth=50)
  out = net(tf.zeros([2, 64, 64, 3]), training=False)
  shapes = {k: tuple(v.shape) for k, v in out.items()}
  assert shapes == {
    "initial_conv": (2, 32, 32, 64),
    "initial_max_pool": (2, 16, 16, 64),
    "block_group1": (2, 16, 16, 256),
    "block_group2": (2, 8, 8, 512),
    "block_group3": (2, 4, 4, 1024),
    "block_group4": (2, 2, 2, 2048),
    "final_avg_pool": (2, 2048),
  }
  assert set(shapes) == set(resnet.ENDPOINTS)
  # final_avg_pool is the spatial mean of block_group4.
  np.testing.assert_allclose(
    out["final_avg_pool"].numpy(),
    out["block_group4"].numpy().mean(axis=(1, 2)),
    rtol=1e-5,
    atol=1e-6,
  )


def test_se_and_odd_sizes():
  net = resnet.ResNet(depth=18, cifar_stem=False, se_ratio=0.25)
  out = net(tf.zeros([1, 45, 45, 3]), training=False)
  # Fixed padding: each stride-2 stage gives ceil(size / 2).
  assert out["initial_conv"].shape[1] == 23 and out["block_group4"].shape[1] == 2
  plain = resnet.ResNet(depth=18, cifar_stem=False)
  plain(tf.zeros([1, 45, 45, 3]))
  # SE adds, per block, a reduce conv (C -> C/4, bias) and an expand conv (C/4 -> C, bias).
  extra = sum(2 * c * (c // 4) + c // 4 + c for c in (64, 64, 128, 128, 256, 256, 512, 512))
  assert _count(net.trainable_variables) - _count(plain.trainable_variables) == extra


def test_residual_branch_starts_at_zero():
  # gamma = 0 in each branch's last BN: a fresh basic block is relu(shortcut) of its input.
  block = resnet.ResidualBlock(8, 1, use_projection=False)
  x = tf.random.stateless_normal([2, 5, 5, 8], seed=[1, 2])
  np.testing.assert_allclose(block(x, training=True).numpy(), tf.nn.relu(x).numpy())


def _live_resnet(synchronized_bn, depth=18, **kwargs):
  """A CIFAR-stem ResNet at width 0.25 (128 features; the same batch norms at a fraction of the
  cost) whose residual branches all contribute (no zero-init gamma)."""
  return resnet.ResNet(
    depth=depth,
    cifar_stem=True,
    width_multiplier=0.25,
    synchronized_bn=synchronized_bn,
    zero_init_residual=False,
    **kwargs,
  )


def _perturb_batch_norms(net, seed):
  # gamma and beta away from 1 and 0, so that every batch norm's affine part shows in the output.
  for i, v in enumerate(w for w in net.trainable_weights if "gamma" in w.path or "beta" in w.path):
    noise = tf.random.stateless_uniform(v.shape, seed=[seed, i], minval=-0.5, maxval=0.5)
    v.assign(v + noise)


def test_synchronized_resnet_forward_and_gradients_equal_single_device(strategies):
  """With every residual branch live, the forward pass and the summed per-replica gradients of a
  synchronized-BN ResNet on 2 replicas equal one device's on the whole batch of 4."""
  strategy = strategies[2]
  x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[5, 6])
  tf.keras.utils.set_random_seed(1)
  # ResNet-10: 12 batch norms, 8 of them in the residual branches, at half ResNet-18's cost.
  single = _live_resnet(False, depth=10)
  single(x[:1], training=False)
  _perturb_batch_norms(single, 7)
  head = tf.random.stateless_normal([4, 128], seed=[8, 9])

  with tf.GradientTape() as tape:
    out = single(x, training=True)["final_avg_pool"]
    loss = tf.reduce_sum(out * head)
  want_grads = [g.numpy() for g in tape.gradient(loss, single.trainable_variables)]
  want = out.numpy()
  assert all(np.abs(g).max() > 0 for g in want_grads)  # every weight matters

  with strategy.scope():
    synced = _live_resnet(True, depth=10)
    synced(x[:1], training=False)
  for a, b in zip(synced.weights, single.weights):
    a.assign(b)

  def step(v, h):
    with tf.GradientTape() as tape:
      out = synced(v, training=True)["final_avg_pool"]
      loss = tf.reduce_sum(out * h)
    return out, tape.gradient(loss, synced.trainable_variables)

  def halves(t):
    return strategy.experimental_distribute_values_from_function(
      lambda ctx: t[ctx.replica_id_in_sync_group * 2 : (ctx.replica_id_in_sync_group + 1) * 2]
    )

  # Eagerly (each replica in its thread): tracing the backward pass would take ~10 s.
  out, grads = strategy.run(step, args=(halves(x), halves(head)))
  got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  for v, g, w in zip(synced.trainable_variables, grads, want_grads):
    total = sum(t.numpy() for t in strategy.experimental_local_results(g))
    np.testing.assert_allclose(total, w, rtol=2e-3, atol=2e-4 * np.abs(w).max(), err_msg=v.path)


def _directional_derivative(net, x, head, var, eps):
  """(loss(var + eps d) - loss(var - eps d)) / (2 eps) for d = the unit gradient direction."""
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(net(x, training=True)["final_avg_pool"] * head)
  grad = tape.gradient(loss, var)
  direction = grad / tf.norm(grad)
  start = var.numpy()
  losses = []
  for sign in (1.0, -1.0):
    var.assign(start + sign * eps * direction)
    losses.append(float(tf.reduce_sum(net(x, training=True)["final_avg_pool"] * head)))
  var.assign(start)
  return float(tf.norm(grad)), (losses[0] - losses[1]) / (2 * eps)


def test_fine_tune_after_block_freezes_prefix():
  full = _live_resnet(False)
  full(tf.zeros([1, 16, 16, 3]))
  n_full = _count(full.trainable_variables)
  # 16 px and 4 images: the last group's batch norms see 16 values each (2 px at 8 px and 2
  # images make the loss too curved for central differences).
  x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 1])
  head = tf.random.stateless_normal([4, 128], seed=[2, 2])

  def prefix(net, k):
    return net.stem + [net.stem_bn] + [blk for g in net.groups[:k] for blk in g]

  for k in range(5):
    net = _live_resnet(False, fine_tune_after_block=k)
    net(tf.zeros([1, 16, 16, 3]))
    # Counted in the unfrozen twin: the parameters the freeze takes away.
    frozen_params = sum(_count(layer.trainable_variables) for layer in prefix(full, k))
    assert frozen_params > 0
    assert _count(net.trainable_variables) == n_full - frozen_params
    frozen = [v.value for layer in prefix(net, k) for v in layer.weights]
    before = [v.numpy() for layer in prefix(net, k) for v in layer.non_trainable_weights]
    with tf.GradientTape(watch_accessed_variables=False) as tape:
      tape.watch([v.value for v in net.trainable_variables] + frozen)
      loss = tf.reduce_sum(net(x, training=True)["final_avg_pool"] * head)
    grads = tape.gradient(loss, [v.value for v in net.trainable_variables] + frozen)
    trained, stopped = grads[: len(net.trainable_variables)], grads[len(net.trainable_variables) :]
    # Every trainable weight (each residual branch live) gets a gradient; none reaches the prefix.
    for v, g in zip(net.trainable_variables, trained):
      assert g is not None and np.abs(g.numpy()).max() > 0, v.path
    assert all(g is None or not np.any(g.numpy()) for g in stopped)
    # Frozen BN runs in inference mode: its moving statistics do not move.
    after = [v.numpy() for layer in prefix(net, k) for v in layer.non_trainable_weights]
    assert len(before) > 0
    for a, b in zip(before, after):
      np.testing.assert_array_equal(a, b)
    if k == 0:
      # The gradient's values: its norm is the loss's slope along it (central differences) for
      # the first trainable kernel after the stem, which the whole network lies behind.
      first = net.trainable_variables[0]
      norm, slope = _directional_derivative(net, x, head, first, 1e-3 * np.abs(first).max())
      assert abs(slope - norm) <= 0.02 * norm, (k, first.path, norm, slope)
  assert _count(net.trainable_variables) == 0  # k = 4: the whole encoder is frozen


def test_config_round_trip():
  # Arguments away from their defaults; half width keeps the two builds small.
  net = resnet.ResNet(
    depth=34,
    width_multiplier=0.5,
    cifar_stem=True,
    se_ratio=0.5,
    batch_norm_decay=0.99,
    synchronized_bn=True,
  )
  clone = resnet.ResNet.from_config(net.get_config())
  assert clone.get_config() == net.get_config()
  net(tf.zeros([1, 8, 8, 3]))
  clone(tf.zeros([1, 8, 8, 3]))
  assert _count(clone.trainable_variables) == _count(net.trainable_variables)


def test_bad_arguments():
  for kwargs, word in [
    (dict(depth=19), "resnet_depth"),
    (dict(width_multiplier=0), "width"),
    (dict(width_multiplier=0.007), "round"),  # round(64 * 0.007) = 0
    (dict(width_multiplier=float("nan")), "width"),
    (dict(width_multiplier=0.02, sk_ratio=0.0625), "selective kernels"),
    (dict(fine_tune_after_block=5), "fine_tune_after_block"),
  ]:
    with pytest.raises(ValueError, match=word):
      resnet.ResNet(**kwargs)
