"""Tests of tf_simclr.augment.

Statistics run over >= 1000 seeds through one tf.data map, not 1000 eager
calls. Binomial frequencies are checked to 4 sigma.
"""

import numpy as np
import pytest
import tensorflow as tf

from runs import map_over
from runs import random_image
from runs import seed_rows
from tf_simclr import augment
from tf_simclr import crop_resize
from tf_simclr import image_ops

N_STATS = 2000  # Seeds per statistic: 4 sigma of a p=0.5 frequency is 0.045.


def _views(image, seeds, height, width, **kwargs):
  image = tf.constant(image)
  return map_over(lambda s: augment.simclr_augment(image, s, height, width, **kwargs), seeds)


def _params(seeds, image_shape, height, width, strength=1.0, **kwargs):
  image_size = tf.constant(image_shape, tf.int32)
  return map_over(lambda s: augment.draw(s, image_size, height, width, strength, **kwargs), seeds)


def _crop_boxes(seeds, image_shape, height, width, **kwargs):
  """int32 [n, 4]: (offset_y, offset_x, crop_height, crop_width) of each seed's crop."""
  p = _params(seeds, image_shape, height, width, **kwargs)
  return np.concatenate([p["begin"][:, :2], p["size"][:, :2]], 1)


def _assert_frequency(hits, p, name):
  n = hits.size
  sigma = np.sqrt(p * (1 - p) / n)
  freq = hits.mean()
  assert abs(freq - p) < 4 * sigma, f"{name}: {freq:.4f} vs {p} (n={n})"


# ----------------------------------------------------------------------------
# Determinism.


def test_same_seed_same_view_bit_for_bit_different_seeds_differ():
  image = random_image((40, 56, 3))
  seed = tf.constant([3, 4], tf.int64)
  a = augment.simclr_augment(image, seed, 32, 32).numpy()
  b = augment.simclr_augment(image, seed, 32, 32).numpy()
  np.testing.assert_array_equal(a, b)
  # int32 and int64 seeds with the same value are the same seed.
  c = augment.simclr_augment(image, tf.constant([3, 4], tf.int32), 32, 32)
  np.testing.assert_array_equal(a, c.numpy())
  others = [
    augment.simclr_augment(image, tf.constant(s, tf.int64), 32, 32).numpy()
    for s in ([3, 5], [4, 4], [0, 0])
  ]
  for other in others:
    assert np.abs(other - a).max() > 0.05


@pytest.mark.parametrize(
  "source,size",
  [
    ((32, 32), 32),  # Fused-kernel path, 3-tap shift blur.
    ((72, 96), 64),  # Fused path, 7-tap shift blur.
    ((128, 160), 112),
  ],
)  # Planar path, 11-tap convolution blur.
def test_eager_tf_function_and_dataset_map_agree_bit_for_bit(source, size):
  image = tf.constant(random_image(source + (3,), seed=1))
  # Seeds covering every branch: blur / jitter / grayscale on and off.
  seeds = seed_rows(64, stream=11)
  p = _params(seeds, source + (3,), size, size)
  for flag in ("flip", "jitter", "gray", "blur"):
    assert p[flag].any() and not p[flag].all(), flag
  seeds = seeds[:24]
  eager = np.stack([augment.simclr_augment(image, s, size, size).numpy() for s in seeds])
  fn = tf.function(lambda s: augment.simclr_augment(image, s, size, size))
  graph = np.stack([fn(s).numpy() for s in seeds])
  mapped = _views(image, seeds, size, size)
  np.testing.assert_array_equal(eager, graph)
  np.testing.assert_array_equal(eager, mapped)


# ----------------------------------------------------------------------------
# Statistics of the random decisions, measured on the views.


def test_flip_frequency_and_flag():
  # A horizontal ramp: a view is flipped iff its right half is darker.
  ramp = np.broadcast_to(
    np.linspace(0.0, 1.0, 48, dtype=np.float32)[None, :, None], (40, 48, 3)
  ).copy()
  seeds = seed_rows(N_STATS)
  views = _views(ramp, seeds, 32, 32, color_jitter_strength=0.0, use_blur=False)
  flipped = views[:, :, 16:].mean(axis=(1, 2, 3)) < views[:, :, :16].mean(axis=(1, 2, 3))
  _assert_frequency(flipped, 0.5, "flip")
  np.testing.assert_array_equal(flipped, _params(seeds, (40, 48, 3), 32, 32)["flip"])


def test_grayscale_frequency_is_p_gray():
  # The reference applies grayscale with p=0.2 after, and independently of,
  # the p=0.8 jitter. A view of a random colour image is gray iff its three
  # channels are equal everywhere (jitter never equalizes them). 6000 seeds:
  # 4 sigma = 0.021 separates 0.2 from 0.8 * 0.2 = 0.16.
  image = random_image((32, 32, 3), seed=2)
  seeds = seed_rows(6000, stream=8)
  views = _views(image, seeds, 32, 32)
  gray = np.all(views[..., :1] == views, axis=(1, 2, 3))
  _assert_frequency(gray, 0.2, "grayscale")
  np.testing.assert_array_equal(gray, _params(seeds, (32, 32, 3), 32, 32)["gray"])


def test_blur_frequency_and_that_the_flag_drives_the_blur():
  image = random_image((32, 32, 3), seed=3)
  seeds = seed_rows(N_STATS, stream=9)
  p = _params(seeds, (32, 32, 3), 32, 32)
  _assert_frequency(p["blur"], 0.5, "blur")
  blurred = _views(image, seeds, 32, 32, color_jitter_strength=0.0)
  sharp = _views(image, seeds, 32, 32, color_jitter_strength=0.0, use_blur=False)
  same = np.all(blurred == sharp, axis=(1, 2, 3))
  # Unblurred views are untouched; blurred ones change (below sigma ~0.17 the
  # side taps are under float32 resolution, hence the 0.3).
  assert same[~p["blur"]].all()
  assert not same[p["blur"] & (p["sigma"] > 0.3)].any()
  # Blur smooths: neighbouring pixels get closer.
  tv = lambda v: np.abs(np.diff(v, axis=2)).mean(axis=(1, 2, 3))
  strong = p["blur"] & (p["sigma"] > 1.0)
  ratio = tv(blurred[strong]) / tv(sharp[strong])
  assert ratio.max() < 1.0 and np.median(ratio) < 0.6
  # sigma ~ U[0.1, 2].
  assert p["sigma"].min() >= 0.1 and p["sigma"].max() <= 2.0
  sd = 1.9 / np.sqrt(12 * N_STATS)
  assert abs(p["sigma"].mean() - 1.05) < 4 * sd


def test_jitter_parameters():
  seeds = seed_rows(N_STATS, stream=10)
  p = _params(seeds, (32, 32, 3), 32, 32, strength=1.0)
  _assert_frequency(p["jitter"], 0.8, "jitter")
  brightness, contrast, saturation, hue = p["factors"].T
  for name, values, low, high in (
    ("brightness", brightness, 0.2, 1.8),
    ("contrast", contrast, 0.2, 1.8),
    ("saturation", saturation, 0.2, 1.8),
    ("hue", hue, -0.2, 0.2),
  ):
    assert values.min() >= low and values.max() <= high, name
    # Uniform: the mean and both tails are there.
    sd = (high - low) / np.sqrt(12 * N_STATS)
    assert abs(values.mean() - (low + high) / 2) < 4 * sd, name
    assert values.min() < low + 0.02 * (high - low), name
    assert values.max() > high - 0.02 * (high - low), name
  # The order is a permutation, and each of the 24 shows up ~1/24 of the time.
  order = p["order"]
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (N_STATS, 1)))
  _, counts = np.unique(order, axis=0, return_counts=True)
  assert len(counts) == 24
  expected = N_STATS / 24
  assert np.abs(counts - expected).max() < 4 * np.sqrt(expected)
  # Strength scales the ranges: brightness U[max(0, 1 - 0.8 s), 1 + 0.8 s].
  q = _params(seeds[:500], (32, 32, 3), 32, 32, strength=2.0)
  assert q["factors"][:, 0].min() >= 0.0 and q["factors"][:, 0].max() <= 2.6
  assert np.abs(q["factors"][:, 3]).max() <= 0.4
  assert np.abs(q["factors"][:, 3]).max() > 0.35


def _monte_carlo_crop_areas(height, width, n, seed=0, min_scale=0.08):
  """Independent re-implementation of TF's crop sampler (numpy, vectorized).

  sample_distorted_bounding_box_op.cc: per attempt an aspect a ~ U[3/4, 4/3],
  a height uniform in the integers [rint(sqrt(min_area / a)), max height],
  width rint(h * a), rounding fixes, then the area-covered >= 0.1 test; after
  100 failed attempts the whole image. Returns (area fraction, aspect).
  """
  rng = np.random.default_rng(seed)
  total = float(height * width)
  min_area, max_area = np.float32(min_scale) * total, np.float32(1.0) * total
  area = np.full(n, total)
  aspect = np.full(n, width / height)
  pending = np.ones(n, bool)
  for _ in range(100):
    a = rng.uniform(3 / 4, 4 / 3, n)
    h = np.rint(np.sqrt(min_area / a))
    max_h = np.rint(np.sqrt(max_area / a))
    too_wide = np.rint(max_h * a) > width
    max_h = np.where(too_wide, np.floor((width + 0.5 - 1e-7) / a), max_h)
    max_h = np.where(too_wide & (np.rint(max_h * a) > width), max_h - 1, max_h)
    max_h = np.minimum(max_h, height)
    h = np.minimum(h, max_h)
    h = h + np.floor(rng.random(n) * (max_h - h + 1))
    w = np.rint(h * a)
    small = w * h < min_area
    h = np.where(small, h + 1, h)
    w = np.where(small, np.rint(h * a), w)
    big = w * h > max_area
    h = np.where(big, h - 1, h)
    w = np.where(big, np.rint(h * a), w)
    ok = (
      (w * h >= min_area)
      & (w * h <= max_area)
      & (w <= width)
      & (h <= height)
      & (w > 0)
      & (h > 0)
      & (w * h >= 0.1 * total)
    )
    take = pending & ok
    area[take] = w[take] * h[take]
    aspect[take] = w[take] / h[take]
    pending &= ~ok
  return area / total, aspect


def test_crop_geometry_matches_the_sampler_distribution():
  side = 200
  boxes = _crop_boxes(seed_rows(N_STATS, stream=12), [side, side, 3], 64, 64)
  oy, ox, h, w = boxes.T
  assert (oy >= 0).all() and (ox >= 0).all()
  assert (oy + h <= side).all() and (ox + w <= side).all()
  area = h * w / side**2
  aspect = w / h
  # min_object_covered=0.1 over the whole image makes 0.1 the real floor.
  assert area.min() >= 0.1 - 1e-9 and area.max() <= 1.0
  tolerance = 0.5 / h  # w = rint(h * a).
  assert (aspect >= 3 / 4 - tolerance).all()
  assert (aspect <= 4 / 3 + tolerance).all()
  ref_area, ref_aspect = _monte_carlo_crop_areas(side, side, 200_000)
  # The area is far from uniform on [0.08, 1] (median 0.54): the sampler
  # draws the height, not the area, uniformly.
  assert abs(np.median(area) - np.median(ref_area)) < 0.03
  assert abs(np.median(ref_area) - 0.54) > 0.05
  for ours, ref in ((area, ref_area), (aspect, ref_aspect)):
    _assert_same_distribution(ours, ref)


def _assert_same_distribution(ours, ref):
  """Kolmogorov-Smirnov two-sample test (ref large), alpha = 0.001."""
  grid = np.sort(ours)
  ecdf = np.arange(1, grid.size + 1) / grid.size
  ref_cdf = np.searchsorted(np.sort(ref), grid, side="right") / ref.size
  assert np.abs(ecdf - ref_cdf).max() < 1.95 / np.sqrt(grid.size)


@pytest.mark.parametrize("min_scale", [0.3, 0.6])
def test_min_scale_is_the_crop_area_floor(min_scale):
  # --min_scale replaces the reference's 0.08 as the sampler's smallest area; the
  # distribution must be the sampler's with that floor (independent NumPy sampler), and
  # differ from the default's.
  side = 200
  boxes = _crop_boxes(seed_rows(N_STATS, stream=13), [side, side, 3], 64, 64, min_scale=min_scale)
  area = boxes[:, 2] * boxes[:, 3] / side**2
  assert area.min() >= min_scale - 2 * side / side**2  # Rounding of h and w to pixels.
  ref_area, ref_aspect = _monte_carlo_crop_areas(side, side, 200_000, min_scale=min_scale)
  _assert_same_distribution(area, ref_area)
  _assert_same_distribution(boxes[:, 3] / boxes[:, 2], ref_aspect)
  default_area, _ = _monte_carlo_crop_areas(side, side, 200_000)
  assert np.median(area) - np.median(default_area) > 0.05


def test_min_scale_one_is_the_whole_image():
  boxes = _crop_boxes(seed_rows(200, stream=14), [28, 28, 3], 32, 32, min_scale=1.0)
  np.testing.assert_array_equal(boxes, np.tile([[0, 0, 28, 28]], [200, 1]))
  image = random_image((28, 28, 3), seed=5)
  views = _views(
    image,
    seed_rows(50),
    28,
    28,
    color_jitter_strength=0.0,
    use_blur=False,
    flip=False,
    min_scale=1.0,
  )
  np.testing.assert_allclose(views, np.broadcast_to(image / 255.0, views.shape), atol=1e-6)


def test_no_flip_changes_only_the_flip():
  # flip=False never mirrors, and every other draw of the view (crop, colour, blur) is the
  # one it would have had: the flip's coin is still drawn in its slot.
  seeds = seed_rows(500, stream=15)
  flipping = _params(seeds, (40, 48, 3), 32, 32)
  fixed = _params(seeds, (40, 48, 3), 32, 32, flip=False)
  assert flipping["flip"].any() and not fixed["flip"].any()
  for key in flipping:
    if key != "flip":
      np.testing.assert_array_equal(fixed[key], flipping[key], err_msg=key)
  ramp = np.broadcast_to(
    np.linspace(0.0, 1.0, 48, dtype=np.float32)[None, :, None], (40, 48, 3)
  ).copy()
  views = _views(ramp, seeds, 32, 32, color_jitter_strength=0.0, use_blur=False, flip=False)
  assert (views[:, :, 16:].mean(axis=(1, 2, 3)) > views[:, :, :16].mean(axis=(1, 2, 3))).all()
  # The split form (--augment_on_device) carries the same decision to the accelerator.
  crops, params = augment.crop_view(ramp, seeds[0], 32, 32, flip=False)
  assert not params["flip"].numpy()


@pytest.mark.parametrize("method", augment.INTERPOLATIONS)
def test_crop_box_is_the_crop_of_the_view(method):
  image = random_image((60, 90, 3), seed=4).astype(np.float32) / 255.0
  seeds = seed_rows(12, stream=13)
  for seed, (oy, ox, h, w) in zip(seeds, _crop_boxes(seeds, image.shape, 32, 32)):
    expected = tf.image.resize(image[None, oy : oy + h, ox : ox + w], [32, 32], method)[0]
    expected = np.clip(expected.numpy(), 0.0, 1.0)
    view = augment.simclr_augment(image, seed, 32, 32, 0.0, False, interpolation=method).numpy()
    if not np.array_equal(view, expected):
      np.testing.assert_array_equal(view, expected[:, ::-1])


# ----------------------------------------------------------------------------
# Ranges, dtypes, shapes.


@pytest.mark.parametrize(
  "source,height,width",
  [
    ((17, 23), 32, 32),
    ((50, 300), 40, 24),
    ((300, 50), 32, 48),
    ((120, 90), 112, 112),
    ((96, 200), 100, 130),
  ],
)
def test_views_are_float32_in_unit_range_for_uint8_and_float(source, height, width):
  image = random_image(source + (3,), seed=5)
  seeds = seed_rows(32, stream=14)
  from_uint8 = _views(image, seeds, height, width)
  from_float = _views(image.astype(np.float32) / 255.0, seeds, height, width)
  for views in (from_uint8, from_float):
    assert views.dtype == np.float32
    assert views.shape == (32, height, width, 3)
    assert np.isfinite(views).all()
    assert views.min() >= 0.0 and views.max() <= 1.0
  # uint8 means [0, 255]: the same views as the float image / 255.
  np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)
  # Something happened: views vary.
  assert from_uint8.std(axis=0).mean() > 0.05
  # A float64 image works too.
  view = augment.simclr_augment(image / 255.0, seeds[0], height, width)
  assert view.dtype == tf.float32


def test_zero_strength_turns_jitter_and_grayscale_off():
  colour = np.array([0.8, 0.3, 0.1], np.float32)
  image = np.broadcast_to(colour, (40, 40, 3)).copy()
  seeds = seed_rows(300, stream=15)
  views = _views(image, seeds, 32, 32, color_jitter_strength=0.0, use_blur=False)
  np.testing.assert_allclose(views, np.broadcast_to(colour, views.shape), atol=1e-5)
  # The blur (zero padding) darkens borders but keeps the hue.
  views = _views(image, seeds, 32, 32, color_jitter_strength=0.0)
  np.testing.assert_allclose(views[..., 0] * colour[1], views[..., 1] * colour[0], atol=1e-5)
  np.testing.assert_allclose(views[..., 1] * colour[2], views[..., 2] * colour[1], atol=1e-5)
  # At strength 1 the same image loses its hue (gray or jittered) mostly.
  views = _views(image, seeds, 32, 32, use_blur=False)
  kept = np.all(np.abs(views - colour) < 1e-4, axis=(1, 2, 3))
  assert kept.mean() < 0.3


# ----------------------------------------------------------------------------
# Ops against TF's kernels and the reference's formulas.


def test_planar_colour_ops_match_tf_image_kernels():
  rng = np.random.default_rng(6)
  x = rng.random((6, 24, 20, 3)).astype(np.float32)
  x = np.concatenate(
    [
      x,
      np.repeat(rng.random((2, 24, 20, 1)), 3, -1).astype(np.float32),  # Gray.
      np.round(x[:2] * 4) / 4,  # Ties between channels.
      np.zeros((1, 24, 20, 3), np.float32),
      np.ones((1, 24, 20, 3), np.float32),
    ]
  )
  planes = tf.transpose(x, [0, 3, 1, 2])
  back = lambda p: tf.transpose(p, [0, 2, 3, 1]).numpy()
  for factor in (0.2, 0.7, 1.0, 1.8):
    np.testing.assert_allclose(
      back(image_ops.saturation(planes, factor)), tf.image.adjust_saturation(x, factor), atol=2e-6
    )
    np.testing.assert_allclose(
      back(image_ops.contrast(planes, factor)), tf.image.adjust_contrast(x, factor), atol=2e-6
    )
  for delta in (-0.5, -0.2, -0.01, 0.0, 0.1, 0.2, 0.5):
    np.testing.assert_allclose(
      back(image_ops.hue(planes, delta)), tf.image.adjust_hue(x, delta), atol=2e-6
    )
  gray = tf.image.rgb_to_grayscale(x)
  np.testing.assert_allclose(
    back(image_ops.grayscale(planes)), tf.concat([gray] * 3, -1), atol=1e-6
  )


@pytest.mark.parametrize("height", [64, 112])
def test_blur_kernel_is_the_reference_gaussian(height):
  radius = image_ops.blur_radius(height)
  assert radius == (height // 10) // 2  # 10% of the side, 2 r + 1 taps.
  sigma = 1.3
  taps = np.arange(-radius, radius + 1)
  kernel = np.exp(-(taps**2) / (2 * sigma**2))
  kernel /= kernel.sum()
  impulse = np.zeros((1, 3, height, height), np.float32)
  impulse[0, :, 20, 30] = 1.0
  out = image_ops.blur(tf.constant(impulse), tf.constant([sigma]), radius)
  expected = np.zeros((height, height))
  expected[20 - radius : 21 + radius, 30 - radius : 31 + radius] = np.outer(kernel, kernel)
  for c in range(3):
    np.testing.assert_allclose(out[0, c], expected, atol=1e-6)
  # Zero padding ('SAME', as the reference): a constant image darkens at the
  # border by the kernel mass that falls outside.
  ones = image_ops.blur(tf.ones((1, 3, height, height)), tf.constant([sigma]), radius)
  np.testing.assert_allclose(ones[0, 0, 0, height // 2], kernel[radius:].sum(), atol=1e-6)


# ----------------------------------------------------------------------------
# Split form (--augment_on_device).


@pytest.mark.parametrize("source,size", [((32, 32), 16), ((32, 32), 32), ((150, 130), 112)])
def test_split_form_equals_per_image_form(source, size):
  # Host crop in tf.data, distortion of the batch in a tf.function: the
  # --augment_on_device path must produce the views of the host path.
  batch = 24
  images = tf.constant(random_image((batch,) + source + (3,), seed=10))
  seeds = seed_rows(batch, stream=18)
  for kwargs in ({}, {"color_jitter_strength": 0.5, "use_blur": False}):
    strength = kwargs.get("color_jitter_strength", 1.0)
    ds = tf.data.Dataset.range(batch).map(
      lambda i: augment.crop_view(images[i], seeds[i], size, size, strength)
    )
    crops, params = next(iter(ds.batch(batch)))
    assert not params["flip"].numpy().all() and params["flip"].numpy().any()
    split = tf.function(augment.distort_batch)(crops, params, **kwargs).numpy()
    per_image = map_over(
      lambda i: augment.simclr_augment(images[i], seeds[i], size, size, **kwargs), tf.range(batch)
    )
    assert split.shape == (batch, size, size, 3)
    assert np.abs(split - per_image).max() < 1e-4


@pytest.mark.parametrize("method", augment.INTERPOLATIONS)
def test_crop_resize_is_tf_resize_of_the_crop(method):
  # crop_resize against TF's own kernel on the sliced crop: down- and upsampling, boxes of one
  # row or column, at the image's edges, inside padding (never read).
  rng = np.random.default_rng(5)
  cases = 0
  for _ in range(30):
    h_img, w_img = (int(v) for v in rng.integers(1, 50, 2))
    image = rng.integers(0, 256, (h_img, w_img, 3)).astype(np.uint8)
    h, w = int(rng.integers(1, h_img + 1)), int(rng.integers(1, w_img + 1))
    y, x = int(rng.integers(0, h_img - h + 1)), int(rng.integers(0, w_img - w + 1))
    out_h, out_w = (int(v) for v in rng.integers(1, 70, 2))
    crop = tf.cast(image[y : y + h, x : x + w], tf.float32) * (1.0 / 255.0)
    want = tf.image.resize(crop[None], [out_h, out_w], method=method)[0]
    want = np.clip(want.numpy(), 0.0, 1.0)
    canvas = np.zeros((h_img + 3, w_img + 5, 3), np.uint8)
    canvas[:h_img, :w_img] = image
    canvas[h_img:] = 255  # padding that must not leak into the view
    got = crop_resize.crop_resize(canvas[None], [[y, x, 0]], [[h, w, -1]], out_h, out_w, method)[0]
    np.testing.assert_array_equal(got.numpy(), want)
    cases += (h < out_h) + 2 * (w > out_w)
  assert cases > 20  # both up- and downsampling occurred


@pytest.mark.parametrize("jit,method", [(False, "bicubic"), (True, "bicubic"), (False, "bilinear")])
def test_crop_on_the_accelerator_equals_the_host_crop(jit, method):
  # --augment_on_device off a TPU: box_params on the host draws what crop_view draws, and
  # crop_batch on a zero-padded batch of different-size images gives crop_view's crops.
  shapes = [(40, 30), (17, 64), (224, 150), (9, 9), (64, 64), (50, 120)]
  images = [random_image(s + (3,), seed=i) for i, s in enumerate(shapes)]
  seeds = seed_rows(len(images), stream=23)
  size = 32
  canvas = np.zeros((len(images), 224, 150, 3), np.uint8)
  for i, im in enumerate(images):
    canvas[i, : im.shape[0], : im.shape[1]] = im
  host = [
    augment.crop_view(im, seed, size, size, interpolation=method) for im, seed in zip(images, seeds)
  ]
  boxes = [augment.box_params(im.shape, seed, size, size) for im, seed in zip(images, seeds)]
  for (_, p), b in zip(host, boxes):
    for key in p:
      np.testing.assert_array_equal(p[key], b[key], err_msg=key)
  params = {k: tf.stack([b[k] for b in boxes]) for k in augment.BOX_SIGNATURE}
  crop = tf.function(augment.crop_batch, jit_compile=jit)
  got = crop(canvas, params, size, size, method).numpy()
  want = np.stack([c.numpy() for c, _ in host])
  assert np.abs(got - want).max() < 2e-6  # float rounding: graph rewrites may fuse mul-adds
  assert np.abs(want - want[::-1]).max() > 0.1  # different crops


def test_small_view_fused_path_equals_the_xla_path(monkeypatch):
  # Views up to 96x96 use TF's fused interleaved kernels, larger ones the planar ops under XLA:
  # forcing the XLA path on a small view must give the same views up to float rounding.
  image = random_image((72, 90, 3), seed=9)
  seeds = seed_rows(16, stream=17)
  fused = _views(image, seeds, 64, 64)
  monkeypatch.setattr(augment, "_MAX_FUSED_PIXELS", 0)
  compiled = _views(image, seeds, 64, 64)
  assert np.abs(fused - compiled).max() < 1e-5
  assert np.abs(fused - fused[::-1]).max() > 0.1  # The seeds gave different views.


def test_blur_shifted_sums_equal_the_convolution():
  # simclr_augment's XLA path blurs with shifted sums, distort_batch with depthwise convolutions
  # above radius 4: the same zero-padded separable Gaussian, one sigma per image.
  x = tf.constant(random_image((2, 3, 40, 44), seed=9) / 255.0, tf.float32)
  sigma = tf.constant([0.4, 1.7])
  radius = image_ops.blur_radius(112)
  assert radius > image_ops.MAX_SHIFT_BLUR_RADIUS
  conv = image_ops.blur(x, sigma, radius).numpy()
  shifted = image_ops.blur(x, sigma, radius, shifts=True).numpy()
  np.testing.assert_allclose(shifted, conv, atol=2e-6)
  assert np.abs(conv - x.numpy()).max() > 0.05  # The blur did something.


# ----------------------------------------------------------------------------
# Evaluation.


def _coordinate_image(height, width):
  """float32 [H, W, 3]: channel 0 = y / 512, channel 1 = x / 512 (exact)."""
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.stack([y / 512.0, x / 512.0, np.full(y.shape, 0.5)], -1).astype(np.float32)


def test_preprocess_eval_centre_crop_exact():
  # 256 -> 224: crop rint(0.875 * 256) = 224 at offset (256 - 224 + 1) // 2.
  image = _coordinate_image(256, 256)
  out = augment.preprocess_eval(image, 224, 224).numpy()
  np.testing.assert_array_equal(out, image[16:240, 16:240])


@pytest.mark.parametrize(
  "source,height,width,crop",
  [
    # Square output of a wide image: 0.875 of the height, square.
    ((300, 400), 224, 224, (19, 69, 262, 262)),
    # Output wider than the image aspect: 0.875 of the width.
    ((100, 100), 64, 96, (21, 6, 58, 88)),
  ],
)
def test_preprocess_eval_centre_crop_geometry(source, height, width, crop):
  oy, ox, ch, cw = crop
  out = augment.preprocess_eval(_coordinate_image(*source), height, width).numpy()
  assert out.shape == (height, width, 3) and out.dtype == np.float32
  # Bicubic reproduces a linear ramp away from the borders: output pixel i
  # samples the crop at (i + 0.5) * ch / height - 0.5.
  i = np.arange(height)
  j = np.arange(width)
  y = (oy + (i + 0.5) * ch / height - 0.5) / 512.0
  x = (ox + (j + 0.5) * cw / width - 0.5) / 512.0
  inner = slice(3, -3)
  np.testing.assert_allclose(
    out[inner, inner, 0], np.broadcast_to(y[inner, None], out[inner, inner, 0].shape), atol=2e-6
  )
  np.testing.assert_allclose(
    out[inner, inner, 1], np.broadcast_to(x[None, inner], out[inner, inner, 1].shape), atol=2e-6
  )


def test_preprocess_eval_small_images():
  image = random_image((32, 32, 3), seed=10)
  out = augment.preprocess_eval(image, 32, 32).numpy()
  np.testing.assert_array_equal(out, image.astype(np.float32) * (1.0 / 255.0))
  # Below 33 px no centre crop: a plain resize of the whole image.
  image = random_image((40, 36, 3), seed=11).astype(np.float32) / 255.0
  out = augment.preprocess_eval(image, 32, 32).numpy()
  expected = np.clip(tf.image.resize(image[None], [32, 32], "bicubic")[0], 0.0, 1.0)
  np.testing.assert_array_equal(out, expected)


# ----------------------------------------------------------------------------
# Argument validation.


def test_bad_arguments_raise_clear_errors():
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="seed"):
    augment.simclr_augment(image, [1, 2, 3], 8, 8)
  with pytest.raises(TypeError, match="seed"):
    augment.simclr_augment(image, [1.0, 2.0], 8, 8)
  with pytest.raises(ValueError, match="channels"):
    augment.simclr_augment(np.zeros((8, 8, 4), np.uint8), [1, 2], 8, 8)
  with pytest.raises(TypeError, match="uint8 or float"):
    augment.simclr_augment(np.zeros((8, 8, 3), np.int32), [1, 2], 8, 8)
  with pytest.raises(ValueError, match="color_jitter_strength"):
    augment.simclr_augment(image, [1, 2], 8, 8, color_jitter_strength=-1.0)
  with pytest.raises(ValueError, match="height"):
    augment.simclr_augment(image, [1, 2], 0, 8)
  for bad in (0.0, 1.5, float("nan")):
    with pytest.raises(ValueError, match="min_scale"):
      augment.simclr_augment(image, [1, 2], 8, 8, min_scale=bad)
  with pytest.raises(ValueError, match=r"crops must have rank 4"):
    augment.distort_batch(image, {})
