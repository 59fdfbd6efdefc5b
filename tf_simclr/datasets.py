"""Data sources and deterministic, distributable input pipelines.

Sources (`load_source(name, split, data_dir)`):
  * any tensorflow-datasets name ('cifar10', 'imagenet2012', 'imagenet2012_subset/1pct',
    'stl10', ...; split slicing such as 'train[:10%]' works). Datasets that can download are
    downloaded and prepared into `data_dir` (default ~/tensorflow_datasets) the first time.
    Datasets that need a manual download (ImageNet) are checked before anything is downloaded.
  * 'image_folder': `data_dir/<split>/<class>/**/<image>` (classes = sorted sub-folder names,
    label = index; an eval split takes the training split's `class_names`), or
    `data_dir/<split>/<image>` with no class folders (unlabelled: label -1). Only regular files
    are read; directory links are followed once, never into the split itself (`_list_local`).
    jpeg/jpg/png/bmp/gif, any case; a gif gives its first frame; grayscale becomes RGB.
  * 'deadleaves10' and 'shapes10': built-in 10-class datasets that need no download
    (`tf_simclr.deadleaves10`, which SimCLR learns in minutes, and `tf_simclr.shapes10`, one
    shape per image, which it does not), read through TFDS like any other; and
    'deadleaves10_color' (`tf_simclr.deadleaves10_color`: deadleaves10 with a random colour
    palette per image, the colour shortcut of the paper's Figure 6, for the study).
Every source yields examples in one fixed order, and `id` is the example's index in it.

Corrupt-file policy for 'image_folder' (image files are what users bring, and a long run should
not die on one bad file):
  1. When listing, each file with an image extension must start with the magic bytes of JPEG,
     PNG, GIF or BMP; files that do not are skipped, and their number (with a few names) is logged.
     Ids are assigned after this check, in listing order, so they never change during a run.
  2. A file that passes the check but fails to read or decode later is dropped from the stream;
     the log names the first few such files and counts them all (`_DecodeFailures`). A split of
     which no file decodes is refused when it is loaded (training would search it forever).
     The rest of the run goes on, but bit-for-bit reproducibility across pipeline counts does not
     hold past such a drop (the affected pipeline's later batches shift by one example), and an
     eval pass counts one example fewer. Fix or delete the file to get it back.
  TFDS data was validated when it was prepared; its errors are raised, never skipped.

The determinism contract of `train_dataset` (also a contract for other tools: keep it):
  Let `key(a, b) = tf.random.experimental.stateless_fold_in(a, b, alg='philox')` with int64
  data. The global example stream is, epoch after epoch, the source's fixed order cut into blocks
  of `shuffle_buffer` examples (the last may be shorter), each block permuted by
  `tf.random.experimental.stateless_shuffle(range(len), key(key([seed, 0], epoch), block),
  alg='philox')`. Global batch k is stream examples [k*G, (k+1)*G) (batches may span epochs).
  View v of the example with id i seen in epoch e is
  `augment.simclr_augment(image, key(key(key([seed, 1], e), i), v), ...)`.
  So the data, their order and their views depend only on `seed` and the step, not on the number
  of replicas, hosts or input pipelines, nor on a restart at `start_step`, nor on
  `tf.random.set_seed`. With a source at most `shuffle_buffer` examples long (the default for
  anything up to 50,000), every epoch is a uniformly random permutation.

Distribution: input pipeline p of P reads the whole global stream (cheaply: records stay encoded)
and keeps the contiguous slice [p*G/P, (p+1)*G/P) of each global batch, which it alone decodes and
augments, in per-replica batches. `tf.distribute` hands a pipeline's consecutive per-replica
batches to its replicas in order, so the concatenation over replicas of step k's batches is
global batch k, exactly as with one replica. Every pipeline reads every record: P times the
read I/O of sharding by file, the price of this exactness; `cache=True` pays it once.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import functools
import math
import os
import re

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from tf_simclr import augment
from tf_simclr import config
from tf_simclr import deadleaves10  # noqa: F401  (registers the tfds builder)
from tf_simclr import deadleaves10_color  # noqa: F401  (registers the tfds builder)
from tf_simclr import distribute
from tf_simclr import errors
from tf_simclr import shapes10  # noqa: F401  (registers the tfds builder)

IMAGE_FOLDER = config.IMAGE_FOLDER
BUILT_IN = config.BUILT_IN_DATASETS
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")
DEFAULT_SHUFFLE_BUFFER = 50_000
# Stream tags of the root keys [seed, tag]: the order and the views never share random numbers.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_SUBSET_STREAM = 2
_ALG = "philox"  # Pinned, rather than 'auto_select', so the keys cannot depend on the device.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_MAGIC_LENGTH = max(len(m) for m in _MAGIC)


class DatasetError(ValueError):
  """A data source cannot be used as asked; the message is one line meant for the user."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A split of a dataset, in a fixed order.

  Attributes:
    name: the dataset name given to `load_source`.
    split: the split given to `load_source`.
    num_examples: number of examples (of records; see the corrupt-file policy).
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


# ----------------------------------------------------------------------------------------------
# Sources.


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
    return _image_folder_source(split, data_dir, class_names)
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
    builder = tfds.builder(name, data_dir=data_dir)
  except _UNUSABLE as e:  # Unknown config or version: TFDS's message says which exist.
    raise DatasetError(f"Cannot use dataset '{name}': {errors.first_line(e, whole=True)}") from e

  if not builder.is_prepared():
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

  splits = builder.info.splits
  if any(part.split("[")[0] not in splits for part in split.split("+")):
    raise DatasetError(
      f"Dataset '{name}' has no split '{split}'; its splits are: {', '.join(sorted(splits))}."
    )
  num_examples = _split_size(name, split, splits)

  features = dict(builder.info.features.items())
  if not isinstance(features.get("image"), tfds.features.Image):
    raise DatasetError(
      f"Dataset '{name}' has no 'image' feature of type tfds.features.Image; "
      f"its features are: {', '.join(features)}."
    )
  label = features.get("label")
  num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 0

  ds = builder.as_dataset(
    split=split,
    shuffle_files=False,
    # Keep images encoded: each pipeline reads every record but decodes only its share.
    decoders={"image": tfds.decode.SkipDecoding()},
    # One file at a time, in order, so 'id' is the example's index in the split.
    read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
  )

  def to_record(i, ex):
    label = tf.cast(ex["label"], tf.int64) if num_classes else tf.constant(-1, tf.int64)
    return {"image": ex["image"], "label": label, "id": i}

  records = ds.enumerate().map(to_record)
  return Source(
    name=name, split=split, num_examples=num_examples, num_classes=num_classes, records=records
  )


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


def _has_image_magic(path: str) -> bool:
  try:
    if _is_local(path):  # builtin open: also takes names that are not valid UTF-8
      with open(path, "rb") as f:
        head = f.read(_MAGIC_LENGTH)
    else:
      with tf.io.gfile.GFile(path, "rb") as f:
        head = f.read(_MAGIC_LENGTH)
  except (OSError, tf.errors.OpError):
    return False
  return any(head.startswith(m) for m in _MAGIC)


def _is_local(path: str) -> bool:
  return "://" not in path


def _shown(path: str) -> str:
  """A path as it can be printed: bytes that are not UTF-8 as \\x escapes."""
  return os.fsencode(path).decode("utf-8", "backslashreplace") if _is_local(path) else path


@dataclasses.dataclass
class _Listing:
  """What listing a split found, besides its images."""

  others: int = 0  # files without an image extension
  not_regular: list = dataclasses.field(default_factory=list)  # FIFOs, sockets, broken links
  links_not_followed: list = dataclasses.field(default_factory=list)
  system_dirs: list = dataclasses.field(default_factory=list)  # skipped (`_is_system`)
  seen_dirs: set = dataclasses.field(default_factory=set)  # real paths, for loop detection


def _is_system(name: str) -> bool:
  """Folders that tools leave beside images: .ipynb_checkpoints, .git, macOS's __MACOSX."""
  return name.startswith(".") or name == "__MACOSX"


def _list_local(folder: str, split_root: str, listing: _Listing) -> list[str]:
  """Image files under a local `folder`, recursively; counts the rest in `listing`.

  Only regular files are listed (a FIFO would block the reader). A symlink to a directory is
  followed once (each real directory is walked once per split), and never when it leads into
  the split's folder or above it: so a link never adds an image twice or under another class.
  """
  root = os.path.realpath(split_root)
  paths, stack = [], [folder]
  while stack:
    directory = stack.pop()
    real = os.path.realpath(directory)
    if real in listing.seen_dirs:
      listing.links_not_followed.append(directory)
      continue
    listing.seen_dirs.add(real)
    with os.scandir(directory) as entries:
      for entry in entries:
        if entry.is_dir() and _is_system(entry.name):
          listing.system_dirs.append(entry.path)
        elif entry.is_dir():
          if entry.is_symlink():
            target = os.path.realpath(entry.path)
            if (
              target == root
              or target.startswith(root + os.sep)
              or root.startswith(target + os.sep)
              or target in listing.seen_dirs
            ):
              listing.links_not_followed.append(entry.path)
              continue
          stack.append(entry.path)
        elif not entry.name.lower().endswith(IMAGE_EXTENSIONS):
          listing.others += 1
        elif entry.is_file():
          paths.append(entry.path)
        else:
          listing.not_regular.append(entry.path)
  return paths


def _list_images(folder: str, split_root: str, listing: _Listing) -> list[str]:
  """Image files under `folder` (recursively), sorted; the rest is counted in `listing`."""
  if _is_local(folder):
    return sorted(_list_local(folder, split_root, listing))
  paths = []
  for root, dirs, files in tf.io.gfile.walk(folder):  # Object stores have no links or FIFOs.
    listing.system_dirs += [os.path.join(root, d) for d in dirs if _is_system(d.rstrip("/"))]
    dirs[:] = [d for d in dirs if not _is_system(d.rstrip("/"))]  # walk descends into these
    for f in files:
      if f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, f))
      else:
        listing.others += 1
  return sorted(paths)


def _log_listing(root: str, listing: _Listing) -> None:
  if listing.system_dirs:
    logging.warning(
      "Image folder %s: skipping %d hidden or system folders (not classes, not images), e.g. %s",
      root,
      len(listing.system_dirs),
      ", ".join(_shown(p) for p in sorted(listing.system_dirs)[:3]),
    )
  if listing.others:
    logging.info(
      "Image folder %s: ignoring %d files without an image extension (%s)",
      root,
      listing.others,
      ", ".join(IMAGE_EXTENSIONS),
    )
  if listing.not_regular:
    logging.warning(
      "Image folder %s: skipping %d entries that are not regular files (FIFOs, "
      "sockets, broken links), e.g. %s",
      root,
      len(listing.not_regular),
      ", ".join(_shown(p) for p in sorted(listing.not_regular)[:3]),
    )
  if listing.links_not_followed:
    logging.warning(
      "Image folder %s: not following %d directory links that lead into the split "
      "folder, above it, or to a folder already listed (a loop), e.g. %s",
      root,
      len(listing.links_not_followed),
      ", ".join(_shown(p) for p in sorted(listing.links_not_followed)[:3]),
    )


def _class_labels(root: str, classes: list[str], class_names) -> dict[str, int]:
  """{class folder: label}: by `class_names` (the training split's) when given, else sorted."""
  if class_names is None or not classes:
    return {name: label for label, name in enumerate(classes)}
  class_names = list(class_names)
  missing = [c for c in class_names if c not in classes]
  unknown = [c for c in classes if c not in class_names]
  if missing:
    logging.warning(
      "Image folder %s lacks %d classes of the training split: %s",
      root,
      len(missing),
      ", ".join(missing[:10]),
    )
  if unknown:
    logging.warning(
      "Image folder %s: skipping the images of %d classes that the training split "
      "does not have: %s",
      root,
      len(unknown),
      ", ".join(unknown[:10]),
    )
  return {name: class_names.index(name) for name in classes if name in class_names}


def _first_decodable(paths: list[str]) -> int | None:
  """The index of the first of `paths` that decodes as an image, or None."""
  for i, path in enumerate(paths):
    try:
      _decode_image(tf.io.read_file(os.fsencode(path) if _is_local(path) else path))
      return i
    except tf.errors.OpError:
      continue
  return None


def _skip_non_images(root: str, paths: list[str], labels: list[int]):
  """(paths, labels) without the files that are not images at all (the module docstring).

  Headers are read in parallel: on network storage each read is a round trip.
  """
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    ok = list(pool.map(_has_image_magic, paths))
  bad = [p for p, good in zip(paths, ok) if not good]
  if not bad:
    return paths, labels
  logging.warning(
    "Image folder %s: skipping %d files that are not JPEG/PNG/GIF/BMP images, e.g. %s",
    root,
    len(bad),
    ", ".join(_shown(p) for p in bad[:3]),
  )
  return (
    [p for p, good in zip(paths, ok) if good],
    [label for label, good in zip(labels, ok) if good],
  )


def _split_files(root: str, class_names=None):
  """(paths, labels, class folders, listing) of the split folder `root`.

  Labelled by its class folders (by `class_names` when given, see `_class_labels`); without
  class folders, every image under `root` with label -1. System folders are never classes.
  """
  entries = sorted(tf.io.gfile.listdir(root))
  folders = [d.rstrip("/") for d in entries if tf.io.gfile.isdir(os.path.join(root, d))]
  classes = [d for d in folders if not _is_system(d)]
  labels_of = _class_labels(root, classes, class_names)
  paths, labels, listing = [], [], _Listing()
  if classes:  # (Without classes, listing the split finds the system folders.)
    listing.system_dirs = [os.path.join(root, d) for d in folders if _is_system(d)]
    loose = [e for e in entries if e.rstrip("/") not in folders]
    if loose:
      logging.warning(
        "Image folder %s: ignoring %d files beside the class folders", root, len(loose)
      )
    for name in classes:
      found = _list_images(os.path.join(root, name), root, listing)
      if not found:
        logging.warning("Image folder %s: class '%s' has no images", root, name)
      if name in labels_of:
        paths += found
        labels += [labels_of[name]] * len(found)
  else:
    paths = _list_images(root, root, listing)
    labels = [-1] * len(paths)
  return paths, labels, classes, listing


def _image_folder_source(split: str, data_dir: str | None, class_names=None) -> Source:
  """`data_dir/<split>/<class>/...` (labelled) or `data_dir/<split>/<images>` (unlabelled)."""
  if not data_dir:
    raise DatasetError(
      f"Dataset '{IMAGE_FOLDER}' needs data_dir: the folder holding <split>/<class>/<images>."
    )
  if not tf.io.gfile.isdir(data_dir):
    raise DatasetError(f"Image folder {data_dir} does not exist.")
  root = os.path.join(data_dir, split)
  if not tf.io.gfile.isdir(root):
    splits = sorted(
      d.rstrip("/")
      for d in tf.io.gfile.listdir(data_dir)
      if tf.io.gfile.isdir(os.path.join(data_dir, d))
    )
    raise DatasetError(
      f"Image folder {data_dir} has no split '{split}' (no folder {root}); "
      f"its splits are: {', '.join(splits) or 'none'}."
    )

  paths, labels, classes, listing = _split_files(root, class_names)
  _log_listing(root, listing)

  paths, labels = _skip_non_images(root, paths, labels)
  if not paths:
    raise DatasetError(
      f"Image folder {root} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})."
    )
  # Training would search the stream forever for an image that decodes: say so now.
  if _first_decodable(paths) is None:
    raise DatasetError(
      f"Image folder {root}: none of its {len(paths)} image files decodes "
      f"(e.g. {', '.join(_shown(p) for p in paths[:3])})."
    )

  records = tf.data.Dataset.from_tensor_slices(
    {
      # Bytes as the file system has them: names need not be valid UTF-8.
      "image": tf.constant([os.fsencode(p) if _is_local(p) else p.encode() for p in paths]),
      "label": tf.constant(labels, tf.int64),
      "id": tf.range(len(paths), dtype=tf.int64),  # Assigned after skipping: stable ids.
    }
  )
  num_classes = len(class_names) if class_names is not None and classes else len(classes)
  logging.info("Image folder %s: %d images, %d classes", root, len(paths), num_classes)
  return Source(
    name=IMAGE_FOLDER,
    split=split,
    num_examples=len(paths),
    num_classes=num_classes,
    records=records,
    reads_files=True,
    class_names=tuple(class_names if class_names is not None and classes else classes),
    files=tuple(_shown(p) for p in paths),
  )


# ----------------------------------------------------------------------------------------------
# Labelled subsets (fine-tuning with few labels).
#
# The rule of `label_subset(source, fraction, seed=s)`: with n_c examples of class c,
#   quota_c = min(n_c, max(1, floor(fraction * n_c + 0.5)))   (round half up, at least 1),
# and class c keeps the first quota_c of its examples in the order of the permutation
#   perm = tf.random.experimental.stateless_shuffle(range(N), [s, 2], alg='philox')
# of all N ids. One permutation serves every fraction, so with the same seed a smaller
# fraction's subset is contained in a larger one's (1% inside 10%), as a user would expect.

LABEL_SUBSET_FILE = "label_subset.txt"


def subset_source(source: Source, ids) -> Source:
  """`source` restricted to the examples whose 'id' is in `ids`, in the source's order.

  Ids keep their values, so an example's views (seeded by its id) are the same as in the
  full source; the training stream of the result is the contract's stream over its
  `len(ids)` examples. The filter reads every record of the source once per pass; for a
  small subset of a large split, cache it (`cache=True`) to read the split once.

  Args:
    source: from `load_source`.
    ids: int sequence or array of distinct example ids, each in [0, source.num_examples).

  Raises:
    DatasetError: empty, duplicated or unknown ids.
  """
  ids = np.asarray(ids, np.int64).reshape(-1)
  _check_ids(source, ids, what="the subset")
  if len(np.unique(ids)) != len(ids):
    raise DatasetError(f"the subset of {source.name} {source.split!r} repeats example ids")
  keep = np.zeros([source.num_examples], bool)
  keep[ids] = True
  keep = tf.constant(keep)
  records = source.records.filter(lambda record: tf.gather(keep, record["id"]))
  return dataclasses.replace(source, num_examples=len(ids), records=records)


def _check_ids(source: Source, ids: np.ndarray, what: str) -> None:
  if not len(ids):
    raise DatasetError(f"{what} names no example ids")
  unknown = ids[(ids < 0) | (ids >= source.num_examples)]
  if len(unknown):
    shown = ", ".join(str(i) for i in np.unique(unknown)[:5])
    raise DatasetError(
      f"{what} names {len(unknown)} example ids that {source.name} {source.split!r} does not "
      f"have (its ids are 0..{source.num_examples - 1}): {shown}"
      f"{', ...' if len(np.unique(unknown)) > 5 else ''}"
    )


def read_label_file(path: str) -> np.ndarray:
  """The example ids listed in a text file, one per line: sorted, distinct int64 [n].

  Blank lines and lines starting with '#' are ignored.

  Raises:
    DatasetError: missing file, a line that is not an integer, or no ids at all.
  """
  if not tf.io.gfile.exists(path):
    raise DatasetError(f"label file {path} does not exist")
  with tf.io.gfile.GFile(path, "r") as f:
    # A UTF-8 byte-order mark (Windows editors write one) is not part of the first id.
    lines = f.read().removeprefix("\ufeff").splitlines()
  ids = []
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    try:
      ids.append(int(line))
    except ValueError:
      raise DatasetError(
        f"label file {path} line {number}: {line[:60]!r} is not an example id (an integer)"
      ) from None
  if not ids:
    raise DatasetError(f"label file {path} names no example ids")
  unique, counts = np.unique(np.asarray(ids, np.int64), return_counts=True)
  if (counts > 1).any():
    repeated = unique[counts > 1]
    logging.warning(
      "Label file %s lists %d ids more than once (e.g. %s); each is used once",
      path,
      len(repeated),
      ", ".join(str(i) for i in repeated[:5]),
    )
  return unique


def _labels_by_id(source: Source) -> np.ndarray:
  """int64 [N]: the label of each id. Reads every record once (images stay encoded)."""
  labels = np.full([source.num_examples], -1, np.int64)
  pairs = source.records.map(lambda r: (r["id"], r["label"])).batch(65536)
  for ids, batch_labels in pairs.as_numpy_iterator():
    labels[ids] = batch_labels
  return labels


def _warn_one_class(source: Source, ids: np.ndarray, label_file: str) -> None:
  """Warns when the ids [n] of `label_file` all have one label of a split of several."""
  if source.num_classes < 2:
    return
  labels = np.unique(_labels_by_id(source)[ids])
  if len(labels) == 1:
    logging.warning(
      "Label file %s: its %d ids are all of class %d (of %d): the head learns one class",
      label_file,
      len(ids),
      labels[0],
      source.num_classes,
    )


def label_subset(
  source: Source, fraction: float = 1.0, label_file: str | None = None, seed: int = 0
) -> np.ndarray | None:
  """The labelled training examples: a class-balanced fraction, or the ids of a file.

  See the rule in the comment above this section. Same source and seed, same subset; with
  a fraction the source's labels are read once (one pass over its records).

  Args:
    source: a labelled split from `load_source`.
    fraction: in (0, 1]; 1 with no `label_file` means every example.
    label_file: a text file of example ids (`read_label_file`); then `fraction` must be 1.
    seed: the run's seed.

  Returns:
    Sorted int64 ids [n], or None for every example (fraction 1, no file).

  Raises:
    DatasetError: fraction outside (0, 1], both a fraction and a file, a file naming unknown
      ids, or a fraction of an unlabelled source.
  """
  if not 0 < fraction <= 1:  # Also rejects NaN.
    raise DatasetError(f"the label fraction must be in (0, 1], got {fraction}")
  if label_file:
    if fraction != 1:
      raise DatasetError(
        f"give a label fraction ({fraction}) or a label file ({label_file}), not both"
      )
    ids = read_label_file(label_file)
    _check_ids(source, ids, what=f"label file {label_file}")
    _warn_one_class(source, ids, label_file)
    return ids
  if fraction == 1:
    return None
  if source.num_classes == 0:
    raise DatasetError(
      f"a label fraction needs labels, but {source.name} {source.split!r} is unlabelled"
    )
  labels = _labels_by_id(source)
  if (labels < 0).any():
    raise DatasetError(
      f"a label fraction needs labels, but {int((labels < 0).sum())} examples "
      f"of {source.name} {source.split!r} have none"
    )
  counts = np.bincount(labels, minlength=source.num_classes)
  quota = np.where(
    counts > 0,
    np.minimum(counts, np.maximum(1, np.floor(fraction * counts + 0.5).astype(np.int64))),
    0,
  )
  perm = tf.random.experimental.stateless_shuffle(
    tf.range(source.num_examples, dtype=tf.int64), _root_key(seed, _SUBSET_STREAM), alg=_ALG
  ).numpy()
  # Group perm by class, keeping perm's order within a class; then rank within the class.
  grouped = perm[np.argsort(labels[perm], kind="stable")]
  grouped_labels = labels[grouped]
  first = np.searchsorted(grouped_labels, grouped_labels)  # Index where each class begins.
  rank = np.arange(len(grouped)) - first
  ids = np.sort(grouped[rank < quota[grouped_labels]])
  logging.info(
    "Labelled subset of %s %r: %d of %d examples (fraction %g, seed %d)",
    source.name,
    source.split,
    len(ids),
    source.num_examples,
    fraction,
    seed,
  )
  return ids


def write_label_subset(model_dir: str, ids) -> str | None:
  """Records the run's labelled subset in `model_dir/label_subset.txt`, one id per line.

  Written atomically (a temporary file renamed into place) and never over a different
  subset: a run resumed in the same model_dir must train on the labels it started with.

  Args:
    model_dir: the run's directory.
    ids: the ids from `label_subset`; None (every example) writes nothing, but still checks
      that model_dir holds no subset of an earlier run.

  Returns:
    The file's path, or None when `ids` is None and there is no file.

  Raises:
    DatasetError: model_dir already holds a different subset.
  """
  path = os.path.join(model_dir, LABEL_SUBSET_FILE)
  new = None if ids is None else np.unique(np.asarray(ids, np.int64))

  def check_existing():
    old = read_label_file(path)
    if new is None or not np.array_equal(old, new):
      this = "every example" if new is None else f"{len(new)} examples"
      raise DatasetError(
        f"{path} holds the labelled subset of an earlier run ({len(old)} examples) and this "
        f"run's differs ({this}): use the same seed and label fraction or file as that run, "
        "or another model_dir"
      )

  if tf.io.gfile.exists(path):
    check_existing()
    return path
  if new is None:
    return None
  tf.io.gfile.makedirs(model_dir)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write("".join(f"{i}\n" for i in new))
  try:
    tf.io.gfile.rename(tmp, path, overwrite=False)
  except tf.errors.AlreadyExistsError:  # Written meanwhile by another process.
    tf.io.gfile.remove(tmp)
    check_existing()
  return path


# ----------------------------------------------------------------------------------------------
# Pipelines.


def _read(record):
  return dict(record, image=tf.io.read_file(record["image"]))


def _decode_image(encoded):
  """uint8 [H, W, 3] from JPEG/PNG/GIF (first frame)/BMP bytes; grayscale becomes RGB."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


class _DecodeFailures:
  """Counts the files of a split that fail to decode; names the first few in the log."""

  NAMED = 5

  def __init__(self, source: Source):
    self.where = f"{source.name} split {source.split!r}"
    self.files = source.files
    self.failed = set()  # ids: a file is read again each epoch, but counted once
    self.count = 0

  def __call__(self, example_id) -> bool:
    """Logs file `example_id` (called from the input pipeline); returns False (drop it)."""
    i = int(example_id)
    if i in self.failed:
      return False
    self.failed.add(i)
    self.count = len(self.failed)
    name = self.files[i] if 0 <= i < len(self.files) else f"id {i}"
    if self.count <= self.NAMED:
      logging.warning("%s: cannot decode %s; skipped (%d so far)", self.where, name, self.count)
    elif math.log10(self.count).is_integer():
      logging.warning("%s: %d files that cannot be decoded skipped so far", self.where, self.count)
    return False


def _decode(source: Source, records: tf.data.Dataset, read: bool | None = None):
  """Reads (if `read`, default `source.reads_files`) and decodes the 'image' of `records`.

  Only user files may be corrupt (see the module docstring's corrupt-file policy): for sources
  that read files, an example that fails to read or decode is dropped, and logged by
  `_DecodeFailures`. Each record goes through its own one-element dataset with
  `ignore_errors`, followed by a marker that takes its place when it was dropped.
  """
  read = source.reads_files if read is None else read

  def decode(record):
    if read:
      record = _read(record)
    return dict(record, image=_decode_image(record["image"]))

  if not source.reads_files:
    ds = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds
  failures = _DecodeFailures(source)

  def decoded_or_marker(record):
    good = tf.data.Dataset.from_tensors(record).map(decode).ignore_errors()
    marker = dict(record, image=tf.zeros([0, 0, 3], tf.uint8))
    return (
      good.map(lambda r: (r, True))
      .concatenate(tf.data.Dataset.from_tensors((marker, False)))
      .take(1)
      .get_single_element()
    )

  def keep(record, ok):
    return tf.cond(ok, lambda: True, lambda: tf.py_function(failures, [record["id"]], tf.bool))

  ds = records.map(decoded_or_marker, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.filter(keep).map(lambda record, ok: record)


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their order: part of the contract.
  options.autotune.enabled = True
  # One thread per op inside the pipeline: parallelism comes from the parallel maps.
  options.threading.max_intra_op_parallelism = 1
  # The pipelines shard themselves; a strategy must not shard them again.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return options


def _root_key(seed: int, stream: int) -> tf.Tensor:
  return tf.constant([seed, stream], tf.int64)


def _fold_in(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=_ALG)


def view_seeds(seed: int, epoch, example_id, num_views: int = 2) -> tf.Tensor:
  """The stateless seeds of an example's views: int64 [num_views, 2] (the contract above)."""
  key = _fold_in(_fold_in(_root_key(seed, _AUGMENT_STREAM), epoch), example_id)
  return tf.stack([_fold_in(key, v) for v in range(num_views)])


def _check_batching(
  global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
):
  """Refuses inconsistent batching arguments; returns G / P, a pipeline's share of a batch."""
  if global_batch_size <= 0 or per_replica_batch_size <= 0:
    raise ValueError(
      f"batch sizes must be positive, got global {global_batch_size} and "
      f"per replica {per_replica_batch_size}"
    )
  if num_input_pipelines <= 0 or not 0 <= input_pipeline_id < num_input_pipelines:
    raise ValueError(
      f"input_pipeline_id must be in [0, {num_input_pipelines}), got {input_pipeline_id}"
    )
  share = distribute.check_batch(
    global_batch_size, num_input_pipelines, "global_batch_size", "input pipelines"
  )
  if share % per_replica_batch_size:
    raise ValueError(
      f"per-replica batch size {per_replica_batch_size} does not divide the "
      f"{share} examples of each global batch that an input pipeline serves "
      f"(global batch {global_batch_size} / {num_input_pipelines} pipelines)"
    )
  return share


def _global_stream(
  source: Source, seed: int, start_example: int, shuffle_buffer: int, cache: bool
) -> tf.data.Dataset:
  """The infinite shuffled example stream from example `start_example` on.

  Elements: the records plus 'epoch' (int64), still encoded (or paths, unless cached).
  """
  n = source.num_examples
  block = min(n, shuffle_buffer)
  blocks_per_epoch = math.ceil(n / block)
  # Start at example `start_example` of the stream without reading the epochs before it.
  start_epoch, offset = divmod(start_example, n)
  start_block, offset = divmod(offset, block)

  records = source.records
  if cache:
    if source.reads_files:
      records = records.map(_read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    records = records.cache()
  root = _root_key(seed, _SHUFFLE_STREAM)

  def shuffle_block(counter, blk):
    epoch, index = counter // blocks_per_epoch, counter % blocks_per_epoch
    size = tf.shape(blk["id"])[0]
    order = tf.random.experimental.stateless_shuffle(
      tf.range(size), _fold_in(_fold_in(root, epoch), index), alg=_ALG
    )
    blk = {k: tf.gather(v, order) for k, v in blk.items()}
    blk["epoch"] = tf.fill([size], epoch)
    return blk

  ds = records.batch(block).repeat().skip(start_block)
  ds = ds.enumerate(start=start_epoch * blocks_per_epoch + start_block)
  ds = ds.map(shuffle_block).unbatch()
  return ds.skip(offset)


def example_to_views(
  ex: dict,
  seed: int,
  image_size: int,
  num_views: int,
  color_jitter_strength: float,
  use_blur: bool,
  min_scale: float,
  horizontal_flip: bool,
  augment_on_device: bool,
) -> dict:
  """One decoded example's training views, seeded by (`seed`, its epoch, its id).

  `ex` holds 'image' uint8 [H, W, 3], 'epoch', 'id' and 'label' (int64 scalars). Returns
  `train_dataset`'s element without the batch axis: 'views' float32 [V, s, s, 3], 'label', 'id'
  (and 'distort' with `augment_on_device`). The tf.data service workers call it too.
  """
  seeds = view_seeds(seed, ex["epoch"], ex["id"], num_views)
  if augment_on_device:
    crops = [
      augment.crop_view(
        ex["image"],
        seeds[v],
        image_size,
        image_size,
        color_jitter_strength,
        min_scale=min_scale,
        flip=horizontal_flip,
      )
      for v in range(num_views)
    ]
    return {
      "views": tf.stack([c for c, _ in crops]),
      "distort": {k: tf.stack([p[k] for _, p in crops]) for k in crops[0][1]},
      "label": ex["label"],
      "id": ex["id"],
    }
  views = [
    augment.simclr_augment(
      ex["image"],
      seeds[v],
      image_size,
      image_size,
      color_jitter_strength=color_jitter_strength,
      use_blur=use_blur,
      min_scale=min_scale,
      flip=horizontal_flip,
    )
    for v in range(num_views)
  ]
  return {"views": tf.stack(views), "label": ex["label"], "id": ex["id"]}


def train_dataset(
  source: Source,
  global_batch_size: int,
  per_replica_batch_size: int,
  num_input_pipelines: int,
  input_pipeline_id: int,
  seed: int,
  image_size: int,
  num_views: int = 2,
  start_step: int = 0,
  color_jitter_strength: float = 1.0,
  use_blur: bool = True,
  min_scale: float = 0.08,
  horizontal_flip: bool = True,
  cache: bool = False,
  shuffle_buffer: int | None = None,
  augment_on_device: bool = False,
) -> tf.data.Dataset:
  """The pretraining input of one input pipeline: infinite, in per-replica batches.

  Follows the determinism contract of the module docstring: the concatenation, over the
  replicas of all pipelines, of their k-th step batches is global batch k, the same for any
  number of pipelines and replicas and after a restart at `start_step`.

  Args:
    source: from `load_source`.
    global_batch_size: G, examples per step over all replicas.
    per_replica_batch_size: b, examples per batch of this dataset; must divide G / P.
    num_input_pipelines: P, e.g. `input_context.num_input_pipelines`; must divide G.
    input_pipeline_id: this pipeline, in [0, P).
    seed: the run's seed (`--seed`).
    image_size: s, side of the square views.
    num_views: V, augmented views per example.
    start_step: the first step to produce (a restart resumes at the same example and views).
    color_jitter_strength, use_blur, min_scale: passed to `augment.simclr_augment`.
    horizontal_flip: passed to `augment.simclr_augment` as `flip`.
    cache: keep the (encoded) records in memory after the first epoch.
    shuffle_buffer: examples per shuffle block; None: min(num_examples, 50,000).
    augment_on_device: leave the flip, colour jitter, grayscale and blur to the training step
      (`augment.crop_view` here, `augment.distort_batch` there); same views up to rounding.

  Returns:
    tf.data.Dataset of {'views': float32 [b, V, s, s, 3] in [0, 1], 'label': int64 [b],
    'id': int64 [b]}; with `augment_on_device`, 'views' are the crops and 'distort' holds
    their parameters (`augment.DISTORT_SIGNATURE`, each with leading axes [b, V]).
  """
  share = _check_batching(
    global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
  )
  if num_views < 1 or image_size < 1 or start_step < 0:
    raise ValueError(
      f"need num_views >= 1, image_size >= 1 and start_step >= 0, got "
      f"{num_views}, {image_size}, {start_step}"
    )
  if shuffle_buffer is None:
    shuffle_buffer = min(source.num_examples, DEFAULT_SHUFFLE_BUFFER)
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")

  ds = _global_stream(source, seed, start_step * global_batch_size, shuffle_buffer, cache)
  # Keep this pipeline's contiguous slice of each global batch, before any decoding.
  begin = input_pipeline_id * share
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(lambda batch: {k: v[begin : begin + share] for k, v in batch.items()})
  ds = ds.unbatch()
  ds = _decode(source, ds, read=source.reads_files and not cache)

  make_views = functools.partial(
    example_to_views,
    seed=seed,
    image_size=image_size,
    num_views=num_views,
    color_jitter_strength=color_jitter_strength,
    use_blur=use_blur,
    min_scale=min_scale,
    horizontal_flip=horizontal_flip,
    augment_on_device=augment_on_device,
  )
  ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(per_replica_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_steps(num_examples: int, global_batch_size: int, num_input_pipelines: int) -> int:
  """Steps that cover a split exactly once, the same number on every pipeline.

  Pipeline p holds examples p, p + P, ...: at most ceil(N / P), served G / P per step.
  """
  share = global_batch_size // num_input_pipelines
  return math.ceil(math.ceil(num_examples / num_input_pipelines) / share)


def eval_dataset(
  source: Source,
  per_replica_batch_size: int,
  num_input_pipelines: int,
  input_pipeline_id: int,
  image_size: int,
  cache: bool = False,
  global_batch_size: int | None = None,
) -> tf.data.Dataset:
  """The evaluation input of one input pipeline: each example once, padded to static batches.

  Pipeline p takes the examples with id = p mod P, in order. Each pipeline's dataset is padded
  with mask-0 examples (zero image, label 0, id -1) to exactly `eval_steps(...)` steps of
  G / P examples, so all pipelines run the same number of full, static-shape batches.

  Args:
    source: from `load_source`.
    per_replica_batch_size: b.
    num_input_pipelines, input_pipeline_id: P and p.
    image_size: s; images go through `augment.preprocess_eval`.
    cache: keep this pipeline's (encoded) records in memory after the first pass.
    global_batch_size: G; None means b * P (one replica per pipeline).

  Returns:
    A finite tf.data.Dataset of eval_steps * G / (P b) batches {'image': float32 [b, s, s, 3],
    'label': int64 [b], 'mask': float32 [b] (1 real, 0 padding), 'id': int64 [b]}.
  """
  global_batch_size = global_batch_size or per_replica_batch_size * num_input_pipelines
  share = _check_batching(
    global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
  )
  total = eval_steps(source.num_examples, global_batch_size, num_input_pipelines) * share

  ds = source.records.shard(num_input_pipelines, input_pipeline_id)
  if cache:
    if source.reads_files:
      ds = ds.map(_read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.cache()
  ds = _decode(source, ds, read=source.reads_files and not cache)

  def preprocess(ex):
    return {
      "image": augment.preprocess_eval(ex["image"], image_size, image_size),
      "label": ex["label"],
      "mask": tf.constant(1.0),
      "id": ex["id"],
    }

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
    {
      "image": tf.zeros([image_size, image_size, 3]),
      "label": tf.constant(0, tf.int64),
      "mask": tf.constant(0.0),
      "id": tf.constant(-1, tf.int64),
    }
  ).repeat()
  # take() rather than an exact pad count: stays exact if a corrupt file was dropped.
  ds = ds.concatenate(padding).take(total)
  ds = ds.batch(per_replica_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def example_views(
  source: Source,
  seed: int,
  image_size: int,
  color_jitter_strength: float = 1.0,
  use_blur: bool = True,
  num_examples: int = 4,
  min_scale: float = 0.08,
  horizontal_flip: bool = True,
) -> dict:
  """The first examples of the run's first step with their two views, to look at (TensorBoard).

  The global stream does not depend on the batch size, so these are exactly the views that
  step 0 trains on.

  Returns:
    {'images': float32 [2k, s, s, 3] (example i's views at rows 2i and 2i + 1),
     'id': int64 [k]}, k = min(num_examples, source.num_examples).
  """
  k = min(num_examples, source.num_examples)
  batch = next(
    iter(
      train_dataset(
        source,
        k,
        k,
        1,
        0,
        seed,
        image_size,
        color_jitter_strength=color_jitter_strength,
        use_blur=use_blur,
        min_scale=min_scale,
        horizontal_flip=horizontal_flip,
      )
    )
  )
  return {
    "images": tf.reshape(batch["views"], [2 * k, image_size, image_size, 3]),
    "id": batch["id"],
  }
