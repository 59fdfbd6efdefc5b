"""ResNet-10..200 encoders (post-activation, He et al. 2016) as used by SimCLR and SimCLRv2.

The topology is the reference's (google-research/simclr tf2/resnet.py) layer for layer, so that
parameter counts agree and its released weights can be mapped onto ours:
  * every block group's first block has a projection shortcut, block_group1 included;
  * convolutions have no bias; strided convolutions pad explicitly ("fixed padding") and use VALID;
  * the last batch norm of each residual branch starts with gamma = 0;
  * `sk_ratio > 0` turns on SimCLRv2's selective kernels, the ResNet-D stem (three 3x3 convs)
    and the ResNet-D average-pool shortcut; `se_ratio > 0` adds squeeze-excitation;
  * the CIFAR stem (3x3 stride-1 conv, no max pool) is for images of 32 px or less.

The encoder returns a dict of named endpoints (`ENDPOINTS`); `final_avg_pool` is the
representation `h` of the paper. This module holds the network and its convolutions and blocks;
their batch norm is `batch_norm`'s. `model.SimCLRModel` builds the encoder; `convert` maps the
reference's weights onto these layers.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_simclr import batch_major_conv
from tf_simclr.batch_norm import BatchNormRelu

# The width arithmetic lives in config (no TensorFlow import: flag checks stay fast).
from tf_simclr.config import channels
from tf_simclr.config import check_width

# depth -> (block kind, blocks per group). Basic blocks below 50 layers, bottlenecks above.
DEPTHS = {
  10: ("basic", (1, 1, 1, 1)),  # not the reference's: a CPU-sized encoder (the quick start)
  18: ("basic", (2, 2, 2, 2)),
  34: ("basic", (3, 4, 6, 3)),
  50: ("bottleneck", (3, 4, 6, 3)),
  101: ("bottleneck", (3, 4, 23, 3)),
  152: ("bottleneck", (3, 8, 36, 3)),
  200: ("bottleneck", (3, 24, 36, 3)),
}

ENDPOINTS = (
  "initial_conv",
  "initial_max_pool",
  "block_group1",
  "block_group2",
  "block_group3",
  "block_group4",
  "final_avg_pool",
)


def _conv_init():
  # The reference's tf.keras.initializers.VarianceScaling(): scale 1, fan_in, truncated normal.
  return keras.initializers.VarianceScaling(
    scale=1.0, mode="fan_in", distribution="truncated_normal"
  )


def fixed_padding(inputs, kernel_size):
  """Pads `[B, H, W, C]` by (k-1)//2 before and the rest after, independent of input size."""
  pad_total = kernel_size - 1
  pad_beg = pad_total // 2
  pad_end = pad_total - pad_beg
  return tf.pad(inputs, [[0, 0], [pad_beg, pad_end], [pad_beg, pad_end], [0, 0]])


class Conv2dFixedPadding(keras.layers.Layer):
  """Bias-free conv; strided ones pad explicitly then use VALID, so output size is ceil(H/s)."""

  def __init__(self, filters, kernel_size, strides, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    self.kernel_size = kernel_size
    self.strides = strides
    self.conv = keras.layers.Conv2D(
      filters,
      kernel_size,
      strides=strides,
      padding="same" if strides == 1 else "valid",
      use_bias=False,
      kernel_initializer=_conv_init(),
      name="conv2d",
    )

  def call(self, inputs):
    if self.strides > 1:
      inputs = fixed_padding(inputs, self.kernel_size)
    elif batch_major_conv.kernel_grad_pays(inputs, self.kernel_size):
      if not self.conv.built:
        self.conv.build(inputs.shape)
      # The same convolution as self.conv (stride 1, SAME, no bias, no activation); only the
      # way its kernel gradient is computed differs.
      return batch_major_conv.conv2d_same_batch_major_grad(
        inputs, tf.cast(self.conv.kernel, inputs.dtype)
      )
    return self.conv(inputs)

  def get_config(self):
    config = super().get_config()
    config.update(filters=self.filters, kernel_size=self.kernel_size, strides=self.strides)
    return config


class SelectiveKernel(keras.layers.Layer):
  """Selective-kernel conv (Li et al. 2019) as in SimCLRv2: two 3x3 streams mixed by attention.

  `[B, H, W, C_in] -> [B, H/s, W/s, filters]`.
  """

  def __init__(self, filters, strides, sk_ratio, bn_args, min_dim=32, **kwargs):
    super().__init__(**kwargs)
    self.filters = filters
    # Both streams come from one conv with 2x filters, split along channels.
    self.conv = Conv2dFixedPadding(2 * filters, 3, strides, name="conv_streams")
    self.bn = BatchNormRelu(**bn_args, name="bn_streams")
    mid_dim = max(int(filters * sk_ratio), min_dim)
    self.conv_reduce = keras.layers.Conv2D(
      mid_dim, 1, use_bias=False, kernel_initializer=_conv_init(), name="conv_reduce"
    )
    self.bn_reduce = BatchNormRelu(**bn_args, name="bn_reduce")
    self.conv_mix = keras.layers.Conv2D(
      2 * filters, 1, use_bias=False, kernel_initializer=_conv_init(), name="conv_mix"
    )

  def call(self, inputs, training=None):
    x = self.bn(self.conv(inputs), training=training)
    streams = tf.stack(tf.split(x, 2, axis=-1))  # [2, B, H, W, filters]
    pooled = tf.reduce_mean(tf.reduce_sum(streams, axis=0), axis=[1, 2], keepdims=True)
    mixing = self.conv_mix(self.bn_reduce(self.conv_reduce(pooled), training=training))
    mixing = tf.nn.softmax(tf.stack(tf.split(mixing, 2, axis=-1)), axis=0)  # [2, B, 1, 1, f]
    return tf.reduce_sum(streams * mixing, axis=0)


class SqueezeExcitation(keras.layers.Layer):
  """Squeeze-excitation (Hu et al. 2018): channel gates from globally pooled features.

  The bottleneck width is `max(1, int(filters * se_ratio))`, where `filters` is the block's
  base width (not its 4x output), as in the reference. `[B, H, W, C] -> [B, H, W, C]`.
  """

  def __init__(self, filters, se_ratio, **kwargs):
    super().__init__(**kwargs)
    self.reduce = keras.layers.Conv2D(
      max(1, int(filters * se_ratio)),
      1,
      use_bias=True,
      kernel_initializer=_conv_init(),
      name="se_reduce",
    )
    self.expand = None

  def build(self, input_shape):
    self.expand = keras.layers.Conv2D(
      int(input_shape[-1]), 1, use_bias=True, kernel_initializer=_conv_init(), name="se_expand"
    )

  def call(self, inputs):
    gate = tf.reduce_mean(inputs, axis=[1, 2], keepdims=True)
    gate = self.expand(tf.nn.relu(self.reduce(gate)))
    return tf.sigmoid(gate) * inputs


class _Block(keras.layers.Layer):
  """Shared parts of the two residual blocks: the projection shortcut and the final ReLU."""

  expansion = 1

  def __init__(self, filters, strides, use_projection, sk_ratio, se_ratio, bn_args, **kwargs):
    super().__init__(**kwargs)
    # Sublayers are attributes, not list items: tf.train.Checkpoint follows attributes of Keras
    # 3 layers but not Keras-tracked lists (whose BN statistics would then not be saved).
    self.shortcut_pool = self.shortcut_conv = self.shortcut_bn = None
    self._shortcut_pad = False
    if use_projection:
      out = self.expansion * filters
      if sk_ratio > 0:
        # ResNet-D: average-pool then a stride-1 1x1 conv, so no activations are skipped.
        self.shortcut_pool = keras.layers.AveragePooling2D(
          2, strides=strides, padding="same" if strides == 1 else "valid"
        )
        self.shortcut_conv = Conv2dFixedPadding(out, 1, 1, name="shortcut_conv")
        self._shortcut_pad = strides > 1
      else:
        self.shortcut_conv = Conv2dFixedPadding(out, 1, strides, name="shortcut_conv")
      self.shortcut_bn = BatchNormRelu(relu=False, **bn_args, name="shortcut_bn")
    self.se = SqueezeExcitation(filters, se_ratio, name="se") if se_ratio > 0 else None

  def _project(self, inputs, training):
    if self.shortcut_conv is None:
      return inputs
    x = fixed_padding(inputs, 2) if self._shortcut_pad else inputs
    if self.shortcut_pool is not None:
      x = self.shortcut_pool(x)
    return self.shortcut_bn(self.shortcut_conv(x), training=training)


class ResidualBlock(_Block):
  """Basic block: 3x3 conv, BN-ReLU, 3x3 conv, BN(gamma 0), [SE], + shortcut, ReLU."""

  def __init__(
    self,
    filters,
    strides,
    use_projection=False,
    sk_ratio=0.0,
    se_ratio=0.0,
    bn_args=None,
    zero_init_last_bn=True,
    **kwargs,
  ):
    bn_args = bn_args or {}
    super().__init__(filters, strides, use_projection, sk_ratio, se_ratio, bn_args, **kwargs)
    self.conv1 = Conv2dFixedPadding(filters, 3, strides, name="conv1")
    self.bn1 = BatchNormRelu(**bn_args, name="bn1")
    self.conv2 = Conv2dFixedPadding(filters, 3, 1, name="conv2")
    self.bn2 = BatchNormRelu(relu=False, init_zero=zero_init_last_bn, **bn_args, name="bn2")

  def call(self, inputs, training=None):
    shortcut = self._project(inputs, training)
    x = self.bn1(self.conv1(inputs), training=training)
    x = self.bn2(self.conv2(x), training=training)
    if self.se is not None:
      x = self.se(x)
    return tf.nn.relu(x + shortcut)


class BottleneckBlock(_Block):
  """Bottleneck: 1x1, 3x3 (or selective kernel) with the stride, 1x1 to 4x, [SE], + shortcut."""

  expansion = 4

  def __init__(
    self,
    filters,
    strides,
    use_projection=False,
    sk_ratio=0.0,
    se_ratio=0.0,
    bn_args=None,
    zero_init_last_bn=True,
    **kwargs,
  ):
    bn_args = bn_args or {}
    super().__init__(filters, strides, use_projection, sk_ratio, se_ratio, bn_args, **kwargs)
    self.conv1 = Conv2dFixedPadding(filters, 1, 1, name="conv1")
    self.bn1 = BatchNormRelu(**bn_args, name="bn1")
    if sk_ratio > 0:
      self.conv2 = SelectiveKernel(filters, strides, sk_ratio, bn_args, name="sk_conv2")
      self.bn2 = None  # the selective kernel ends in its own BN-ReLU.
    else:
      self.conv2 = Conv2dFixedPadding(filters, 3, strides, name="conv2")
      self.bn2 = BatchNormRelu(**bn_args, name="bn2")
    self.conv3 = Conv2dFixedPadding(4 * filters, 1, 1, name="conv3")
    self.bn3 = BatchNormRelu(relu=False, init_zero=zero_init_last_bn, **bn_args, name="bn3")

  def call(self, inputs, training=None):
    shortcut = self._project(inputs, training)
    x = self.bn1(self.conv1(inputs), training=training)
    if self.bn2 is None:
      x = self.conv2(x, training=training)
    else:
      x = self.bn2(self.conv2(x), training=training)
    x = self.bn3(self.conv3(x), training=training)
    if self.se is not None:
      x = self.se(x)
    return tf.nn.relu(x + shortcut)


class ResNet(keras.layers.Layer):
  """ResNet encoder returning a dict of named endpoints.

  Args:
    depth: one of `DEPTHS` (10, 18, 34, 50, 101, 152, 200; 10 is not the reference's).
    width_multiplier: positive channel multiplier: SimCLR's 1x, 2x, 4x models, or a fraction
      (0.25, 0.5) for CPU-sized encoders. See `channels`.
    cifar_stem: 3x3 stride-1 stem without max pool (for images of 32 px or less).
    sk_ratio: selective-kernel ratio (SimCLRv2 uses 0.0625); 0 disables it.
    se_ratio: squeeze-excitation ratio; 0 disables it.
    batch_norm_decay: BN moving-average momentum.
    synchronized_bn: BN moments over all replicas (`--global_bn`).
    zero_init_residual: start the last BN gamma of every residual branch at 0, so that each
      block starts as the identity (the reference; Goyal et al. 2017). False starts it at 1:
      much faster in runs of a few hundred steps, such as the CPU quick start.
    fine_tune_after_block: -1 trains everything; k in 0..4 freezes the stem and block groups
      before group k+1 (4: the whole encoder). Frozen layers are not trainable, their BN runs in
      inference mode, and no gradient flows into them (stop_gradient at the boundary).

  Call: images `[B, H, W, 3]` float -> dict with `initial_conv` `[B, H', W', 64w]`,
  `initial_max_pool`, `block_group1..4` (`[B, ., ., 64w*e*2^(k-1)]`, e = 1 basic / 4 bottleneck)
  and `final_avg_pool` `[B, 512w*e]`.
  """

  def __init__(
    self,
    depth=50,
    width_multiplier=1,
    cifar_stem=False,
    sk_ratio=0.0,
    se_ratio=0.0,
    batch_norm_decay=0.9,
    synchronized_bn=False,
    fine_tune_after_block=-1,
    zero_init_residual=True,
    **kwargs,
  ):
    super().__init__(**kwargs)
    if depth not in DEPTHS:
      raise ValueError(f"resnet_depth must be one of {sorted(DEPTHS)}, got {depth}")
    check_width(width_multiplier, sk_ratio)
    if fine_tune_after_block not in (-1, 0, 1, 2, 3, 4):
      raise ValueError(f"fine_tune_after_block must be in -1..4, got {fine_tune_after_block}")
    self.depth = depth
    self.width_multiplier = width_multiplier
    self.cifar_stem = cifar_stem
    self.sk_ratio = sk_ratio
    self.se_ratio = se_ratio
    self.batch_norm_decay = batch_norm_decay
    self.synchronized_bn = synchronized_bn
    self.fine_tune_after_block = fine_tune_after_block
    self.zero_init_residual = zero_init_residual
    bn_args = dict(decay=batch_norm_decay, synchronized=synchronized_bn)
    # Sublayers are attributes (see _Block); these name lists give the order.
    self._stem_names = self._make_stem(bn_args)
    self.stem_bn = BatchNormRelu(**bn_args, name="stem_bn")
    self.max_pool = None if cifar_stem else keras.layers.MaxPooling2D(3, 2, padding="same")
    self._group_names = [self._make_group(g, bn_args) for g in range(4)]
    self._freeze()

  def _make_stem(self, bn_args):
    """Creates the stem's layers before its last BN-ReLU as attributes; returns their names."""
    width = channels(64, self.width_multiplier)
    if self.cifar_stem:
      stem = [Conv2dFixedPadding(width, 3, 1, name="stem_conv")]
    elif self.sk_ratio > 0:
      # ResNet-D stem: three 3x3 convs replace the 7x7.
      stem = [
        Conv2dFixedPadding(width // 2, 3, 2, name="stem_conv_a"),
        BatchNormRelu(**bn_args, name="stem_bn_a"),
        Conv2dFixedPadding(width // 2, 3, 1, name="stem_conv_b"),
        BatchNormRelu(**bn_args, name="stem_bn_b"),
        Conv2dFixedPadding(width, 3, 1, name="stem_conv"),
      ]
    else:
      stem = [Conv2dFixedPadding(width, 7, 2, name="stem_conv")]
    for layer in stem:
      setattr(self, layer.name, layer)
    return [layer.name for layer in stem]

  def _make_group(self, g, bn_args):
    """Creates block group g + 1 (g in 0..3) as attributes `block_group<g+1>_block<b>`; returns
    their names. The group's first block strides (but in group 1) and projects its shortcut."""
    kind, blocks = DEPTHS[self.depth]
    block_cls = ResidualBlock if kind == "basic" else BottleneckBlock
    filters = channels(64 * 2**g, self.width_multiplier)
    names = []
    for b in range(blocks[g]):
      name = f"block_group{g + 1}_block{b}"
      block = block_cls(
        filters,
        (1, 2, 2, 2)[g] if b == 0 else 1,
        use_projection=(b == 0),
        sk_ratio=self.sk_ratio,
        se_ratio=self.se_ratio,
        bn_args=bn_args,
        zero_init_last_bn=self.zero_init_residual,
        name=name,
      )
      setattr(self, name, block)
      names.append(name)
    return names

  def _freeze(self):
    """Freezes the stem (and groups 1..k) for fine_tune_after_block = k >= 0."""
    if self.fine_tune_after_block < 0:
      return
    for layer in self.stem + [self.stem_bn]:
      layer.trainable = False
    for group in self.groups[: self.fine_tune_after_block]:
      for block in group:
        block.trainable = False

  @property
  def stem(self):
    """The stem's layers before its last BN-ReLU, in order."""
    return [getattr(self, n) for n in self._stem_names]

  @property
  def groups(self):
    """The four block groups: lists of residual blocks, in order."""
    return [[getattr(self, n) for n in names] for names in self._group_names]

  @property
  def output_dim(self):
    """Size of `final_avg_pool`."""
    expansion = 1 if DEPTHS[self.depth][0] == "basic" else 4
    return channels(512, self.width_multiplier) * expansion

  def call(self, inputs, training=None):
    out = {}
    x = inputs
    for layer in self.stem:
      x = layer(x, training=training) if isinstance(layer, BatchNormRelu) else layer(x)
    out["initial_conv"] = x
    x = self.stem_bn(x, training=training)
    if self.max_pool is not None:
      x = self.max_pool(x)
    out["initial_max_pool"] = x
    for g, group in enumerate(self.groups):
      if self.fine_tune_after_block == g:
        x = tf.stop_gradient(x)
      for block in group:
        x = block(x, training=training)
      out[f"block_group{g + 1}"] = x
    if self.fine_tune_after_block == 4:
      x = tf.stop_gradient(x)
    out["final_avg_pool"] = tf.reduce_mean(x, axis=[1, 2])
    return out

  def get_config(self):
    config = super().get_config()
    config.update(
      depth=self.depth,
      width_multiplier=self.width_multiplier,
      cifar_stem=self.cifar_stem,
      sk_ratio=self.sk_ratio,
      se_ratio=self.se_ratio,
      batch_norm_decay=self.batch_norm_decay,
      synchronized_bn=self.synchronized_bn,
      fine_tune_after_block=self.fine_tune_after_block,
      zero_init_residual=self.zero_init_residual,
    )
    return config
