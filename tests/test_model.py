"""Projection head modes, supervised head, stop-gradient and the named outputs of SimCLRModel."""

import re

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import batch_norm
from tf_simclr import model as model_lib
from tf_simclr.config import ModelConfig


def _count(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


SMALL = dict(resnet_depth=18, image_size=16, num_classes=10)


@pytest.fixture(scope="module")
def pretrain_model():
  tf.keras.utils.set_random_seed(0)
  return model_lib.build_model(ModelConfig(**SMALL))


def test_outputs_and_head_sizes(pretrain_model):
  x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[1, 2])
  out = pretrain_model(x, training=False)
  assert set(out) == set(model_lib.OUTPUTS)
  assert out["proj_head_output"].shape == (4, 128)
  assert out["logits_sup"].shape == (4, 10)
  assert all(v.dtype == tf.float32 for v in out.values())
  np.testing.assert_array_equal(out["proj_head_input"].numpy(), out["final_avg_pool"].numpy())
  # ft_proj_selector=0: the supervised head reads h itself.
  np.testing.assert_array_equal(out["sup_head_input"].numpy(), out["proj_head_input"].numpy())
  # Nonlinear head, D=512: two 512x512 dense (no bias) + BN(gamma, beta), then 512x128 + BN(gamma).
  head = pretrain_model.projection_head
  assert _count(head.trainable_variables) == 2 * (512 * 512 + 2 * 512) + 512 * 128 + 128
  assert _count(pretrain_model.supervised_head.trainable_variables) == 512 * 10 + 10


@pytest.mark.parametrize(
  "mode,layers,selector,out_dim",
  [("none", 3, 0, 512), ("linear", 3, 1, 64), ("nonlinear", 2, 1, 32), ("nonlinear", 3, 2, 16)],
)
def test_projection_head_modes(mode, layers, selector, out_dim):
  head = model_lib.ProjectionHead(
    mode, 512, out_dim=out_dim, num_layers=layers, ft_proj_selector=selector
  )
  h = tf.random.stateless_normal([6, 512], seed=[3, 4])
  out, selected = head(h, training=True)
  assert out.shape == (6, out_dim if mode != "none" else 512)
  if mode == "none":
    np.testing.assert_array_equal(out.numpy(), h.numpy())
    return
  # Recompute by hand from the layers' weights: dense, then BN in training mode, ReLU between.
  hiddens, x = [h.numpy()], h.numpy()
  for j, layer in enumerate(head.layers_):
    x = x @ layer.dense.kernel.numpy()
    mean, var = x.mean(0), x.var(0)
    x = (x - mean) / np.sqrt(var + 1e-5) * layer.bn.bn.gamma.numpy()
    if layer.bn.bn.center:
      x = x + layer.bn.bn.beta.numpy()
    if mode == "nonlinear" and j != len(head.layers_) - 1:
      x = np.maximum(x, 0)
    hiddens.append(x)
  np.testing.assert_allclose(out.numpy(), hiddens[-1], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(selected.numpy(), hiddens[selector], rtol=1e-4, atol=1e-4)
  # The last layer has neither bias nor ReLU: it produces negative values.
  assert out.numpy().min() < 0
  assert not head.layers_[-1].bn.bn.center


def test_bad_head_arguments():
  with pytest.raises(ValueError, match="proj_head_mode"):
    model_lib.ProjectionHead("mlp", 8)
  with pytest.raises(ValueError, match="ft_proj_selector"):
    model_lib.ProjectionHead("linear", 8, ft_proj_selector=2)
  with pytest.raises(ValueError, match="fine_tune_after_block"):
    ModelConfig(train_mode="pretrain", fine_tune_after_block=2)


def test_supervised_head_sees_stop_gradient_features_in_pretraining(pretrain_model):
  x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[5, 6])
  with tf.GradientTape() as tape:
    out = pretrain_model(x, training=True)
    loss = tf.reduce_sum(out["logits_sup"] ** 2)
  grads = tape.gradient(loss, pretrain_model.trainable_variables)
  for v, g in zip(pretrain_model.trainable_variables, grads):
    if "head_supervised" in v.path:
      assert g is not None and np.abs(g.numpy()).sum() > 0
    else:
      assert g is None, v.path


def test_finetune_gradients_reach_encoder():
  tf.keras.utils.set_random_seed(1)
  m = model_lib.build_model(ModelConfig(**SMALL, train_mode="finetune", ft_proj_selector=1))
  x = tf.random.stateless_uniform([4, 16, 16, 3], seed=[7, 8])

  def loss_fn():
    return tf.reduce_sum(m(x, training=True)["logits_sup"] ** 2)

  with tf.GradientTape() as tape:
    loss = loss_fn()
  grads = dict(
    zip([v.path for v in m.trainable_variables], tape.gradient(loss, m.trainable_variables))
  )
  # Selector 1 feeds the classifier from the first head layer: the rest of the head gets none.
  assert grads["simclr_model/projection_head/nl_1/dense/kernel"] is None
  assert grads["simclr_model/projection_head/nl_2/dense/kernel"] is None
  for path in ("resnet/stem_conv/conv2d/kernel", "projection_head/nl_0/dense/kernel"):
    # The gradient's values: its norm is the loss's slope along it (central differences).
    var = next(v for v in m.trainable_variables if v.path == f"simclr_model/{path}")
    grad = grads[var.path]
    assert grad is not None and np.abs(grad.numpy()).max() > 0, path
    eps = 1e-3 * float(np.abs(var.numpy()).max())
    start, step = var.numpy(), eps * (grad / tf.norm(grad)).numpy()
    var.assign(start + step)
    up = float(loss_fn())
    var.assign(start - step)
    down = float(loss_fn())
    var.assign(start)
    norm, slope = float(tf.norm(grad)), (up - down) / (2 * eps)
    assert abs(slope - norm) <= 0.02 * norm, (path, norm, slope)


def test_variable_paths_select_what_lars_excludes(pretrain_model):
  # The reference's exclusions: BN, biases, and the supervised head are neither decayed nor
  # layer-adapted. Check that those regexes select exactly the intended variables by structure.
  excluded = [
    v
    for v in pretrain_model.trainable_variables
    if any(re.search(p, v.path) for p in ("batch_normalization", "bias", "head_supervised"))
  ]
  bn = [
    w
    for layer in pretrain_model._flatten_layers()
    if isinstance(layer, batch_norm.BatchNorm)
    for w in layer.trainable_weights
  ]
  head = pretrain_model.supervised_head.trainable_weights
  biases = [
    w
    for layer in pretrain_model._flatten_layers()
    if isinstance(layer, tf.keras.layers.Dense) and layer.use_bias
    for w in [layer.bias]
  ]
  want = {id(v) for v in bn + head + biases}
  assert {id(v) for v in excluded} == want
  assert len(bn) > 40


def test_zero_init_supervised_head(pretrain_model):
  m = model_lib.build_model(ModelConfig(**SMALL, train_mode="finetune"))
  m.zero_init_supervised_head()
  out = m(tf.random.stateless_uniform([2, 16, 16, 3], seed=[1, 1]), training=False)
  np.testing.assert_array_equal(out["logits_sup"].numpy(), np.zeros((2, 10)))


def test_no_supervised_head_without_classes():
  m = model_lib.build_model(
    ModelConfig(resnet_depth=18, image_size=16, num_classes=0, proj_head_mode="linear")
  )
  out = m(tf.zeros([2, 16, 16, 3]))
  assert "logits_sup" not in out and out["proj_head_output"].shape == (2, 128)


@pytest.mark.parametrize(
  "kwargs",
  [dict(), dict(sk_ratio=0.0625, se_ratio=0.25, image_size=64)],
  ids=["r18_cifar", "r18_sk_se"],
)
def test_checkpoint_holds_every_weight(tmp_path, kwargs):
  # tf.train.Checkpoint follows attributes, not Keras 3's tracked lists: a layer kept only in a
  # list would lose its BN moving statistics in every checkpoint.
  config = ModelConfig(**{**SMALL, **kwargs})
  tf.keras.utils.set_random_seed(2)
  m = model_lib.build_model(config)
  for v in m.weights:
    v.assign(tf.random.stateless_uniform(v.shape, seed=[3, len(v.path)]))
  path = tf.train.Checkpoint(model=m).write(str(tmp_path / "ckpt"))
  saved = [k for k in tf.train.list_variables(path) if k[0].startswith("model/")]
  assert len(saved) == len(m.weights)
  fresh = model_lib.build_model(config)
  tf.train.Checkpoint(model=fresh).read(path).assert_existing_objects_matched()
  for a, b in zip(m.weights, fresh.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
