"""Planar image ops of SimCLR views: colour jitter, grayscale and Gaussian blur.

Images are float32 [..., 3, H, W] (planes): each op is a few vectorized element-wise ops over
whole planes, 3-10x faster on CPU than TF's fused interleaved kernels (`adjust_saturation`,
`adjust_hue`, `rgb_to_grayscale`), usable with per-example factors in a batch, and fused well
by XLA. They compute the same functions as those kernels (equal up to float rounding, < 2e-6,
tested). `tf_simclr.augment` draws the parameters and composes them into views.
"""

import numpy as np
import tensorflow as tf

# Jitter op indices, as used by `order`.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)

# Luma weights of tf.image.rgb_to_grayscale.
_LUMA = (0.2989, 0.5870, 0.1140)


# Blur kernels up to this radius are applied as shifted sums, larger ones with
# depthwise convolutions: graph nodes vs. arithmetic, measured in tf.data on a
# 2-core CPU (shifts 2.5x faster at 32 px, equal at 128 px, slower above).
MAX_SHIFT_BLUR_RADIUS = 4


def select(condition, x, y):
  """x where condition else y; condition has x's shape, or is [B] for [B, ...].

  The v1 `Select` kernel: `tf.where` (SelectV2) takes a broadcasting path on
  CPU that is 10x slower even when the shapes are equal.
  """
  return tf.raw_ops.Select(condition=condition, x=x, y=y)


# ----------------------------------------------------------------------------
# Planar colour ops: x is float32 [..., 3, H, W]; factors broadcast against
# [..., 1, 1, 1] (a scalar for one image, [B, 1, 1, 1] for a batch).


def brightness(x, factor):
  return x * factor


def contrast(x, factor):
  """tf.image.adjust_contrast: (x - mean) * factor + mean, mean per channel."""
  mean = tf.reduce_mean(x, axis=[-2, -1], keepdims=True)
  return (x - mean) * factor + mean


def saturation(x, factor):
  """tf.image.adjust_saturation (HSV: S *= factor, clipped to 1).

  In HSV a channel is V - V * S * g(H), g in [0, 1] depending on the hue only,
  so scaling S moves every channel towards V by the same ratio:
  c' = V - (V - c) * min(factor, V / (V - min)), without the HSV round trip.
  """
  r, g, b = tf.split(x, 3, axis=-3)
  value = tf.maximum(tf.maximum(r, g), b)
  low = tf.minimum(tf.minimum(r, g), b)
  scale = tf.minimum(factor, tf.math.divide_no_nan(value, value - low))
  return value - (value - x) * scale


def hue(x, delta):
  """tf.image.adjust_hue (HSV: H += delta, wrapped), on planes.

  Keeps each pixel's max and min channel and moves its hue on the colour
  hexagon, h in [0, 6): the hue sector picks which channel is max / min and
  the middle channel is interpolated, as TF's kernel does.
  """
  r, g, b = tf.split(x, 3, axis=-3)  # [..., 1, H, W] each.
  high = tf.maximum(tf.maximum(r, g), b)
  low = tf.minimum(tf.minimum(r, g), b)
  chroma = high - low
  inv = tf.math.divide_no_nan(tf.ones_like(chroma), chroma)
  hue = select(
    tf.equal(high, r),
    (g - b) * inv,
    select(tf.equal(high, g), (b - r) * inv + 2.0, (r - g) * inv + 4.0),
  )
  hue += 6.0 * delta
  # Wrap to [0, 6) (give or take an ulp: the shares below are continuous
  # across the wrap); 15x faster than floormod on CPU.
  hue -= 6.0 * tf.floor(hue * (1.0 / 6.0))
  # Each channel's share of the chroma is a trapezoid of the hue:
  # r = clip(|h - 3| - 1), g = clip(2 - |h - 2|), b = clip(2 - |h - 4|).
  centre = tf.constant([3.0, 2.0, 4.0])[:, None, None]
  sign = tf.constant([1.0, -1.0, -1.0])[:, None, None]
  shift = tf.constant([-1.0, 2.0, 2.0])[:, None, None]
  share = tf.clip_by_value(tf.abs(hue - centre) * sign + shift, 0.0, 1.0)
  return low + chroma * share


def grayscale(x):
  """tf.image.rgb_to_grayscale, tiled to three planes."""
  r, g, b = tf.split(x, 3, axis=-3)
  gray = r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]
  return tf.concat([gray, gray, gray], axis=-3)


JITTER_OPS = {
  BRIGHTNESS: brightness,
  CONTRAST: contrast,
  SATURATION: saturation,
  HUE: hue,
}

# ----------------------------------------------------------------------------
# Blur.


def blur_radius(height):
  # Reference: kernel_size = height // 10, radius = kernel_size // 2, and the
  # kernel has 2 * radius + 1 taps (for both axes).
  return (height // 10) // 2


def _conv_along(x, kernels, axis):
  """Zero-padded 'SAME' convolution of x [N, 3, H, W] along axis 2 or 3.

  Image n uses kernels[n] ([N, K], K odd). The convolved axis becomes the
  depthwise convolution's spatial axis and every other one goes to channels:
  hundreds of channels fill the SIMD lanes (3 interleaved channels do not:
  2x slower at 224 px).
  """
  taps = kernels.shape[1]
  if x.shape[0] == 1:
    # One kernel: the planes can stay in the batch dimension.
    t = x[0] if axis == 2 else tf.transpose(x[0], [0, 2, 1])  # [3, L, M]
    shape = tf.shape(t)
    t = tf.reshape(t, [shape[0], shape[1], 1, shape[2]])
    filters = tf.tile(tf.reshape(kernels, [taps, 1, 1, 1]), [1, 1, shape[2], 1])
    t = tf.reshape(tf.nn.depthwise_conv2d(t, filters, [1, 1, 1, 1], "SAME"), shape)
    return (t if axis == 2 else tf.transpose(t, [0, 2, 1]))[None]
  perm = [2, 0, 1, 3] if axis == 2 else [3, 0, 1, 2]
  t = tf.transpose(x, perm)  # [L, N, 3, M]
  shape = tf.shape(t)
  t = tf.reshape(t, [1, shape[0], 1, -1])
  # Channel (n, c, m) gets image n's kernel.
  filters = tf.repeat(tf.transpose(kernels), shape[2] * shape[3], axis=1)
  t = tf.nn.depthwise_conv2d(t, tf.reshape(filters, [taps, 1, -1, 1]), [1, 1, 1, 1], "SAME")
  return tf.transpose(tf.reshape(t, shape), np.argsort(perm))


def blur(x, sigma, radius, planar=True, shifts=False):
  """Separable Gaussian blur with zero 'SAME' padding, one sigma per image.

  Args:
    x: float32 [N, 3, H, W] if planar, else [N, H, W, 3].
    sigma: float32 [N].
    radius: Python int; kernels have 2 * radius + 1 taps.
    planar: the layout of x.
    shifts: always use shifted sums (under XLA, which fuses them; its convolutions are slow).

  Returns:
    float32, x's shape: horizontal then vertical pass, as the reference.
  """
  taps = 2 * radius + 1
  t = tf.range(-radius, radius + 1, dtype=tf.float32)
  sigma = sigma[:, None]
  kernels = tf.exp(-(t * t) / (2.0 * sigma * sigma))
  kernels /= tf.reduce_sum(kernels, axis=1, keepdims=True)  # [N, taps]
  if planar and radius > MAX_SHIFT_BLUR_RADIUS and not shifts:
    return _conv_along(_conv_along(x, kernels, 3), kernels, 2)
  # Few taps (or small interleaved images, or XLA): shifted, weighted sums; fewer
  # graph nodes than the convolution with its reshapes and transposes, which
  # is what costs on small images.
  k = tf.unstack(tf.reshape(kernels, [-1, taps, 1, 1, 1]), axis=1)
  for axis in (3, 2) if planar else (2, 1):
    size = [-1] * 4
    size[axis] = x.shape[axis] or tf.shape(x)[axis]
    pad = [[0, 0]] * 4
    pad[axis] = [radius, radius]
    padded = tf.pad(x, pad)
    total = None
    for i in range(taps):
      begin = [0] * 4
      begin[axis] = i
      term = tf.slice(padded, begin, size) * k[i]
      total = term if total is None else total + term
    x = total
  return x
