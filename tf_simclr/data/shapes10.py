"""shapes10: a built-in 10-class image dataset that needs no download.

Each 32x32 RGB image shows one filled shape (the class) in a random colour, size, position and
small rotation, over a random background colour with a mild linear gradient and pixel noise.
Colour is a nuisance variable: it is drawn independently of the class, so a model has to look at
shape to classify. It is what a laptop or CI can pretrain and evaluate on in minutes.

Generation is pure NumPy with a fixed seed per split, so every machine builds the same images
(bit for bit), in about a second. Edges are antialiased from each shape's signed distance.
5,000 'train' and 1,000 'test' examples, exactly class-balanced, in a seeded random class order.

`Shapes10` is a TFDS builder (`offline_builder.OfflineBuilder`) registered as 'shapes10' when
this module is imported: `tfds.builder('shapes10', data_dir=...).download_and_prepare()` writes it
like any other TFDS dataset (default `~/tensorflow_datasets/shapes10/1.0.0/`). `sources` imports
it (so that it is registered); `deadleaves10` draws its leaves with `shape_distance`.
"""

from __future__ import annotations

import numpy as np

from tf_simclr.data import offline_builder

CLASS_NAMES = (
  "circle",
  "square",
  "triangle",
  "plus",
  "ring",
  "star",
  "diamond",
  "horizontal_bar",
  "crescent",
  "x_cross",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = offline_builder.IMAGE_SIZE
SPLIT_SIZES = offline_builder.SPLIT_SIZES
# One fixed generator seed per split, so the splits are different images.
_SPLIT_SEEDS = {"train": 0, "test": 1}
_MIN_COLOUR_DISTANCE = 100.0  # Euclidean RGB distance between shape and background colour.

# Pixel centre coordinates, shape [32] (shared by x and y).
_PIX = np.arange(IMAGE_SIZE, dtype=np.float64) + 0.5


def _box(p, q, half_width, half_height):
  """Signed distance (approximate at corners) to an axis-aligned box; < 0 inside."""
  return np.maximum(np.abs(p) - half_width, np.abs(q) - half_height)


def _convex_polygon(p, q, vertices):
  """Signed distance (approximate at corners) to a convex polygon; < 0 inside.

  `vertices` [k, 2] go clockwise on screen (q points down), e.g. top, lower right, lower left.
  """
  d = np.full(p.shape, -np.inf, p.dtype)
  k = len(vertices)
  for i in range(k):
    (x0, y0), (x1, y1) = vertices[i], vertices[(i + 1) % k]
    ex, ey = x1 - x0, y1 - y0
    d = np.maximum(d, ((p - x0) * ey - (q - y0) * ex) / np.hypot(ex, ey))
  return d


def _star(p, q, inner=0.45, points=5):
  """Signed distance (approximate) to a star with straight edges, outer radius 1, a point up."""
  r = np.hypot(p, q)
  sector = 2 * np.pi / points
  a = np.mod(np.arctan2(q, p) + np.pi / 2, sector)  # 0 at an outer point (the top one: -q).
  a = np.minimum(a, sector - a)  # Fold onto [0, sector/2]: from a point to an inner corner.
  x, y = r * np.cos(a), r * np.sin(a)
  ex, ey = inner * np.cos(sector / 2) - 1.0, inner * np.sin(sector / 2)
  # Distance to the edge line from the point (1, 0) to the inner corner; the origin is inside.
  return -(ex * y - ey * (x - 1.0)) / np.hypot(ex, ey)


_TRIANGLE = np.array([(0.0, -1.0), (0.866, 0.5), (-0.866, 0.5)])  # Apex up.


def shape_distance(label, p, q):
  """Signed distance to shape `label` in normalised coordinates (size 1, q down); < 0 inside."""
  if label == 0:  # circle
    return np.hypot(p, q) - 1.0
  if label == 1:  # square
    return _box(p, q, 0.8, 0.8)
  if label == 2:  # triangle, apex up, centred on its bounding box
    return _convex_polygon(p, q + 0.25, _TRIANGLE)
  if label == 3:  # plus
    return np.minimum(_box(p, q, 0.3, 1.0), _box(p, q, 1.0, 0.3))
  if label == 4:  # ring
    return np.abs(np.hypot(p, q) - 0.775) - 0.225
  if label == 5:  # star
    return _star(p, q)
  if label == 6:  # diamond
    return (np.abs(p) + np.abs(q) - 1.0) / np.sqrt(2.0)
  if label == 7:  # horizontal bar
    return _box(p, q, 1.0, 0.3)
  if label == 8:  # crescent: a disc minus a shifted disc, opening to the right
    return np.maximum(np.hypot(p, q) - 1.0, 0.75 - np.hypot(p - 0.45, q))
  if label == 9:  # x cross: the plus turned by 45 degrees
    u, v = (p + q) / np.sqrt(2.0), (p - q) / np.sqrt(2.0)
    return np.minimum(_box(u, v, 0.3, 1.0), _box(u, v, 1.0, 0.3))
  raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")


def _render(labels, rng):
  """Images of the given classes: uint8 [N, 32, 32, 3] for labels int [N].

  All random parameters are drawn first, in a fixed order, then shapes are rendered class by
  class, vectorised: the result depends only on the generator's state. Edges are antialiased
  from the signed distance: a pixel's coverage is clip(0.5 - distance_in_pixels, 0, 1).
  """
  n = len(labels)
  radius = rng.uniform(7.0, 12.5, size=n)  # In pixels.
  # Keep the centre far enough in that at most a sliver of the shape is cut off.
  centre = rng.uniform(0.9 * radius[:, None], IMAGE_SIZE - 0.9 * radius[:, None], size=(n, 2))
  theta = np.deg2rad(rng.uniform(-15.0, 15.0, size=n))
  background = rng.uniform(0.0, 255.0, size=(n, 3))
  foreground = rng.uniform(0.0, 255.0, size=(n, 3))
  # Redraw the shape colour where it is too close to the background (rejection sampling).
  close = np.linalg.norm(foreground - background, axis=1) < _MIN_COLOUR_DISTANCE
  while close.any():
    foreground[close] = rng.uniform(0.0, 255.0, size=(int(close.sum()), 3))
    close = np.linalg.norm(foreground - background, axis=1) < _MIN_COLOUR_DISTANCE
  gradient = rng.uniform(-20.0, 20.0, size=(n, 2, 3))  # Per-channel change across the image.
  noise_std = rng.uniform(2.0, 8.0, size=n)
  noise = rng.standard_normal((n, IMAGE_SIZE, IMAGE_SIZE, 3)) * noise_std[:, None, None, None]

  alpha = np.empty((n, IMAGE_SIZE, IMAGE_SIZE), np.float64)
  for label in range(NUM_CLASSES):
    k = np.flatnonzero(labels == label)
    r = radius[k, None, None]
    c, s = np.cos(theta[k])[:, None, None], np.sin(theta[k])[:, None, None]
    dx = _PIX[None, None, :] - centre[k, 0, None, None]  # [k, 1, 32]
    dy = _PIX[None, :, None] - centre[k, 1, None, None]  # [k, 32, 1]
    p, q = (dx * c + dy * s) / r, (-dx * s + dy * c) / r  # [k, 32, 32]
    alpha[k] = np.clip(0.5 - shape_distance(label, p, q) * r, 0.0, 1.0)

  alpha = alpha[..., None]
  gx = (_PIX[None, None, :, None] / IMAGE_SIZE - 0.5) * gradient[:, None, None, 0]
  gy = (_PIX[None, :, None, None] / IMAGE_SIZE - 0.5) * gradient[:, None, None, 1]
  back = background[:, None, None] + gx + gy
  image = (1.0 - alpha) * back + alpha * foreground[:, None, None] + noise
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def generate(split):
  """All images of a split: (images uint8 [N, 32, 32, 3], labels int64 [N]), N / 10 per class."""
  return offline_builder.balanced_split("shapes10", split, _SPLIT_SEEDS, NUM_CLASSES, _render)


class Shapes10(offline_builder.OfflineBuilder):
  """TFDS builder of shapes10 (registered as 'shapes10')."""

  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = (
    "shapes10: 32x32 RGB images of 10 shapes (" + ", ".join(CLASS_NAMES) + ") in random "
    "colours, sizes, positions and small rotations over random backgrounds with a gradient "
    "and noise. Built offline and deterministically by tf_simclr; the class is the shape, "
    "colour is a nuisance."
  )
  generate = staticmethod(generate)
