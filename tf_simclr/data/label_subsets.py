"""Labelled subsets, for fine-tuning with few labels: a class-balanced fraction, or a file of ids.

Called by `plan.make_plan` (`label_subset`, `subset_source`), `run.py` (`write_label_subset`,
which records the run's subset in its model_dir), `knn` (`subset_source`, a smaller bank) and
tests. `subset_source` restricts a `sources.Source` to given ids; `pipeline` reads the result
like any source.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import numpy as np
import tensorflow as tf

from tf_simclr.data import pipeline
from tf_simclr.data import sources

# The rule of `label_subset(source, fraction, seed=s)`: with n_c examples of class c,
#   quota_c = min(n_c, max(1, floor(fraction * n_c + 0.5)))   (round half up, at least 1),
# and class c keeps the first quota_c of its examples in the order of the permutation
#   perm = tf.random.experimental.stateless_shuffle(range(N), [s, 2], alg='philox')
# of all N ids. One permutation serves every fraction, so with the same seed a smaller
# fraction's subset is contained in a larger one's (1% inside 10%), as a user would expect.

LABEL_SUBSET_FILE = "label_subset.txt"


def subset_source(source: sources.Source, ids) -> sources.Source:
  """`source` restricted to the examples whose 'id' is in `ids`, in the source's order.

  Ids keep their values, so an example's views (seeded by its id) are the same as in the
  full source; the training stream of the result is the contract's stream over its
  `len(ids)` examples. The filter reads every record of the source once per pass; for a
  small subset of a large split, cache it (`cache=True`) to read the split once.

  Args:
    source: from `sources.load_source`.
    ids: int sequence or array of distinct example ids, each in [0, source.num_examples).

  Raises:
    sources.DatasetError: empty, duplicated or unknown ids.
  """
  ids = np.asarray(ids, np.int64).reshape(-1)
  _check_ids(source, ids, what="the subset")
  if len(np.unique(ids)) != len(ids):
    raise sources.DatasetError(f"the subset of {source.name} {source.split!r} repeats example ids")
  keep = np.zeros([source.num_examples], bool)
  keep[ids] = True
  keep = tf.constant(keep)
  records = source.records.filter(lambda record: tf.gather(keep, record["id"]))
  return dataclasses.replace(source, num_examples=len(ids), records=records)


def _check_ids(source: sources.Source, ids: np.ndarray, what: str) -> None:
  if not len(ids):
    raise sources.DatasetError(f"{what} names no example ids")
  unknown = ids[(ids < 0) | (ids >= source.num_examples)]
  if len(unknown):
    shown = ", ".join(str(i) for i in np.unique(unknown)[:5])
    raise sources.DatasetError(
      f"{what} names {len(unknown)} example ids that {source.name} {source.split!r} does not "
      f"have (its ids are 0..{source.num_examples - 1}): {shown}"
      f"{', ...' if len(np.unique(unknown)) > 5 else ''}"
    )


def read_label_file(path: str) -> np.ndarray:
  """The example ids listed in a text file, one per line: sorted, distinct int64 [n].

  Blank lines and lines starting with '#' are ignored.

  Raises:
    sources.DatasetError: missing file, a line that is not an integer, or no ids at all.
  """
  if not tf.io.gfile.exists(path):
    raise sources.DatasetError(f"label file {path} does not exist")
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
      raise sources.DatasetError(
        f"label file {path} line {number}: {line[:60]!r} is not an example id (an integer)"
      ) from None
  if not ids:
    raise sources.DatasetError(f"label file {path} names no example ids")
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


def _labels_by_id(source: sources.Source) -> np.ndarray:
  """int64 [N]: the label of each id. Reads every record once (images stay encoded)."""
  labels = np.full([source.num_examples], -1, np.int64)
  pairs = source.records.map(lambda r: (r["id"], r["label"])).batch(65536)
  for ids, batch_labels in pairs.as_numpy_iterator():
    labels[ids] = batch_labels
  return labels


def _warn_one_class(source: sources.Source, ids: np.ndarray, label_file: str) -> None:
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
  source: sources.Source, fraction: float = 1.0, label_file: str | None = None, seed: int = 0
) -> np.ndarray | None:
  """The labelled training examples: a class-balanced fraction, or the ids of a file.

  See the rule in the comment at the top of this module. Same source and seed, same subset; with
  a fraction the source's labels are read once (one pass over its records).

  Args:
    source: a labelled split from `sources.load_source`.
    fraction: in (0, 1]; 1 with no `label_file` means every example.
    label_file: a text file of example ids (`read_label_file`); then `fraction` must be 1.
    seed: the run's seed.

  Returns:
    Sorted int64 ids [n], or None for every example (fraction 1, no file).

  Raises:
    sources.DatasetError: fraction outside (0, 1], both a fraction and a file, a file naming
      unknown ids, or a fraction of an unlabelled source.
  """
  if not 0 < fraction <= 1:  # Also rejects NaN.
    raise sources.DatasetError(f"the label fraction must be in (0, 1], got {fraction}")
  if label_file:
    if fraction != 1:
      raise sources.DatasetError(
        f"give a label fraction ({fraction}) or a label file ({label_file}), not both"
      )
    ids = read_label_file(label_file)
    _check_ids(source, ids, what=f"label file {label_file}")
    _warn_one_class(source, ids, label_file)
    return ids
  if fraction == 1:
    return None
  if source.num_classes == 0:
    raise sources.DatasetError(
      f"a label fraction needs labels, but {source.name} {source.split!r} is unlabelled"
    )
  labels = _labels_by_id(source)
  if (labels < 0).any():
    raise sources.DatasetError(
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
    tf.range(source.num_examples, dtype=tf.int64),
    pipeline.root_key(seed, pipeline.SUBSET_STREAM),
    alg=pipeline.RNG_ALG,
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
    sources.DatasetError: model_dir already holds a different subset.
  """
  path = os.path.join(model_dir, LABEL_SUBSET_FILE)
  new = None if ids is None else np.unique(np.asarray(ids, np.int64))

  def check_existing():
    old = read_label_file(path)
    if new is None or not np.array_equal(old, new):
      this = "every example" if new is None else f"{len(new)} examples"
      raise sources.DatasetError(
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
