"""deadleaves10_color: deadleaves10's images, each in its own palette, unrelated to the class."""

import colorsys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tf_simclr.data import deadleaves10
from tf_simclr.data import deadleaves10_color
from tf_simclr.data import sources


@pytest.fixture(scope="module")
def test_split():
  """deadleaves10_color's and deadleaves10's test split: (colour images, grey images, labels)."""
  images, labels = deadleaves10_color.generate("test")
  grey, grey_labels = deadleaves10.generate("test")
  np.testing.assert_array_equal(labels, grey_labels)
  return images, grey, labels


def test_pure_hue_is_hsv_at_full_saturation_and_value():
  hues = np.linspace(0.0, 1.0, 97, endpoint=False)
  expected = np.array([colorsys.hsv_to_rgb(h, 1.0, 1.0) for h in hues])
  np.testing.assert_allclose(deadleaves10_color.pure_hue(hues), expected, atol=1e-12)


def _hsv(images):
  """(hue [N], saturation [N], value [N, H, W]) of tinted images, read back with colorsys."""
  pixels = images.reshape(len(images), -1, 3).astype(np.float64) / 255.0
  brightest = pixels[np.arange(len(images)), pixels.max(axis=2).argmax(axis=1)]  # [N, 3]
  hs = np.array([colorsys.rgb_to_hsv(*p)[:2] for p in brightest])
  return hs[:, 0], hs[:, 1], images.max(axis=3)


def test_same_grey_images_and_labels_as_deadleaves10_one_palette_per_image(test_split):
  images, grey, _ = test_split
  hue, saturation, value = _hsv(images)
  # HSV's value is the grey image (rounding: 1 level).
  assert np.abs(value.astype(int) - grey[..., 0].astype(int)).max() <= 1
  assert saturation.min() > deadleaves10_color.MIN_SATURATION - 0.02
  # One hue per image: every bright-enough pixel (value > 0.3, saturation well resolved) has it.
  px = images.reshape(len(images), -1, 3).astype(np.float64) / 255.0
  for i in range(0, len(images), 97):
    bright = px[i][px[i].max(axis=1) > 0.3]
    hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in bright])
    gap = np.abs(hues - hue[i])
    assert np.minimum(gap, 1.0 - gap).max() < 0.03, i
  # Palettes differ between images (a shared tint would not tell images apart).
  assert len(np.unique(np.round(hue, 2))) > 90


def test_hue_carries_no_class_information(test_split):
  """Each class's mean hue vector (cos, sin of 2 pi hue) is ~N(0, 1/(2n)) per component when the
  hue is independent of the class; a class-dependent hue (hue = class / 10) puts it near 1."""
  images, _, labels = test_split
  hue = _hsv(images)[0]
  angle = 2.0 * np.pi * hue
  for c in range(deadleaves10_color.deadleaves10.NUM_CLASSES):
    k = labels == c
    mean = np.array([np.cos(angle[k]).mean(), np.sin(angle[k]).mean()])
    assert np.abs(mean).max() < 5.0 / np.sqrt(2.0 * k.sum()), (c, mean)


def test_a_built_in_dataset_registered_with_tfds(test_split, tmp_path):
  """Registered and described like deadleaves10 (whose TFDS build test covers the shared
  builder); preparing it would render 6,000 images again."""
  assert "deadleaves10_color" in sources.BUILT_IN
  builder = tfds.builder("deadleaves10_color", data_dir=str(tmp_path))
  assert builder.info.features["label"].names == list(deadleaves10.CLASS_NAMES)
  assert builder.info.features["image"].shape == (32, 32, 3)
  np.testing.assert_array_equal(builder.generate("test")[0][:5], test_split[0][:5])
