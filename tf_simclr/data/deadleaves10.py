"""deadleaves10: a built-in 10-class dataset that SimCLR learns on a CPU in minutes.

Each 32x32 image is a class-conditional "dead leaves" picture: LEAVES overlapping leaves, all of
the class's shape family (the ten shapes of shapes10), of random size (a power law: small leaves
more common than large ones), position, small rotation and grey level, painted back to front
over a random grey background, with a little pixel noise. Leaves fill the image, so every crop
of it shows several leaves of its class; the arrangement of leaves and their grey levels is the
detail two crops of one image share, and what tells its instances apart. The images are grey
(stored as RGB): colour carries nothing, so colour jitter removes no class information. (With
coloured leaves, SimCLR matched views by colour and learnt shape far more slowly:
docs/quickstart_design.md.)
Dead leaves are a known pretraining signal for contrastive methods (Baradad et al., "Learning
to See by Looking at Noise", NeurIPS 2021); this is a class-conditional version of them.

Generation is NumPy with a fixed seed per split: every machine builds the same images, in a few
seconds. Edges are antialiased from each leaf's signed distance and leaves are composited with
the `over` operator. 5,000 'train' and 1,000 'test' examples, exactly class-balanced, in a seeded
random class order. `Deadleaves10` is a TFDS builder (`offline_builder.OfflineBuilder`) registered
as 'deadleaves10' when this module is imported, prepared like any TFDS dataset
(`~/tensorflow_datasets/deadleaves10/1.0.0/`). `sources` imports it (so that it is registered);
`deadleaves10_color` tints its images.
"""

from __future__ import annotations

import numpy as np

from tf_simclr.data import offline_builder
from tf_simclr.data import shapes10

CLASS_NAMES = shapes10.CLASS_NAMES
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = offline_builder.IMAGE_SIZE
SPLIT_SIZES = offline_builder.SPLIT_SIZES
_SPLIT_SEEDS = {"train": 10, "test": 11}  # not shapes10's, so no draw is shared with it
LEAVES = 48
# Leaf radius in pixels: density proportional to r^-2 on [R_MIN, R_MAX].
R_MIN, R_MAX = 3.0, 9.0
MAX_ROTATION_DEG = 20.0  # small, so that square/diamond and plus/x stay different classes
NOISE_STD = 3.0

_PIX = (np.arange(IMAGE_SIZE) + 0.5).astype(np.float32)  # pixel centres


def _radii(rng, shape):
  """Radii with density ~ r^-2 on [R_MIN, R_MAX], by inverting the CDF of u in [0, 1)."""
  u = rng.uniform(size=shape)
  return 1.0 / (1.0 / R_MIN - u * (1.0 / R_MIN - 1.0 / R_MAX))


def _render(labels, rng):
  """Images of the given classes: uint8 [N, 32, 32, 3] (grey: R = G = B) for labels int [N].

  Every random parameter is drawn first, in a fixed order, so the result depends only on the
  generator's state. Leaves are composited back to front in premultiplied form (grey value times
  coverage, and coverage), then over the background: the same as painting them one by one.
  """
  n = len(labels)
  radius = _radii(rng, (n, LEAVES)).astype(np.float32)
  centre = rng.uniform(-2.0, IMAGE_SIZE + 2.0, size=(n, LEAVES, 2)).astype(np.float32)
  theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=(n, LEAVES)))
  cos, sin = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
  grey = rng.uniform(0.0, 255.0, size=(n, LEAVES)).astype(np.float32)
  background = rng.uniform(0.0, 255.0, size=(n, 1)).astype(np.float32)
  noise = rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32) * NOISE_STD

  value = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)  # premultiplied grey
  cover = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), np.float32)
  for label in range(NUM_CLASSES):
    k = np.flatnonzero(labels == label)
    v, a = value[k], cover[k]
    for j in range(LEAVES):  # back to front
      r = radius[k, j, None, None]
      c, s = cos[k, j, None, None], sin[k, j, None, None]
      dx = _PIX[None, None, :] - centre[k, j, 0, None, None]  # [k, 1, 32]
      dy = _PIX[None, :, None] - centre[k, j, 1, None, None]  # [k, 32, 1]
      p, q = (dx * c + dy * s) / r, (-dx * s + dy * c) / r  # [k, 32, 32]
      alpha = np.clip(0.5 - shapes10.shape_distance(label, p, q) * r, 0.0, 1.0)
      v += alpha * (grey[k, j, None, None] - v)
      a += alpha * (1.0 - a)
    value[k], cover[k] = v, a
  image = value + (1.0 - cover) * background[:, :, None] + noise  # [n, 32, 32]
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  return np.repeat(image[..., None], 3, axis=-1)


def generate(split):
  """All images of a split: (images uint8 [N, 32, 32, 3], labels int64 [N]), N / 10 per class."""
  return offline_builder.balanced_split("deadleaves10", split, _SPLIT_SEEDS, NUM_CLASSES, _render)


class Deadleaves10(offline_builder.OfflineBuilder):
  """TFDS builder of deadleaves10 (registered as 'deadleaves10')."""

  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = (
    "deadleaves10: 32x32 grey (RGB) class-conditional dead-leaves images: many overlapping "
    "leaves of one shape family (" + ", ".join(CLASS_NAMES) + ") of random size, position, "
    "small rotation and grey level over a grey background. Built offline and "
    "deterministically by tf_simclr; the class is the leaves' shape."
  )
  generate = staticmethod(generate)
