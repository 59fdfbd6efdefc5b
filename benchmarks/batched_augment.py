"""A batched form of `tf_simclr.augment.simclr_augment`, for the augmentation benchmark.

`simclr_augment_batch` makes the views of a batch of same-size images with batched ops, as
one could inside a model graph. Row i equals `simclr_augment(images[i], seeds[i], ...)` up to
float rounding (< 1e-4; ~1e-6 measured). Its resize is a gather-based re-implementation of
TF's bicubic kernel (`tf.image.resize`, `method='bicubic'`, `antialias=False`: Keys cubic
a = -0.5, half-pixel centres, the 1024-entry coefficient table, taps outside the crop dropped
and the rest renormalized), bit-identical to it, since `tf.image.crop_and_resize` is bilinear
only. Training does not use it (its accelerator path is `augment.crop_view` +
`augment.distort_batch`); `benchmarks.augment_pipeline` times it against the per-image form.
It calls `augment`'s private samplers and ops on purpose: the same draws make the same views.
"""

import numpy as np
import tensorflow as tf

from tf_simclr import augment
from tf_simclr import image_ops


def _bicubic_table():
  """TF's Keys-cubic (a = -0.5) coefficient table, float32 [2, 1025].

  Row 0 is the weight of an inner tap at distance x = i / 1024, row 1 that of
  an outer tap at distance 1 + x; computed in double from float x and stored
  in float as `resize_bicubic_op.cc` does, so the weights are bit-identical.
  """
  a = -0.5
  table_size = 1024
  x = (
    (np.arange(table_size + 1, dtype=np.float64) / table_size).astype(np.float32).astype(np.float64)
  )
  inner = ((a + 2) * x - (a + 3)) * x * x + 1
  x1 = (x + 1.0).astype(np.float32).astype(np.float64)
  outer = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
  return np.stack([inner, outer]).astype(np.float32)


_BICUBIC_TABLE = _bicubic_table()
_BICUBIC_TABLE_SIZE = 1024


def _bicubic_taps(offset, size, out_size):
  """Source indices and weights of TF's bicubic resize of crops, one axis.

  Mirrors `GetWeightsAndIndices<HalfPixelScaler, use_keys_cubic=true>` of
  `resize_bicubic_op.cc`, in float32, for crops [offset, offset + size).

  Args:
    offset: int32 [B], crop start.
    size: int32 [B], crop length (>= 1).
    out_size: Python int, output length.

  Returns:
    (indices int32 [B, out_size, 4] into the full axis,
     weights float32 [B, out_size, 4]).
  """
  scale = tf.cast(size, tf.float32) / float(out_size)
  # Half-pixel centres: in = (out + 0.5) * scale - 0.5.
  loc = (tf.range(out_size, dtype=tf.float32) + 0.5) * scale[:, None] - 0.5
  base = tf.floor(loc)
  # TF quantizes the fractional position to the 1024-entry table.
  entry = tf.cast(tf.math.rint((loc - base) * _BICUBIC_TABLE_SIZE), tf.int32)
  mirror = _BICUBIC_TABLE_SIZE - entry
  weights = tf.stack(
    [
      tf.gather(_BICUBIC_TABLE[1], entry),
      tf.gather(_BICUBIC_TABLE[0], entry),
      tf.gather(_BICUBIC_TABLE[0], mirror),
      tf.gather(_BICUBIC_TABLE[1], mirror),
    ],
    axis=-1,
  )
  raw = tf.cast(base, tf.int32)[..., None] + tf.constant([-1, 0, 1, 2])
  bounded = tf.clip_by_value(raw, 0, size[:, None, None] - 1)
  # Taps outside the crop get weight 0; the others are renormalized.
  weights = tf.where(tf.equal(bounded, raw), weights, 0.0)
  w0, w1, w2, w3 = tf.unstack(weights, axis=-1)
  total = ((w0 + w1) + w2) + w3
  inv = tf.where(tf.abs(total) >= 1000.0 * np.finfo(np.float32).tiny, 1.0 / total, 1.0)
  return bounded + offset[:, None, None], weights * inv[..., None]


def crop_resize(images, boxes, flip, height, width):
  """Bicubic resize of per-example crops, bit-identical to TF's kernel.

  Args:
    images: float32 [B, H, W, C].
    boxes: int32 [B, 4] (offset_y, offset_x, crop_h, crop_w).
    flip: bool [B]; flipped outputs take their columns' taps in reverse order,
      which is exactly a left-right flip of the resized crop.
    height: output height (Python int).
    width: output width (Python int).

  Returns:
    float32 [B, C, height, width], planar.
  """
  y_index, y_weight = _bicubic_taps(boxes[:, 0], boxes[:, 2], height)
  x_index, x_weight = _bicubic_taps(boxes[:, 1], boxes[:, 3], width)
  x_index = image_ops.select(flip, tf.reverse(x_index, axis=[1]), x_index)
  x_weight = image_ops.select(flip, tf.reverse(x_weight, axis=[1]), x_weight)
  # Vertical pass first and taps summed left to right, as the TF kernel does;
  # one gather per tap keeps the intermediate at one [B, height, W, C]. Each
  # gather moves whole rows: the gathered axis is never the innermost one
  # (3x faster on CPU than gathering single elements).
  rows = None
  for t in range(4):
    term = tf.gather(images, y_index[:, :, t], axis=1, batch_dims=1)
    term *= y_weight[:, :, t, None, None]
    rows = term if rows is None else rows + term
  rows = tf.transpose(rows, [0, 2, 3, 1])  # [B, W, C, height]
  out = None
  for t in range(4):
    term = tf.gather(rows, x_index[:, :, t], axis=1, batch_dims=1)
    term *= x_weight[:, :, t, None, None]
    out = term if out is None else out + term
  return tf.transpose(out, [0, 2, 3, 1])  # [B, C, height, width]


def simclr_augment_batch(images, seeds, height, width, color_jitter_strength=1.0, use_blur=True):
  """SimCLR views of a batch with batched ops; equals `simclr_augment`.

  Row i equals `simclr_augment(images[i], seeds[i], ...)` up to float
  rounding (< 1e-4). The per-example random decisions come from the same
  sampler (a `tf.map_fn` over the seeds of a few scalar ops: the crop sampler
  and the Philox draw take one seed each; the sampler has a CPU kernel only,
  so under XLA / on a TPU this part must stay on the host). All pixel work is
  batched, with per-example crops, factors and blur kernels, and static
  shapes: the jitter computes the four ops at each step and selects.

  Args:
    images: uint8 [B, H, W, 3] in [0, 255] or float [B, H, W, 3] in [0, 1].
    seeds: int32/int64 [B, 2], one stateless seed per example.
    height: output height (Python int).
    width: output width (Python int).
    color_jitter_strength: as in `simclr_augment`.
    use_blur: as in `simclr_augment`.

  Returns:
    float32 [B, height, width, 3] in [0, 1].
  """
  height, width = augment._check_size(height, width)
  strength = augment._check_strength(color_jitter_strength)
  images = augment._check_image(images, rank=4, name="images")
  seeds = augment._check_seed(seeds, rank=2)

  image_size = tf.shape(images)[1:]

  def draw(seed):
    p = augment.draw(seed, image_size, height, width, strength)
    p["box"] = tf.concat([p.pop("begin")[:2], p.pop("size")[:2]], 0)
    return p

  signature = {"box": tf.TensorSpec([4], tf.int32), **augment.DISTORT_SIGNATURE}
  p = tf.map_fn(draw, seeds, fn_output_signature=signature)

  x = crop_resize(augment._to_float(images), p["box"], p["flip"], height, width)
  x = tf.clip_by_value(x, 0.0, 1.0)
  x = augment._distort_planar(x, p, strength, use_blur)
  views = tf.transpose(x, [0, 2, 3, 1])
  views = tf.clip_by_value(views, 0.0, 1.0)
  return tf.ensure_shape(views, [None, height, width, 3])
