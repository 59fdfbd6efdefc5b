"""A batch of crops, each its own box of its own image, resized as `tf.image.resize` does.

The reference crops each view and resizes it with `tf.image.resize(..., method='bicubic')`
(TF's `ResizeBicubic`, half-pixel centres, no antialiasing); `--crop_interpolation=bilinear`
uses `ResizeBilinear` instead. On the host that resize is a third of the cost of a 224 px view.
`crop_resize` computes the same function for a whole batch on the accelerator, where boxes
differ in size from view to view: per output row and column the taps and weights of TF's
kernel, then the image's rows are gathered and mixed, then its columns, in TF's order.
Bicubic: Keys' cubic (a = -0.5) from TF's table of 1,025 entries, four taps, those outside the
crop weighted 0 and the rest renormalised. Bilinear: two taps clamped to the crop. Equal to
TF's resize of the crop up to float rounding (bit for bit eagerly; tested); static output
shapes, no per-view control flow.
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


def _positions(length, out_size):
  """TF's half-pixel sampling positions in the crop and their floors: float32 [B, out_size]."""
  scale = tf.cast(length, tf.float32) / float(out_size)  # [B]
  pos = (tf.range(out_size, dtype=tf.float32) + 0.5)[None, :] * scale[:, None] - 0.5
  return pos, tf.floor(pos)


def _taps(start, length, out_size):
  """TF's taps of a half-pixel bicubic resize of [start, start + length) to `out_size` samples.

  Args:
    start: int32 [B], the crop's first index in the image.
    length: int32 [B], the crop's extent (>= 1).
    out_size: Python int.

  Returns:
    (indices int32 [B, out_size, 4] into the image, weights float32 [B, out_size, 4]).
  """
  pos, floor = _positions(length, out_size)
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


def _bilinear_taps(start, length, out_size):
  """TF's taps of a half-pixel bilinear resize: as `_taps`, with 2 taps [B, out_size, 2].

  The weights are (1 - t, t); TF computes `top + (bottom - top) * t`, which `crop_resize`
  keeps for bilinear.
  """
  pos, floor = _positions(length, out_size)
  t = pos - floor
  low = tf.maximum(tf.cast(floor, tf.int32), 0)
  high = tf.minimum(tf.cast(tf.math.ceil(pos), tf.int32), length[:, None] - 1)
  indices = start[:, None, None] + tf.stack([low, high], axis=-1)
  return indices, tf.stack([1.0 - t, t], axis=-1)


def _mix(gather, indices, weights):
  """The taps' weighted sum: w0 * g(i0) + w1 * g(i1) + ... in that order (bicubic, 4 taps), or
  `g(i0) + (g(i1) - g(i0)) * t` as TF's bilinear kernel (2 taps, weights (1 - t, t))."""
  if len(weights) == 2:
    top = gather(indices[..., 0])
    return top + (gather(indices[..., 1]) - top) * weights[1]
  out = None
  for k in range(len(weights)):
    term = weights[k] * gather(indices[..., k])
    out = term if out is None else out + term
  return out


def crop_resize(images, begin, size, height, width, method="bicubic"):
  """Each image's box, resized to [height, width] by TF's kernel, clipped to [0, 1].

  Args:
    images: uint8 [B, H, W, 3] in [0, 255] or float in [0, 1] (pixels outside each box, e.g.
      padding, are never read).
    begin: int32 [B, 2 or 3], (row, column[, 0]) of each box's corner, as `tf.slice`.
    size: int32 [B, 2 or 3], (rows, columns[, -1 or 3]) of each box, each >= 1.
    height, width: Python ints, the output size.
    method: 'bicubic' or 'bilinear' (Python str), as `tf.image.resize`'s.

  Returns:
    float32 [B, height, width, 3]: `clip(resize(crop in [0, 1], method), 0, 1)` per image.
  """
  images = tf.convert_to_tensor(images)
  begin, size = tf.cast(begin, tf.int32), tf.cast(size, tf.int32)
  taps = {"bicubic": _taps, "bilinear": _bilinear_taps}[method]
  rows, row_w = taps(begin[:, 0], size[:, 0], height)  # [B, height, 4 or 2]
  cols, col_w = taps(begin[:, 1], size[:, 1], width)  # [B, width, 4 or 2]
  row_w = [w[:, :, None, None] for w in tf.unstack(row_w, axis=-1)]
  col_w = [w[:, None, :, None] for w in tf.unstack(col_w, axis=-1)]

  def image_rows(index):  # [B, height] -> float32 [B, height, W, 3]
    x = tf.gather(images, index, axis=1, batch_dims=1)
    if images.dtype == tf.uint8:  # As `convert_image_dtype`, pixel by pixel before the resize.
      return tf.cast(x, tf.float32) * (1.0 / 255.0)
    return tf.cast(x, tf.float32)

  def mixed_cols(values, index):  # [B, width] -> [B, height, width, 3]
    return tf.gather(values, index, axis=2, batch_dims=1)

  def row_lerp(index):  # one of the two rows of each output row, lerped along it
    values = image_rows(index)
    return _mix(lambda c: mixed_cols(values, c), cols, col_w)

  if method == "bilinear":  # TF lerps along both rows first, then between them.
    out = _mix(row_lerp, rows, row_w)
  else:  # TF mixes the four rows of each needed column first, then the four columns.
    mixed_rows = _mix(image_rows, rows, row_w)  # [B, height, W, 3]
    out = _mix(lambda c: mixed_cols(mixed_rows, c), cols, col_w)
  return tf.clip_by_value(out, 0.0, 1.0)
