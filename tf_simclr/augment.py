"""Stateless, seeded SimCLR augmentations.

One pretraining view is the composition of google-research/simclr
`tf2/data_util.py` (`preprocess_for_train`, then the blur that the reference
applies to the batch inside the model):

  random resized crop (bicubic) -> horizontal flip (p=0.5) -> colour jitter
  (p=0.8; brightness, contrast, saturation, hue in random order, clipping after
  each) -> grayscale (p=0.2) -> Gaussian blur (p=0.5) -> clip to [0, 1].

The crop may be resized bilinearly instead (`interpolation`, as torchvision's
RandomResizedCrop): 1.2x faster host path at 224 px, other pixels.

Randomness. Every random choice comes from stateless ops keyed by the `seed`
argument, so a seed gives the same view bit for bit, eagerly, inside
`tf.function` and inside `tf.data.Dataset.map` (tested). The seed is split once
into a sub-seed for the crop sampler and a sub-seed for one Philox draw of
`_NUM_UNIFORMS` numbers; every other decision owns a fixed slot of that draw.
Philox is counter based, so slot k is a fixed function of (seed, k): the
decisions are independent, and a decision appended at a new slot leaves the
existing ones unchanged (what one `fold_in` per decision gives, with 2 random
ops per view instead of 11; graph nodes are what costs on small images). The
ops use TF's default algorithm selection, Philox on CPU and GPU (the same
numbers; an explicit alg='philox' adds ~40 graph nodes per view). The crop
sampler has a CPU kernel only, so the draws run on the host (or a GPU), never
under XLA on a TPU, where the default generator would differ (ThreeFry).

Layout. The colour ops and the blur run on planar [..., 3, H, W] images
(`tf_simclr.image_ops`). `simclr_augment` compiles a view's flip, jitter,
grayscale and blur with XLA (`_compiled_distort`): 1.6x faster at 224 px than
TF's kernels op by op (docs/benchmarks.md). Views up to 96x96 use TF's fused
interleaved kernels instead: as fast there, and nothing to compile.

Three forms compute the same view, equal up to float rounding (tested):
  * `simclr_augment`: one image of any size, all on the host (in `tf.data`).
  * `box_params` on the host (in `tf.data`: the view's random draws, no
    pixels), then `crop_batch` and `distort_batch` in the training step on the
    accelerator (the crop's resize, then flip, jitter, grayscale and
    blur of the batch): `--augment_on_device` where shapes may vary by batch.
  * `crop_view` on the host (the draws, the crop and its resize), then
    `distort_batch`: `--augment_on_device` on a TPU, whose inputs need static
    shapes (the source images differ in size).
"""

from collections.abc import Mapping
import functools

import numpy as np
import tensorflow as tf

from tf_simclr import config
from tf_simclr import crop_resize
from tf_simclr import image_ops

# What the public functions accept where they take a tensor: a tf.Tensor, a NumPy array, a list.
TensorLike = tf.types.experimental.TensorLike

CROP_PROPORTION = 0.875  # Eval centre crop, standard for ImageNet.

# Random resized crop (Inception-style), as the reference.
_MIN_OBJECT_COVERED = 0.1
_AREA_RANGE = (0.08, 1.0)
_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_MAX_ATTEMPTS = 100

_P_FLIP = 0.5
_P_JITTER = 0.8
_P_GRAY = 0.2
_P_BLUR = 0.5
_SIGMA_RANGE = (0.1, 2.0)

# The per-view uniform draw: slots 0-3 decide flip, jitter, grayscale, blur
# (against _P_*); 4-7 are the brightness, contrast, saturation and hue
# factors; 8-11 sort keys giving the jitter order; 12 the blur sigma. Append
# new decisions at the end.
_NUM_UNIFORMS = 13

# ----------------------------------------------------------------------------
# Argument checks.


def _check_size(height, width):
  for name, value in (("height", height), ("width", width)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"{name} must be a Python int, got {value!r}.")
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {value}.")
  return int(height), int(width)


def _check_strength(color_jitter_strength):
  try:
    strength = float(color_jitter_strength)
  except TypeError as e:
    raise TypeError(
      f"color_jitter_strength must be a Python number, got {color_jitter_strength!r}."
    ) from e
  if not strength >= 0:
    raise ValueError(f"color_jitter_strength must be >= 0, got {color_jitter_strength}.")
  return strength


def _check_image(image, rank, name="image"):
  image = tf.convert_to_tensor(image)
  if not (image.dtype == tf.uint8 or image.dtype.is_floating):
    raise TypeError(f"{name} must be uint8 or float, got {image.dtype.name}.")
  if image.shape.rank is not None and image.shape.rank != rank:
    raise ValueError(f"{name} must have rank {rank}, got shape {image.shape}.")
  if image.shape.rank is not None and image.shape[-1] not in (None, 3):
    raise ValueError(f"{name} must have 3 channels, got shape {image.shape}.")
  return image


def _check_seed(seed, rank):
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64):
    raise TypeError(f"seed must be int32 or int64, got {seed.dtype.name}.")
  want = "[2]" if rank == 1 else "[B, 2]"
  if seed.shape.rank is not None and (seed.shape.rank != rank or seed.shape[-1] not in (None, 2)):
    raise ValueError(f"seed must have shape {want}, got {seed.shape}.")
  # One dtype for the derived seeds: int32 and int64 seeds of equal value are
  # the same seed.
  return tf.cast(seed, tf.int64)


def _to_float(image):
  """uint8 [0, 255] -> float32 [0, 1], as `convert_image_dtype`; floats cast."""
  if image.dtype == tf.uint8:
    return tf.cast(image, tf.float32) * (1.0 / 255.0)
  return tf.cast(image, tf.float32)


# ----------------------------------------------------------------------------
# Random parameters of one view.


def _sample_box(box_seed, image_size, height, width, min_scale=_AREA_RANGE[0]):
  """(begin, size), int32 [3] each, of one random resized crop of area in [min_scale, 1]."""
  aspect = width / height
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    image_size,
    bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
    seed=box_seed,
    min_object_covered=_MIN_OBJECT_COVERED,
    # The reference scales the range by the target aspect width / height.
    aspect_ratio_range=(_ASPECT_RANGE[0] * aspect, _ASPECT_RANGE[1] * aspect),
    area_range=(min_scale, _AREA_RANGE[1]),
    max_attempts=_MAX_ATTEMPTS,
    use_image_if_no_bounding_boxes=True,
  )
  return begin, size


def draw(seed, image_size, height, width, strength, min_scale=_AREA_RANGE[0], flip=True):
  """Every random decision of one view (public for tests and benchmarks that check or reuse them).

  Args:
    seed: int32/int64 [2].
    image_size: int32 [3], the source image's shape.
    height: output height (Python int).
    width: output width (Python int).
    strength: colour jitter strength s (Python float).
    min_scale: smallest crop area, as a fraction of the image (Python float).
    flip: whether the view may be flipped; False keeps every other draw unchanged.

  Returns:
    dict: 'begin', 'size' int32 [3] (crop, `tf.slice` style); 'flip',
    'jitter', 'gray', 'blur' bool []; 'factors' float32 [4] (brightness,
    contrast and saturation factors, hue delta); 'order' int32 [4] (jitter op
    applied at each step); 'sigma' float32 [].
  """
  box_seed, draw_seed = tf.unstack(tf.random.experimental.stateless_split(seed))
  begin, size = _sample_box(box_seed, image_size, height, width, min_scale)
  u = tf.random.stateless_uniform([_NUM_UNIFORMS], draw_seed)
  coins, factors, keys, sigma = tf.split(u, [4, 4, 4, 1])
  p_flip = _P_FLIP if flip else 0.0  # The coin is drawn either way: other slots stay put.
  flip, jitter, gray, blur = tf.unstack(coins < tf.constant([p_flip, _P_JITTER, _P_GRAY, _P_BLUR]))
  b, c, s, h = 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength
  # SimCLRv2 multiplicative brightness: factor ~ U[max(0, 1 - b), 1 + b];
  # contrast, saturation ~ U[1 - c, 1 + c]; hue delta ~ U[-h, h].
  low = np.array([max(0.0, 1.0 - b), 1.0 - c, 1.0 - s, -h], np.float32)
  high = np.array([1.0 + b, 1.0 + c, 1.0 + s, h], np.float32)
  sigma_low, sigma_high = _SIGMA_RANGE
  return {
    "begin": begin,
    "size": size,
    "flip": flip,
    "jitter": jitter,
    "gray": gray,
    "blur": blur,
    "factors": low + factors * (high - low),
    # The argsort of 4 i.i.d. uniforms is a uniform random permutation.
    "order": tf.argsort(keys, stable=True),
    "sigma": sigma_low + sigma[0] * (sigma_high - sigma_low),
  }


# ----------------------------------------------------------------------------
# Per-image form.


def _jitter_one(x, factors, order, steps):
  """Colour jitter of one planar image x [3, H, W]: the first `steps` (4, or 0 for none) ops of
  `order`.

  A loop over the steps, each a `switch_case` of the 4 ops: under XLA the loop body is
  compiled once (0.3 s at 224 px; unrolled, the 16 branches took XLA 2-7 s to compile). A
  loop count of 0 rather than a `tf.cond` around the loop: XLA copies a conditional's result.
  """
  factors = tf.unstack(factors)

  def step(i, x):
    # The reference clips after every op.
    branches = [
      lambda op=op: tf.clip_by_value(image_ops.JITTER_OPS[op](x, factors[op]), 0.0, 1.0)
      for op in range(4)
    ]
    return i + 1, tf.switch_case(order[i], branches)

  return tf.while_loop(lambda i, x: i < steps, step, (tf.constant(0), x))[1]


# Views up to this many pixels skip XLA: TF's fused interleaved kernels, one graph node per op,
# are as fast there (32 px: 0.34 ms a view either way), with no compilation (0.3-0.8 s a size).
_MAX_FUSED_PIXELS = 96 * 96

# The jitter ops on one interleaved [H, W, 3] image with TF's fused kernels.
_FUSED_JITTER_OPS = {
  image_ops.BRIGHTNESS: image_ops.brightness,
  image_ops.CONTRAST: tf.image.adjust_contrast,
  image_ops.SATURATION: tf.image.adjust_saturation,
  image_ops.HUE: tf.image.adjust_hue,
}


def _distort_small(view, p, strength, use_blur):
  """`_compiled_distort`'s function on a small interleaved view [h, w, 3], TF's fused kernels."""
  x = tf.cond(p["flip"], lambda: tf.reverse(view, axis=[1]), lambda: view)
  if strength > 0:

    def jitter(x):
      factors = tf.unstack(p["factors"])
      for step in range(4):
        # Bind the current image: branches must not see later reassignments.
        ops = [lambda x=x, op=op: _FUSED_JITTER_OPS[op](x, factors[op]) for op in range(4)]
        # The reference clips after every op.
        x = tf.clip_by_value(tf.switch_case(p["order"][step], ops), 0.0, 1.0)
      return x

    x = tf.cond(p["jitter"], lambda: jitter(x), lambda: x)
    x = tf.cond(p["gray"], lambda: tf.tile(tf.image.rgb_to_grayscale(x), [1, 1, 3]), lambda: x)
  radius = image_ops.blur_radius(view.shape[0])
  if use_blur and radius > 0:
    sigma = p["sigma"][None]
    x = tf.cond(p["blur"], lambda: image_ops.blur(x[None], sigma, radius, False)[0], lambda: x)
  return tf.clip_by_value(x, 0.0, 1.0)


def _check_min_scale(min_scale):
  if isinstance(min_scale, bool) or not isinstance(min_scale, (int, float, np.number)):
    raise TypeError(f"min_scale must be a Python number, got {min_scale!r}.")
  if not 0.0 < min_scale <= 1.0:
    raise ValueError(f"min_scale must be in (0, 1], got {min_scale}.")
  return float(min_scale)


# How a view's crop may be resized (`tf.image.resize` methods): the reference's bicubic, or
# bilinear (torchvision's RandomResizedCrop), cheaper on the host.
INTERPOLATIONS = config.CROP_INTERPOLATIONS


def _check_interpolation(interpolation):
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}.")
  return interpolation


def _checked_draw(image_shape, seed, height, width, color_jitter_strength, min_scale, flip):
  """`draw` after checking the caller's arguments: `crop_view`'s and `box_params`'s draws."""
  height, width = _check_size(height, width)
  strength = _check_strength(color_jitter_strength)
  min_scale = _check_min_scale(min_scale)
  seed = _check_seed(seed, rank=1)
  return draw(seed, image_shape, height, width, strength, min_scale, bool(flip))


def _resized_crop(image, seed, height, width, color_jitter_strength, min_scale, flip, method):
  """The view's random resized crop [height, width, 3] in [0, 1], and its draws."""
  method = _check_interpolation(method)
  image = _check_image(image, rank=3)
  p = _checked_draw(tf.shape(image), seed, height, width, color_jitter_strength, min_scale, flip)
  # Crop before the dtype conversion: less data to convert.
  crop = _to_float(tf.slice(image, p["begin"], p["size"]))
  crop = tf.ensure_shape(crop, [None, None, 3])
  view = tf.image.resize(crop[None], [height, width], method=method)[0]
  # Bicubic overshoots.
  view = tf.clip_by_value(view, 0.0, 1.0)
  return tf.ensure_shape(view, [height, width, 3]), p


def simclr_augment(
  image: TensorLike,
  seed: TensorLike,
  height: int,
  width: int,
  color_jitter_strength: float = 1.0,
  use_blur: bool = True,
  min_scale: float = _AREA_RANGE[0],
  flip: bool = True,
  interpolation: str = "bicubic",
) -> tf.Tensor:
  """One SimCLR pretraining view of one image.

  Args:
    image: uint8 [H, W, 3] in [0, 255] or float [H, W, 3] in [0, 1], any size.
    seed: int32/int64 [2], stateless seed; same seed -> same view, bit for bit.
    height: output height (Python int).
    width: output width (Python int).
    color_jitter_strength: s >= 0 (Python number): brightness, contrast and
      saturation 0.8 s, hue 0.2 s. 0 turns jitter and grayscale off.
    use_blur: whether to apply the Gaussian blur (p = 0.5).
    min_scale: smallest crop area as a fraction of the image, in (0, 1]; the
      reference's 0.08 by default.
    flip: whether to flip horizontally (p = 0.5), as the reference; False for
      images whose mirror image means something else (digits, text).
    interpolation: the crop's resize, 'bicubic' (the reference) or 'bilinear'.

  Returns:
    float32 [height, width, 3] in [0, 1].
  """
  height, width = _check_size(height, width)
  strength = _check_strength(color_jitter_strength)
  view, p = _resized_crop(image, seed, height, width, strength, min_scale, flip, interpolation)
  if height * width <= _MAX_FUSED_PIXELS:
    return tf.ensure_shape(_distort_small(view, p, strength, use_blur), [height, width, 3])
  distort = _compiled_distort(height, width, strength, bool(use_blur))
  return distort(view, {k: p[k] for k in DISTORT_SIGNATURE})


@functools.cache
def _compiled_distort(height, width, strength, use_blur):
  """The flip, jitter, grayscale and blur of one view: (float32 [height, width, 3], params) -> view.

  Compiled with XLA, which fuses the element-wise ops of each colour op (the hue's ~30) into a
  loop or two over the planes: one launch per view instead of ~100 graph nodes. The blur's
  `tf.cond` becomes an XLA conditional (a skipped blur costs nothing); XLA's CPU code is
  deterministic. The blur uses shifted sums, which XLA fuses (its depthwise convolution is ~20x
  slower).
  """

  def distort(view, p):
    # Selects, not `tf.cond`s, for the flip and the grayscale: XLA fuses a select into the
    # pass that reads or writes the view, while a conditional's result is one more pass.
    x = tf.transpose(view, [2, 0, 1])
    x = tf.where(p["flip"], tf.reverse(x, axis=[2]), x)
    if strength > 0:
      x = _jitter_one(x, p["factors"], p["order"], tf.where(p["jitter"], 4, 0))
      x = tf.where(p["gray"], image_ops.grayscale(x), x)
    radius = image_ops.blur_radius(height)
    if use_blur and radius > 0:
      sigma = p["sigma"][None]
      x = tf.cond(
        p["blur"], lambda: image_ops.blur(x[None], sigma, radius, shifts=True)[0], lambda: x
      )
    return tf.ensure_shape(tf.clip_by_value(tf.transpose(x, [1, 2, 0]), 0.0, 1.0), view.shape)

  return tf.function(
    distort,
    jit_compile=True,
    autograph=False,
    input_signature=[tf.TensorSpec([height, width, 3], tf.float32), DISTORT_SIGNATURE],
  )


# ----------------------------------------------------------------------------
# Split forms: draw on the host, crop and distort on the accelerator.
#
# On a TPU pod the host CPUs cannot keep up with the colour ops and the blur
# of large views (a known complaint with the reference). Here the host draws
# every parameter of the view (the crop sampler has a CPU kernel only) and
# decodes; the accelerator applies the crop and resize (`crop_batch`; on a
# TPU the host does it, `crop_view`), then the flip, jitter, grayscale and
# blur to the batch, with no randomness of its own (nothing that differs
# between Philox and ThreeFry). Both equal `simclr_augment` up to float
# rounding (~1e-6, tested).


def _jitter_batch(x, factors, order):
  """Colour jitter with per-example factors and op order.

  Each step computes the four ops on the whole batch and keeps, per example,
  the one its order asks for: static shapes and no per-example control flow
  (XLA friendly), at four times the arithmetic.

  Args:
    x: float32 [B, 3, H, W].
    factors: float32 [B, 4] (brightness, contrast, saturation, hue delta).
    order: int32 [B, 4].

  Returns:
    float32 [B, 3, H, W].
  """
  factors = tf.unstack(factors[:, :, None, None, None], axis=1)
  for step in range(4):
    op = order[:, step]
    out = image_ops.brightness(x, factors[image_ops.BRIGHTNESS])
    for k in (image_ops.CONTRAST, image_ops.SATURATION, image_ops.HUE):
      out = image_ops.select(tf.equal(op, k), image_ops.JITTER_OPS[k](x, factors[k]), out)
    x = tf.clip_by_value(out, 0.0, 1.0)
  return x


def _distort_planar(x, p, strength, use_blur):
  """Jitter, grayscale and blur of planar crops x [B, 3, H, W] with params p."""
  if strength > 0:
    x = image_ops.select(p["jitter"], _jitter_batch(x, p["factors"], p["order"]), x)
    x = image_ops.select(p["gray"], image_ops.grayscale(x), x)
  radius = image_ops.blur_radius(x.shape[2])
  if use_blur and radius > 0:
    x = image_ops.select(p["blur"], image_ops.blur(x, p["sigma"], radius), x)
  return x


# The per-view parameters that `crop_view` draws and `distort_batch` applies.
DISTORT_SIGNATURE = {
  "flip": tf.TensorSpec([], tf.bool),
  "jitter": tf.TensorSpec([], tf.bool),
  "gray": tf.TensorSpec([], tf.bool),
  "blur": tf.TensorSpec([], tf.bool),
  "factors": tf.TensorSpec([4], tf.float32),
  "order": tf.TensorSpec([4], tf.int32),
  "sigma": tf.TensorSpec([], tf.float32),
}
# ... and with the crop on the accelerator too, the box that `crop_batch` crops.
BOX_SIGNATURE = {
  **DISTORT_SIGNATURE,
  "begin": tf.TensorSpec([3], tf.int32),
  "size": tf.TensorSpec([3], tf.int32),
}


def crop_view(
  image: TensorLike,
  seed: TensorLike,
  height: int,
  width: int,
  color_jitter_strength: float = 1.0,
  min_scale: float = _AREA_RANGE[0],
  flip: bool = True,
  interpolation: str = "bicubic",
) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
  """The host half of one view: random resized crop, and the other draws.

  Args:
    image: uint8 [H, W, 3] or float [H, W, 3] in [0, 1], any size.
    seed: int32/int64 [2], the view's stateless seed (as `simclr_augment`).
    height: output height (Python int).
    width: output width (Python int).
    color_jitter_strength, min_scale, flip, interpolation: as in `simclr_augment`.

  Returns:
    (crop, params): crop float32 [height, width, 3] in [0, 1], not flipped;
    params a dict shaped like `DISTORT_SIGNATURE` for `distort_batch`.
  """
  crop, p = _resized_crop(
    image, seed, height, width, color_jitter_strength, min_scale, flip, interpolation
  )
  return crop, {k: p[k] for k in DISTORT_SIGNATURE}


def box_params(
  image_shape: TensorLike,
  seed: TensorLike,
  height: int,
  width: int,
  color_jitter_strength: float = 1.0,
  min_scale: float = _AREA_RANGE[0],
  flip: bool = True,
) -> dict[str, tf.Tensor]:
  """The host half of one view when the accelerator crops too: every draw, no pixels.

  Args:
    image_shape: int32 [3], the source image's shape.
    seed, height, width, color_jitter_strength, min_scale, flip: as `crop_view`.

  Returns:
    dict shaped like `BOX_SIGNATURE`: `crop_view`'s params and the crop box ('begin', 'size'
    int32 [3], `tf.slice` style) for `crop_batch`; the same draws as `crop_view`'s.
  """
  p = _checked_draw(image_shape, seed, height, width, color_jitter_strength, min_scale, flip)
  return {k: p[k] for k in BOX_SIGNATURE}


def crop_batch(
  images: TensorLike,
  params: Mapping[str, tf.Tensor],
  height: int,
  width: int,
  interpolation: str = "bicubic",
) -> tf.Tensor:
  """The accelerator's crop and resize of a batch of views (`box_params`'s boxes).

  Args:
    images: uint8 [B, H, W, 3], each view's source image (zero-padded to a common size).
    params: 'begin' and 'size' int32 [B, 3] (other keys ignored).
    height, width: Python ints.
    interpolation: as in `simclr_augment`.

  Returns:
    float32 [B, height, width, 3] in [0, 1]: `crop_view`'s crops (equal up to float rounding).
  """
  height, width = _check_size(height, width)
  images = _check_image(images, rank=4, name="images")
  method = _check_interpolation(interpolation)
  return crop_resize.crop_resize(images, params["begin"], params["size"], height, width, method)


def distort_batch(
  crops: TensorLike,
  params: Mapping[str, tf.Tensor],
  color_jitter_strength: float = 1.0,
  use_blur: bool = True,
) -> tf.Tensor:
  """The accelerator half: flip, colour jitter, grayscale and blur of a batch.

  Args:
    crops: float32 [B, H, W, 3] in [0, 1], from `crop_view`.
    params: dict of `crop_view`'s params with a leading batch axis [B, ...].
    color_jitter_strength: as given to `crop_view`.
    use_blur: as in `simclr_augment`.

  Returns:
    float32 [B, H, W, 3] in [0, 1].
  """
  strength = _check_strength(color_jitter_strength)
  crops = _check_image(crops, rank=4, name="crops")
  x = tf.transpose(_to_float(crops), [0, 3, 1, 2])
  x = image_ops.select(params["flip"], tf.reverse(x, axis=[3]), x)
  x = _distort_planar(x, params, strength, use_blur)
  views = tf.clip_by_value(tf.transpose(x, [0, 2, 3, 1]), 0.0, 1.0)
  return tf.ensure_shape(views, [None] + crops.shape[1:].as_list())


# ----------------------------------------------------------------------------
# Evaluation.


def _center_crop_shape(image_height, image_width, aspect, crop_proportion):
  """Reference `_compute_crop_shape`: int32 (crop_height, crop_width)."""
  image_height = tf.cast(image_height, tf.float32)
  image_width = tf.cast(image_width, tf.float32)
  wider = aspect > image_width / image_height
  # Keep `crop_proportion` of the side that limits the requested aspect.
  crop_height = tf.where(
    wider, crop_proportion / aspect * image_width, crop_proportion * image_height
  )
  crop_width = tf.where(
    wider, crop_proportion * image_width, crop_proportion * aspect * image_height
  )
  return (tf.cast(tf.math.rint(crop_height), tf.int32), tf.cast(tf.math.rint(crop_width), tf.int32))


def preprocess_eval(image: TensorLike, height: int, width: int) -> tf.Tensor:
  """Evaluation preprocessing of one image (no randomness).

  Above 32 px: the reference centre crop (keep 0.875 of the side limiting the
  output aspect) then a bicubic resize. At or below 32 px (CIFAR-style): a
  bicubic resize to (height, width), the identity when already that size.

  Args:
    image: uint8 [H, W, 3] in [0, 255] or float [H, W, 3] in [0, 1].
    height: output height (Python int).
    width: output width (Python int).

  Returns:
    float32 [height, width, 3] in [0, 1].
  """
  height, width = _check_size(height, width)
  image = _check_image(image, rank=3)
  shape = tf.shape(image)
  if height > 32:
    crop_height, crop_width = _center_crop_shape(
      shape[0], shape[1], width / height, CROP_PROPORTION
    )
    offset_y = (shape[0] - crop_height + 1) // 2
    offset_x = (shape[1] - crop_width + 1) // 2
    image = tf.slice(
      image, tf.stack([offset_y, offset_x, 0]), tf.stack([crop_height, crop_width, -1])
    )
  image = _to_float(image)
  same = tf.logical_and(tf.equal(tf.shape(image)[0], height), tf.equal(tf.shape(image)[1], width))
  image = tf.cond(
    same, lambda: image, lambda: tf.image.resize(image[None], [height, width], "bicubic")[0]
  )
  image = tf.clip_by_value(image, 0.0, 1.0)
  return tf.ensure_shape(image, [height, width, 3])
