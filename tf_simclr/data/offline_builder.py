"""The TFDS builder of the built-in datasets (shapes10, deadleaves10, ...): nothing to download.

A built-in dataset is a NumPy renderer of labelled 32x32 images; this module turns one into a
class-balanced, seeded split and into a real `tfds.core.GeneratorBasedBuilder`, so it is prepared,
cached and read exactly like any TFDS dataset (`~/tensorflow_datasets/<name>/<version>/`). Used by
`shapes10`, `deadleaves10` and `deadleaves10_color`.
"""

from __future__ import annotations

from collections.abc import Callable

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 5_000, "test": 1_000}

# (labels int64 [N], numpy Generator) -> images uint8 [N, 32, 32, 3]
Renderer = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def balanced_split(name: str, split: str, seeds: dict, num_classes: int, render: Renderer):
  """All images of a split: exactly balanced classes in a seeded random order, then rendered.

  Args:
    name: the dataset's name (for the error message).
    split: 'train' or 'test'.
    seeds: the generator seed of each split (different splits, different images).
    render: draws the images of the given labels from the generator, in a fixed order.

  Returns:
    (images uint8 [N, 32, 32, 3], labels int64 [N]), N = SPLIT_SIZES[split], N / classes each.
  """
  if split not in SPLIT_SIZES:
    raise ValueError(f"{name} has splits {sorted(SPLIT_SIZES)}, got {split!r}")
  n = SPLIT_SIZES[split]
  rng = np.random.default_rng(seeds[split])
  labels = rng.permutation(np.repeat(np.arange(num_classes, dtype=np.int64), n // num_classes))
  return render(labels, rng), labels


class OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the built-in datasets' builders; a subclass is registered under its snake-case name.

  Subclasses set CLASS_NAMES, DESCRIPTION and `generate(split) -> (images, labels)` (a
  staticmethod, e.g. wrapping `balanced_split`).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  CLASS_NAMES: tuple = ()
  DESCRIPTION = ""

  @staticmethod
  def generate(split: str):
    raise NotImplementedError

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default looks the module up with `importlib_resources` (an optional extra of etils)
    # to find a checksums file; these datasets download nothing, so point at this file directly.
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
          "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
        }
      ),
      supervised_keys=("image", "label"),
      disable_shuffling=True,  # the split is already in a seeded random order
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    images, labels = self.generate(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
