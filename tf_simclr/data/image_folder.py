"""Image folders as data sources: `data_dir/<split>/<class>/**/<image>`, or unlabelled images.

Called by `sources.load_source` for the dataset 'image_folder'; its Source reads the files
(`reads_files`) and `pipeline` decodes them.

Classes are the sorted sub-folder names and a label is a class's index; an eval split takes the
training split's `class_names`. Without class folders, every image of the split is unlabelled
(label -1). Only regular files are read; directory links are followed once, never into the split
itself (`_list_local`); hidden and system folders (.ipynb_checkpoints, __MACOSX) are skipped.
jpeg/jpg/png/bmp/gif, any case; a gif gives its first frame; grayscale becomes RGB.

When listing, each file with an image extension must start with the magic bytes of JPEG, PNG,
GIF or BMP; files that do not are skipped, and their number (with a few names) is logged. Ids
are assigned after this check, in listing order, so they never change during a run. A split of
which no file decodes is refused here; what happens to a file that fails to decode later is
`pipeline`'s corrupt-file policy.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os

from absl import logging
import tensorflow as tf

from tf_simclr.data import pipeline
from tf_simclr.data import sources

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".gif")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_MAGIC_LENGTH = max(len(m) for m in _MAGIC)


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


def _examples(paths) -> str:
  """The first three of `paths`, as the log shows them."""
  return ", ".join(_shown(p) for p in sorted(paths)[:3])


def _log_listing(root: str, listing: _Listing) -> None:
  if listing.system_dirs:
    logging.warning(
      "Image folder %s: skipping %d hidden or system folders (not classes, not images), e.g. %s",
      root,
      len(listing.system_dirs),
      _examples(listing.system_dirs),
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
      _examples(listing.not_regular),
    )
  if listing.links_not_followed:
    logging.warning(
      "Image folder %s: not following %d directory links that lead into the split "
      "folder, above it, or to a folder already listed (a loop), e.g. %s",
      root,
      len(listing.links_not_followed),
      _examples(listing.links_not_followed),
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
      pipeline.decode_image(tf.io.read_file(os.fsencode(path) if _is_local(path) else path))
      return i
    except tf.errors.OpError:
      continue
  return None


def _skip_non_images(root: str, paths: list[str], labels: list[int]):
  """(paths, labels) without the files that are not images at all (this module's docstring).

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


def image_folder_source(split: str, data_dir: str | None, class_names=None) -> sources.Source:
  """`data_dir/<split>/<class>/...` (labelled) or `data_dir/<split>/<images>` (unlabelled)."""
  if not data_dir:
    raise sources.DatasetError(
      f"Dataset '{sources.IMAGE_FOLDER}' needs data_dir: the folder holding "
      "<split>/<class>/<images>."
    )
  if not tf.io.gfile.isdir(data_dir):
    raise sources.DatasetError(f"Image folder {data_dir} does not exist.")
  root = os.path.join(data_dir, split)
  if not tf.io.gfile.isdir(root):
    splits = sorted(
      d.rstrip("/")
      for d in tf.io.gfile.listdir(data_dir)
      if tf.io.gfile.isdir(os.path.join(data_dir, d))
    )
    raise sources.DatasetError(
      f"Image folder {data_dir} has no split '{split}' (no folder {root}); "
      f"its splits are: {', '.join(splits) or 'none'}."
    )

  paths, labels, classes, listing = _split_files(root, class_names)
  _log_listing(root, listing)

  paths, labels = _skip_non_images(root, paths, labels)
  if not paths:
    raise sources.DatasetError(
      f"Image folder {root} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})."
    )
  # Training would search the stream forever for an image that decodes: say so now.
  if _first_decodable(paths) is None:
    raise sources.DatasetError(
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
  return sources.Source(
    name=sources.IMAGE_FOLDER,
    split=split,
    num_examples=len(paths),
    num_classes=num_classes,
    records=records,
    reads_files=True,
    class_names=tuple(class_names if class_names is not None and classes else classes),
    files=tuple(_shown(p) for p in paths),
  )
