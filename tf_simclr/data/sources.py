"""Data sources: what a `Source` is, and `load_source`, which opens a split of a dataset.

Called by `plan.make_plan` (the run's splits) and by tests and benchmarks; `pipeline` turns a
Source into batches and `label_subsets` selects its labelled examples.

Sources (`load_source(name, split, data_dir)`):
  * any tensorflow-datasets name ('cifar10', 'imagenet2012', 'imagenet2012_subset/1pct',
    'stl10', ...; split slicing such as 'train[:10%]' works). Datasets that can download are
    downloaded and prepared into `data_dir` (default ~/tensorflow_datasets) the first time.
    Datasets that need a manual download (ImageNet) are checked before anything is downloaded.
    This module reads them.
  * 'image_folder': `data_dir/<split>/<class>/**/<image>` or `data_dir/<split>/<image>`
    (unlabelled), read by `image_folder` (its docstring says how files are listed and labelled,
    `pipeline`'s what happens to corrupt files).
  * 'deadleaves10' and 'shapes10': built-in 10-class datasets that need no download
    (`deadleaves10`, which SimCLR learns in minutes, and `shapes10`, one shape per image, which
    it does not), read through TFDS like any other; and 'deadleaves10_color'
    (`deadleaves10_color`: deadleaves10 with a random colour palette per image, the colour
    shortcut of the paper's Figure 6, for the study). Importing this module registers their
    TFDS builders (`offline_builder`); `config.BUILT_IN_DATASETS` names them.
Every source yields examples in one fixed order, and `id` is the example's index in it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from tf_simclr import config
from tf_simclr import errors
from tf_simclr.data import deadleaves10  # noqa: F401  (registers the tfds builder)
from tf_simclr.data import deadleaves10_color  # noqa: F401  (registers the tfds builder)
from tf_simclr.data import shapes10  # noqa: F401  (registers the tfds builder)

IMAGE_FOLDER = config.IMAGE_FOLDER
BUILT_IN = config.BUILT_IN_DATASETS


class DatasetError(ValueError):
  """A data source cannot be used as asked; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A split of a dataset, in a fixed order.

  Attributes:
    name: the dataset name given to `load_source`.
    split: the split given to `load_source`.
    num_examples: number of examples (of records; see `pipeline`'s corrupt-file policy).
    num_classes: number of classes, 0 when unlabelled.
    records: tf.data.Dataset of {'image': string scalar, 'label': int64 scalar (-1 when
      unlabelled), 'id': int64 scalar}, where 'image' is the encoded image, or its file path
      when `reads_files`. Cheap to shuffle and slice: nothing is decoded.
    reads_files: whether 'image' in `records` is a path to read rather than the encoded bytes.
    class_names: the class of each label (image folders; empty otherwise).
    files: the path of each id, to name files that fail to decode (image folders).
  """

  name: str
  split: str
  num_examples: int
  num_classes: int
  records: tf.data.Dataset
  reads_files: bool = False
  class_names: tuple = ()
  files: tuple = ()


def load_source(name: str, split: str, data_dir: str | None = None, class_names=None) -> Source:
  """Returns the split `split` of the dataset `name`.

  Args:
    name: 'image_folder', a built-in ('deadleaves10', 'shapes10') or a tensorflow-datasets name,
      optionally with a config ('imagenet2012_subset/1pct') or version ('cifar10:3.0.2').
    split: a split name ('train', 'test', 'validation', ...); TFDS splits may be sliced and
      combined ('train[:10%]', 'train+test').
    data_dir: the image folder's root for 'image_folder'; the TFDS data directory otherwise
      (None: TFDS's default, ~/tensorflow_datasets).
    class_names: 'image_folder': label the class folders by this list (the training split's
      `class_names`) rather than by the split's own folders, so that every split maps a
      class to the same label; folders of other classes are skipped with a warning.

  Raises:
    DatasetError: unknown dataset or split, missing or empty folder, missing manual download.
  """
  if name == IMAGE_FOLDER:
    # Imported here: image_folder builds Sources, so it imports this module.
    from tf_simclr.data import image_folder  # pylint: disable=g-import-not-at-top

    return image_folder.image_folder_source(split, data_dir, class_names)
  return _tfds_source(name, split, data_dir)


# What TFDS raises for data that is unknown, missing or unreadable (a DatasetError); anything
# else from a builder (TypeError, KeyError, ...) is a bug and keeps its traceback.
_UNUSABLE = (
  ValueError,  # unknown config, malformed name (registered.DatasetNotFoundError too)
  AssertionError,  # an unknown version
  OSError,  # files, disk, network (dataset_info.DatasetInfoFileError too)
  tf.errors.OpError,  # gfile: missing or unreadable files
  tfds.download.DownloadError,
  download_manager.NonMatchingChecksumError,  # a corrupt or changed download
)


def _tfds_source(name: str, split: str, data_dir: str | None) -> Source:
  """A TFDS split: downloads and prepares it first when needed and possible."""
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    _prepare(name, builder)

  splits = builder.info.splits
  if any(part.split("[")[0] not in splits for part in split.split("+")):
    raise DatasetError(
      f"Dataset '{name}' has no split '{split}'; its splits are: {', '.join(sorted(splits))}."
    )
  num_examples = _split_size(name, split, splits)
  num_classes = _num_classes(name, builder)

  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    # Keep images encoded: each pipeline reads every record but decodes only its share.
    decoders={"image": tfds.decode.SkipDecoding()},
    # One file at a time, in order, so 'id' is the example's index in the split.
    read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
  )

  @tf.autograph.experimental.do_not_convert
  def to_record(i, ex):
    label = tf.cast(ex["label"], tf.int64) if num_classes else tf.constant(-1, tf.int64)
    return {"image": ex["image"], "label": label, "id": i}

  records = ds.enumerate().map(to_record)
  return Source(
    name=name, split=split, num_examples=num_examples, num_classes=num_classes, records=records
  )


def _tfds_builder(name: str, data_dir: str | None):
  """The TFDS builder of `name` (maybe with a config or version); DatasetError if unknown."""
  base_name = name.split("/")[0].split(":")[0]
  known = tfds.list_builders(with_community_datasets=False)
  if base_name not in known:
    # The built-ins are registered TFDS builders, so `known` lists them already.
    close = difflib.get_close_matches(base_name, known + [IMAGE_FOLDER], n=5)
    hint = f" Close names: {', '.join(close)}." if close else ""
    raise DatasetError(
      f"Unknown dataset '{name}'.{hint} Use a tensorflow-datasets name, '{IMAGE_FOLDER}' "
      f"(images in data_dir/<split>/<class>/) or a built-in ({', '.join(BUILT_IN)}: no "
      "download)."
    )
  try:
    return tfds.builder(name, data_dir=data_dir)
  except _UNUSABLE as e:  # Unknown config or version: TFDS's message says which exist.
    raise DatasetError(f"Cannot use dataset '{name}': {errors.first_line(e, whole=True)}") from e


def _prepare(name: str, builder) -> None:
  """Downloads and prepares `builder`'s data, after checking for files fetched by hand."""
  _check_manual_download(name, builder)
  logging.info("Preparing dataset %s in %s", name, builder.data_dir)
  try:
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP
      )
    )
  except ModuleNotFoundError as e:  # TFDS imports some dependencies only when preparing.
    raise DatasetError(
      f"Preparing dataset '{name}' needs the Python package '{e.name}' (pip install {e.name})."
    ) from e
  except _UNUSABLE as e:
    raise DatasetError(
      f"Could not download and prepare dataset '{name}' into "
      f"{builder.data_dir_root}: {type(e).__name__}: {errors.first_line(e, whole=True)}"
    ) from e


def _num_classes(name: str, builder) -> int:
  """The classes of the 'label' feature (0: none); DatasetError without an 'image' feature."""
  features = dict(builder.info.features.items())
  if not isinstance(features.get("image"), tfds.features.Image):
    raise DatasetError(
      f"Dataset '{name}' has no 'image' feature of type tfds.features.Image; "
      f"its features are: {', '.join(features)}."
    )
  label = features.get("label")
  return label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0


def _split_size(name: str, split: str, splits) -> int:
  """The number of examples `split` (maybe sliced) selects; DatasetError if none."""
  sizes = ", ".join(f"{k} ({v.num_examples} examples)" for k, v in sorted(splits.items()))
  try:
    num_examples = splits[split].num_examples
  except Exception as e:  # A malformed slice: TFDS's message says why.
    why = errors.first_line(e, whole=True)
    raise DatasetError(
      f"Dataset '{name}' cannot select split '{split}' ({why}); its splits are: {sizes}."
    ) from e
  if num_examples < 0:  # A reversed slice (`train[50%:40%]`): TFDS counts it negative.
    raise DatasetError(
      f"Dataset '{name}' split '{split}' is a reversed slice (its end comes before its start: "
      f"{num_examples} examples); its splits are: {sizes}."
    )
  if num_examples == 0:  # e.g. a slice past the end, which as_dataset would refuse obscurely
    raise DatasetError(
      f"Dataset '{name}' split '{split}' selects no examples; its splits are: {sizes}."
    )
  return num_examples


def _check_manual_download(name: str, builder) -> None:
  """Raises DatasetError, before any download, if files that must be fetched by hand are missing."""
  instructions = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
  if not instructions:
    return
  manual_dir = os.path.join(os.fspath(builder.data_dir_root), "downloads", "manual")
  # The instructions name the archives (e.g. ILSVRC2012_img_train.tar); require those if any.
  wanted = sorted(
    set(re.findall(r"[\w.-]+\.(?:tar\.gz|tar|tgz|zip|gz|json|txt|csv|mat)\b", instructions))
  )
  present = set(tf.io.gfile.listdir(manual_dir)) if tf.io.gfile.isdir(manual_dir) else set()
  missing = [f for f in wanted if f not in present]
  if missing or not present:
    files = ", ".join(missing) if missing else "its files"
    raise DatasetError(
      f"Dataset '{name}' must be downloaded by hand: put {files} in {manual_dir}/ and run "
      f"again (tensorflow-datasets says: {errors.first_line(instructions, whole=True)})"
    )
