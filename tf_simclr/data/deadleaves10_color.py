"""deadleaves10_color: deadleaves10 with a random colour palette per image, unrelated to its class.

Each image is deadleaves10's grey image of the same index, tinted with a hue and saturation drawn
for that image alone: RGB = v * (1 - s + s * pure(hue)), v the grey level in [0, 1] (HSV with the
grey image as value). Two crops of one image therefore share a colour histogram, which tells
images apart but says nothing about the class (the hue is drawn independently of the label).
This is the shortcut of the SimCLR paper's Figure 6 made exact: without colour distortion,
contrastive learning can match two views by colour alone. The study (`python -m
benchmarks.study --only=composition`, docs/study.md) pretrains on it with and without colour
distortion; deadleaves10 itself stays grey so that the quick start does not meet the shortcut.

The palettes are drawn with their own seed per split, after deadleaves10's split is generated:
the grey structure, labels and order equal deadleaves10's. `Deadleaves10Color` is a TFDS builder
registered as 'deadleaves10_color' when this module is imported (`sources` imports it); the study's
plots (`benchmarks.study_plots`) draw its images.
"""

from __future__ import annotations

import numpy as np

from tf_simclr.data import deadleaves10
from tf_simclr.data import offline_builder

CLASS_NAMES = deadleaves10.CLASS_NAMES
_PALETTE_SEEDS = {"train": 20, "test": 21}
MIN_SATURATION = 0.5  # every image clearly coloured, so colour always identifies it


def pure_hue(hue: np.ndarray) -> np.ndarray:
  """The fully saturated colour of each hue: float [..., 3] (max 1) for hue [...] in [0, 1).

  The HSV-to-RGB formula at saturation and value 1: red at 0, green at 1/3, blue at 2/3.
  """
  k = (np.asarray(hue)[..., None] * 6.0 + np.array([5.0, 3.0, 1.0])) % 6.0
  return 1.0 - np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def tint(grey: np.ndarray, hue: np.ndarray, saturation: np.ndarray) -> np.ndarray:
  """Colours grey images: uint8 [N, H, W, 3] from grey uint8 [N, H, W, 3] (R = G = B), hue [N],
  saturation [N] in [0, 1].
  """
  v = grey[..., :1].astype(np.float32) / 255.0  # [N, H, W, 1]
  s = saturation.astype(np.float32)[:, None, None, None]
  colour = pure_hue(hue).astype(np.float32)[:, None, None, :]  # [N, 1, 1, 3]
  rgb = v * (1.0 - s + s * colour)
  return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def generate(split: str):
  """All images of a split: (images uint8 [N, 32, 32, 3], labels int64 [N]) in deadleaves10's
  order."""
  grey, labels = deadleaves10.generate(split)
  rng = np.random.default_rng(_PALETTE_SEEDS[split])
  hue = rng.uniform(0.0, 1.0, size=len(labels))
  saturation = rng.uniform(MIN_SATURATION, 1.0, size=len(labels))
  return tint(grey, hue, saturation), labels


class Deadleaves10Color(offline_builder.OfflineBuilder):
  """TFDS builder of deadleaves10_color (registered as 'deadleaves10_color')."""

  CLASS_NAMES = CLASS_NAMES
  DESCRIPTION = (
    "deadleaves10_color: deadleaves10's 32x32 dead-leaves images, each tinted with its own "
    "random hue and saturation, drawn independently of the class: colour tells images apart "
    "but not classes. Built offline and deterministically by tf_simclr."
  )
  generate = staticmethod(generate)
