"""A batch of crops, each its own box of its own image, resized as `tf.image.resize(bicubic)` does.

The reference crops each view and resizes it with `tf.image.resize(..., method='bicubic')`
(TF's `ResizeBicubic`, half-pixel centres, no antialiasing). On the host that resize is a third
of the cost of a 224 px view. `crop_resize` computes the same function for a whole batch on
the accelerator, where boxes differ in size from view to view: per output row and column the
four taps and weights of TF's kernel (Keys' cubic, a = -0.5, from its table of 1,025 entries;
taps outside the crop get weight 0 and the rest are renormalised), then the image's rows are
gathered and mixed, then its columns, in TF's order. Equal to TF's resize of the crop up to
float rounding (tested); static output shapes, no per-view control flow.
"""

import numpy as np
import tensorflow as tf

_TABLE_SIZE = 1024  # TF's kTableSize: the kernel is sampled at 1/1024 pixel.


def _keys_table(a=-0.5):
  """TF's coefficient table: (near, far) float32 [1025]: the kernel at x and at x + 1, x = i/1024.

  Computed as TF does: x in float32, the polynomial in double, stored as float32.
  """
  x = (np.arange(_TABLE_SIZE + 1) * 1.0 / _TABLE_SIZE).astype(np.float32).astype(np.float64)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  x1 = x + 1.0
  far = ((a * x1 - 5 * a) * x1 + 8 * a) * x1 - 4 * a
  return near.astype(np.float32), far.astype(np.float32)


_NEAR, _FAR = _keys_table()


def _taps(start, length, out_size):
  """TF's taps of a half-pixel bicubic resize of [start, start + length) to `out_size` samples.

  Args:
    start: int32 [B], the crop's first index in the image.
    length: int32 [B], the crop's extent (>= 1).
    out_size: Python int.

  Returns:
    (indices int32 [B, out_size, 4] into the image, weights float32 [B, out_size, 4]).
  """
  scale = tf.cast(length, tf.float32) / float(out_size)  # [B]
  pos = (tf.range(out_size, dtype=tf.float32) + 0.5)[None, :] * scale[:, None] - 0.5
  floor = tf.floor(pos)
  offset = tf.cast(tf.round((pos - floor) * _TABLE_SIZE), tf.int32)  # lrintf: half to even
  near, far = tf.constant(_NEAR), tf.constant(_FAR)
  rest = _TABLE_SIZE - offset
  weights = tf.stack(
    [tf.gather(far, offset), tf.gather(near, offset), tf.gather(near, rest), tf.gather(far, rest)],
    axis=-1,
  )  # [B, out, 4]
  taps = tf.cast(floor, tf.int32)[..., None] + tf.constant([-1, 0, 1, 2])
  limit = length[:, None, None]
  weights = tf.where((taps >= 0) & (taps < limit), weights, 0.0)
  w0, w1, w2, w3 = tf.unstack(weights, axis=-1)
  total = ((w0 + w1) + w2) + w3
  tiny = 1000.0 * np.finfo(np.float32).tiny
  weights = tf.where(tf.abs(total)[..., None] >= tiny, weights * (1.0 / total)[..., None], weights)
  indices = start[:, None, None] + tf.clip_by_value(taps, 0, limit - 1)
  return indices, weights


def _mix(gather, indices, weights):
  """w0 * gather(i0) + w1 * gather(i1) + w2 * gather(i2) + w3 * gather(i3), summed in that order."""
  out = None
  for k in range(4):
    term = weights[k] * gather(indices[..., k])
    out = term if out is None else out + term
  return out


def crop_resize(images, begin, size, height, width):
  """Each image's box, resized to [height, width] by TF's bicubic kernel, clipped to [0, 1].

  Args:
    images: uint8 [B, H, W, 3] in [0, 255] or float in [0, 1] (pixels outside each box, e.g.
      padding, are never read).
    begin: int32 [B, 2 or 3], (row, column[, 0]) of each box's corner, as `tf.slice`.
    size: int32 [B, 2 or 3], (rows, columns[, -1 or 3]) of each box, each >= 1.
    height, width: Python ints, the output size.

  Returns:
    float32 [B, height, width, 3]: `clip(resize(crop in [0, 1], bicubic), 0, 1)` per image.
  """
  images = tf.convert_to_tensor(images)
  begin, size = tf.cast(begin, tf.int32), tf.cast(size, tf.int32)
  rows, row_w = _taps(begin[:, 0], size[:, 0], height)  # [B, height, 4]
  cols, col_w = _taps(begin[:, 1], size[:, 1], width)  # [B, width, 4]
  # TF mixes each needed column's four rows first, then the four columns.
  row_w = [w[:, :, None, None] for w in tf.unstack(row_w, axis=-1)]
  col_w = [w[:, None, :, None] for w in tf.unstack(col_w, axis=-1)]

  def image_rows(index):  # [B, height] -> float32 [B, height, W, 3]
    x = tf.gather(images, index, axis=1, batch_dims=1)
    if images.dtype == tf.uint8:  # As `convert_image_dtype`, pixel by pixel before the resize.
      return tf.cast(x, tf.float32) * (1.0 / 255.0)
    return tf.cast(x, tf.float32)

  mixed_rows = _mix(image_rows, rows, row_w)  # [B, height, W, 3]

  def mixed_cols(index):  # [B, width] -> [B, height, width, 3]
    return tf.gather(mixed_rows, index, axis=2, batch_dims=1)

  return tf.clip_by_value(_mix(mixed_cols, cols, col_w), 0.0, 1.0)
