"""Tests of benchmarks.batched_augment, the batched form the augmentation benchmark times.

It must make the views of `tf_simclr.augment.simclr_augment`, else the benchmark compares
unlike work.
"""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import batched_augment
from runs import map_over
from runs import random_image
from runs import seed_rows
from tf_simclr import augment


def test_batched_resize_is_tf_bicubic_of_the_crop():
  rng = np.random.default_rng(7)
  images = rng.random((1, 50, 70, 3)).astype(np.float32)
  worst = 0.0
  for _ in range(60):
    h, w = rng.integers(1, 51), rng.integers(1, 71)
    y, x = rng.integers(0, 51 - h), rng.integers(0, 71 - w)
    out_h, out_w = (int(v) for v in rng.choice([5, 32, 33, 64, 97], 2))
    flip = bool(rng.integers(2))
    expected = tf.image.resize(images[:, y : y + h, x : x + w], [out_h, out_w], "bicubic")[
      0
    ].numpy()
    if flip:
      expected = expected[:, ::-1]
    got = batched_augment.crop_resize(
      images, tf.constant([[y, x, h, w]]), tf.constant([flip]), out_h, out_w
    )
    worst = max(worst, np.abs(np.transpose(got[0], [1, 2, 0]) - expected).max())
  assert worst < 1e-6


@pytest.mark.parametrize(
  "source,size,batch", [((32, 32), 32, 64), ((72, 90), 64, 32), ((128, 160), 112, 12)]
)
def test_batched_form_equals_per_image_form(source, size, batch):
  images = random_image((batch,) + source + (3,), seed=8)
  seeds = seed_rows(batch, stream=16)
  fn = tf.function(batched_augment.simclr_augment_batch)
  for kwargs, as_float in (
    ({}, False),
    ({}, True),
    ({"color_jitter_strength": 0.5, "use_blur": False}, False),
  ):
    x = images.astype(np.float32) / 255.0 if as_float else images
    x = tf.constant(x)
    batched = fn(x, seeds, size, size, **kwargs).numpy()
    per_image = map_over(
      lambda i: augment.simclr_augment(x[i], seeds[i], size, size, **kwargs), tf.range(batch)
    )
    assert batched.shape == (batch, size, size, 3)
    assert np.abs(batched - per_image).max() < 1e-4


def test_bad_seeds_are_refused():
  images = np.zeros((1, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"seed must have shape \[B, 2\]"):
    batched_augment.simclr_augment_batch(images, [1, 2], 8, 8)
