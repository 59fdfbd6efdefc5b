"""tf_simclr.batch_major_conv: TF's convolution, with the kernel gradient summed over the batch."""

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import batch_major_conv


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
@pytest.mark.parametrize("hw,c,o", [(4, 32, 48), (7, 16, 8)])
def test_batch_major_kernel_gradient_is_the_convolution_gradient(dtype, hw, c, o):
  # The bf16 CPU path of Conv2dFixedPadding: forward and input gradient must be TF's own ops
  # (bit for bit); the kernel gradient must be dW = sum_b,h,w x_pad[b,h+i,w+j,c] dy[b,h,w,o],
  # checked against that sum in float64, as close as TF's registered gradient gets to it.
  rng = np.random.default_rng(hw)
  x = tf.cast(rng.standard_normal([5, hw, hw, c]), dtype)
  w = tf.cast(0.1 * rng.standard_normal([3, 3, c, o]), dtype)
  dy = tf.cast(rng.standard_normal([5, hw, hw, o]), dtype)
  grads = {}
  for name, conv in (
    ("custom", batch_major_conv.conv2d_same_batch_major_grad),
    ("registered", lambda a, b: tf.nn.conv2d(a, b, 1, "SAME")),
  ):
    with tf.GradientTape() as tape:
      tape.watch([x, w])
      y = conv(x, w)
    grads[name] = (y, *tape.gradient(y, [x, w], output_gradients=dy))
  (y1, dx1, dw1), (y2, dx2, dw2) = grads["custom"], grads["registered"]
  np.testing.assert_array_equal(y1.numpy(), y2.numpy())
  np.testing.assert_array_equal(dx1.numpy(), dx2.numpy())
  xp = np.pad(np.asarray(tf.cast(x, tf.float64)), [[0, 0], [1, 1], [1, 1], [0, 0]])
  dyn = np.asarray(tf.cast(dy, tf.float64))
  ref = np.stack(
    [
      np.stack([np.einsum("bhwc,bhwo->co", xp[:, i : i + hw, j : j + hw], dyn) for j in range(3)])
      for i in range(3)
    ]
  )
  scale = np.abs(ref).max()
  err = lambda g: np.abs(np.asarray(tf.cast(g, tf.float64)) - ref).max() / scale
  # float32: ~1e-7; bfloat16: the output's rounding (8 bits), ~2e-3, for both forms.
  tol = 1e-5 if dtype == tf.float32 else 8e-3
  assert err(dw1) < tol and err(dw2) < tol, (err(dw1), err(dw2))


def test_kernel_grad_pays_only_for_small_bfloat16_3x3_maps():
  # This test process has CPUs only (conftest.py).
  pays = batch_major_conv.kernel_grad_pays
  assert pays(tf.zeros([2, 8, 8, 4], tf.bfloat16), 3)  # 64 positions: the limit
  assert pays(tf.zeros([2, 7, 7, 4], tf.bfloat16), 3)
  assert not pays(tf.zeros([2, 9, 8, 4], tf.bfloat16), 3)  # 72 positions
  assert not pays(tf.zeros([2, 8, 8, 4], tf.float32), 3)
  assert not pays(tf.zeros([2, 8, 8, 4], tf.bfloat16), 1)
