"""Grey patches of real photographs and textures as an image folder (docs/small_images.md).

  pip install scikit-image       # ships the photographs; not a tf_simclr dependency
  python -m benchmarks.real_textures --out=data/textures10

Ten photographs and textures that scikit-image ships; each image is a 32 px grey patch of 40-96
px cut at a random place and scale (seed 0), its class the photograph it comes from: 400
training patches per class from the left 55% of each photograph, 100 test patches from the right
45%, so that no test patch overlaps a training one. Prints the raw pixels' figures as JSON
(`benchmarks.real_digits.pixel_baselines`).
"""

import sys

import numpy as np

from benchmarks.real_digits import folder_main

PHOTOS = (
  "brick",
  "grass",
  "gravel",
  "camera",
  "coins",
  "moon",
  "astronaut",
  "coffee",
  "immunohistochemistry",
  "rocket",
)
SIDE = 32


def patches(rng, photo, count, columns):
  """uint8 [count, SIDE, SIDE] patches of a grey photo [H, W] in [0, 1] within `columns`."""
  from skimage.transform import resize  # pylint: disable=g-import-not-at-top

  height = photo.shape[0]
  x0, x1 = columns
  out = []
  for _ in range(count):
    size = int(rng.integers(40, min(97, height, x1 - x0)))
    y = int(rng.integers(0, height - size + 1))
    x = int(rng.integers(x0, x1 - size + 1))
    patch = resize(photo[y : y + size, x : x + size], (SIDE, SIDE), anti_aliasing=True)
    out.append((np.clip(patch, 0, 1) * 255).round().astype(np.uint8))
  return np.stack(out)


def make_splits():
  """{'train': (images uint8 [4000, 32, 32], labels [4000]), 'test': ([1000, ...], [1000])}."""
  from skimage.color import rgb2gray  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  splits = {"train": ([], []), "test": ([], [])}
  for label, name in enumerate(PHOTOS):
    photo = getattr(skimage.data, name)()
    if photo.ndim == 3:
      photo = rgb2gray(photo[..., :3])
    photo = photo.astype(np.float64)
    photo = photo / photo.max() if photo.max() > 1 else photo
    cut = int(photo.shape[1] * 0.55)
    for split, count, columns in (("train", 400, (0, cut)), ("test", 100, (cut, photo.shape[1]))):
      images = patches(rng, photo, count, columns)
      splits[split][0].append(images)
      splits[split][1].append(np.full(count, label))
  return {k: (np.concatenate(v[0]), np.concatenate(v[1])) for k, v in splits.items()}


def main(argv=None):
  return folder_main(argv, __doc__.split("\n")[0], make_splits, "scikit-image", PHOTOS)


if __name__ == "__main__":
  sys.exit(main())
