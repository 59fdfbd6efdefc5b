"""Batch normalisation of the encoder and the projection head.

`BatchNorm` uses TF's fused kernel where it can and computes its moments over every replica when
synchronized (`--global_bn`); `BatchNormRelu` is the reference's BN-then-ReLU unit, built on it.
`resnet` uses `BatchNormRelu` in its stem and every block, `model` in the projection head.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_simclr import collectives

BATCH_NORM_EPSILON = 1e-5


class BatchNorm(keras.layers.Layer):
  """Batch normalisation (Ioffe & Szegedy 2015) that uses TF's fused kernel where it can.

  Keras 3's BatchNormalization is not fused on the TF backend; measured here, forward+backward
  of a [256, 32, 32, 64] tensor takes ~3x longer unfused. This layer keeps Keras's semantics
  (variables gamma, beta, moving_mean, moving_variance; biased batch variance; moving = m *
  decay + batch * (1 - decay); inference mode when not trainable) and:
    * local moments, 4-D input: `FusedBatchNormV3` with exactly this epsilon (the tf.nn wrapper
      would raise it to 1.001e-5);
    * synchronized over R > 1 replicas: one all-reduce of [sum x, sum x^2, count] per channel,
      then the normalisation formula; the all-reduce's gradient is an all-reduce, so gradients
      are those of BN over the global batch;
    * 2-D input (projection head): the normalisation formula.
  Statistics are computed in float32 whatever the compute dtype (mixed precision).

  Shapes: `[..., C] -> [..., C]`.
  """

  def __init__(
    self,
    momentum=0.9,
    epsilon=BATCH_NORM_EPSILON,
    center=True,
    scale=True,
    gamma_initializer="ones",
    synchronized=False,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.momentum = momentum
    self.epsilon = epsilon
    self.center = center
    self.scale = scale
    self.gamma_initializer = keras.initializers.get(gamma_initializer)
    self.synchronized = synchronized
    self.gamma = self.beta = None

  def build(self, input_shape):
    channels = int(input_shape[-1])
    # autocast=False: under a mixed policy every BN variable is read in float32 (statistics and
    # the fused kernel's scale/offset), as Keras's own BatchNormalization does.
    if self.scale:
      self.gamma = self.add_weight(
        shape=(channels,), name="gamma", initializer=self.gamma_initializer, autocast=False
      )
    if self.center:
      self.beta = self.add_weight(
        shape=(channels,), name="beta", initializer="zeros", autocast=False
      )
    self.moving_mean = self.add_weight(
      shape=(channels,), name="moving_mean", initializer="zeros", trainable=False, autocast=False
    )
    self.moving_variance = self.add_weight(
      shape=(channels,), name="moving_variance", initializer="ones", trainable=False, autocast=False
    )

  def _affine(self, channels):
    gamma = self.gamma if self.gamma is not None else tf.ones([channels])
    beta = self.beta if self.beta is not None else tf.zeros([channels])
    # float32 whatever the policy: the fused kernel takes float32 scale/offset with bf16/fp16 x.
    return tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32)

  def _update_moving(self, mean, variance):
    m = self.momentum
    self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
    self.moving_variance.assign(self.moving_variance * m + variance * (1.0 - m))

  def call(self, inputs, training=None):
    channels = inputs.shape[-1]
    gamma, beta = self._affine(channels)
    fused = inputs.shape.rank == 4
    if not (training and self.trainable):
      if fused:
        y, *_ = tf.raw_ops.FusedBatchNormV3(
          x=inputs,
          scale=gamma,
          offset=beta,
          mean=tf.cast(self.moving_mean, tf.float32),
          variance=tf.cast(self.moving_variance, tf.float32),
          epsilon=self.epsilon,
          exponential_avg_factor=1.0,
          data_format="NHWC",
          is_training=False,
        )
        return y
      return self._normalize(inputs, self.moving_mean, self.moving_variance, gamma, beta)

    ctx = tf.distribute.get_replica_context()
    if self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1:
      x = tf.cast(inputs, tf.float32)
      axes = list(range(inputs.shape.rank - 1))
      count = tf.cast(tf.reduce_prod(tf.shape(x)[:-1]), tf.float32)
      local = tf.concat(
        [tf.reduce_sum(x, axes), tf.reduce_sum(tf.square(x), axes), tf.reshape(count, [1])], axis=0
      )
      total = collectives.all_sum(ctx, local)
      n = total[-1]
      mean = total[:channels] / n
      variance = tf.maximum(total[channels : 2 * channels] / n - tf.square(mean), 0.0)
      self._update_moving(mean, variance)
      return self._normalize(inputs, mean, variance, gamma, beta)
    if fused:
      y, mean, unbiased_var, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs,
        scale=gamma,
        offset=beta,
        mean=tf.zeros([0]),
        variance=tf.zeros([0]),
        epsilon=self.epsilon,
        exponential_avg_factor=1.0,
        data_format="NHWC",
        is_training=True,
      )
      # The kernel reports the Bessel-corrected variance; Keras and the reference keep the
      # biased one in the moving average.
      n = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
      self._update_moving(
        tf.stop_gradient(mean), tf.stop_gradient(unbiased_var * (n - 1.0) / tf.maximum(n, 1.0))
      )
      return y
    x = tf.cast(inputs, tf.float32)
    mean, variance = tf.nn.moments(x, list(range(inputs.shape.rank - 1)))
    self._update_moving(mean, variance)
    return self._normalize(inputs, mean, variance, gamma, beta)

  def _normalize(self, inputs, mean, variance, gamma, beta):
    x = tf.cast(inputs, tf.float32)
    inv = tf.math.rsqrt(tf.cast(variance, tf.float32) + self.epsilon) * gamma
    y = x * inv + (beta - tf.cast(mean, tf.float32) * inv)
    return tf.cast(y, inputs.dtype)

  def get_config(self):
    config = super().get_config()
    config.update(
      momentum=self.momentum,
      epsilon=self.epsilon,
      center=self.center,
      scale=self.scale,
      synchronized=self.synchronized,
      gamma_initializer=keras.initializers.serialize(self.gamma_initializer),
    )
    return config


class BatchNormRelu(keras.layers.Layer):
  """Batch norm (epsilon 1e-5), optionally synchronized across replicas, then optional ReLU.

  Args:
    relu: apply ReLU after normalisation.
    init_zero: start gamma at 0 (last BN of a residual branch).
    center, scale: learn beta / gamma.
    decay: moving-average momentum (`--batch_norm_decay`).
    synchronized: compute batch moments over all replicas (`--global_bn`).

  Shapes: `[..., C] -> [..., C]`, normalised over all axes but the last.
  """

  def __init__(
    self,
    relu=True,
    init_zero=False,
    center=True,
    scale=True,
    decay=0.9,
    synchronized=False,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.relu = relu
    self.init_zero = init_zero
    self.center = center
    self.scale = scale
    self.decay = decay
    self.synchronized = synchronized
    # The name keeps 'batch_normalization' in every variable path: LARS's exclusion regexes
    # (the reference's) select BN variables by it.
    self.bn = BatchNorm(
      momentum=decay,
      epsilon=BATCH_NORM_EPSILON,
      center=center,
      scale=scale,
      gamma_initializer="zeros" if init_zero else "ones",
      synchronized=synchronized,
      name="batch_normalization",
    )

  def call(self, inputs, training=None):
    x = self.bn(inputs, training=training)
    return tf.nn.relu(x) if self.relu else x

  def get_config(self):
    config = super().get_config()
    config.update(
      relu=self.relu,
      init_zero=self.init_zero,
      center=self.center,
      scale=self.scale,
      decay=self.decay,
      synchronized=self.synchronized,
    )
    return config
