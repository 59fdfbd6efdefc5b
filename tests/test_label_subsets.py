"""Tests of tf_simclr.data.label_subsets: class-balanced fractions, label files, subsets.

shapes10 comes from conftest.py's `data_dir`; label files and image folders are written here.
"""

import os

import numpy as np
import pytest
import tensorflow as tf

import runs
from tf_simclr import augment
from tf_simclr.data import label_subsets
from tf_simclr.data import pipeline
from tf_simclr.data import sources

IMAGE_SIZE = 16  # Small views keep the pipeline tests fast; the contract does not depend on it.


def _expected_quota(labels, fraction):
  """Per class: round half up of fraction * count, at least 1, in exact rational arithmetic."""
  import fractions  # pylint: disable=g-import-not-at-top

  exact = fractions.Fraction(str(fraction))
  return {
    c: min(n, max(1, int(exact * n + fractions.Fraction(1, 2))))
    for c, n in zip(*np.unique(labels, return_counts=True))
  }


@pytest.mark.parametrize("split", ["train", "train[:100]"])  # Balanced; unequal class counts.
def test_label_subset_is_class_balanced(data_dir, split):
  source = sources.load_source("shapes10", split, data_dir=data_dir)
  labels = runs.records_numpy(source)["label"]
  subsets = {}
  for fraction in (0.01, 0.05, 0.1, 0.5):
    ids = label_subsets.label_subset(source, fraction, seed=1)
    assert ids.dtype == np.int64 and (np.diff(ids) > 0).all()  # Sorted, distinct.
    assert 0 <= ids.min() and ids.max() < source.num_examples
    got = dict(zip(*np.unique(labels[ids], return_counts=True)))
    assert got == _expected_quota(labels, fraction)
    subsets[fraction] = set(ids.tolist())
  if split == "train[:100]":
    # Unequal classes of about 10: fraction 0.05 hits the half-up rounding, 0.01 the minimum.
    assert len(subsets[0.01]) == 10 and len(set(np.bincount(labels))) > 1
  # One permutation serves every fraction: smaller subsets are inside larger ones.
  assert subsets[0.01] <= subsets[0.05] <= subsets[0.1] <= subsets[0.5]
  assert label_subsets.label_subset(source, 1.0, seed=1) is None  # All examples.


def test_label_subset_depends_on_the_seed_only(data_dir):
  source = sources.load_source("shapes10", "train", data_dir=data_dir)
  again = sources.load_source("shapes10", "train", data_dir=data_dir)
  first = label_subsets.label_subset(source, 0.1, seed=0)
  np.testing.assert_array_equal(first, label_subsets.label_subset(again, 0.1, seed=0))
  other = label_subsets.label_subset(source, 0.1, seed=1)
  assert len(other) == len(first) == 500
  assert len(np.intersect1d(first, other)) < 150  # About 10% expected by chance, not most.
  # Not the first examples of each class: spread over the split.
  assert first.max() > 4000 and first.min() < 1000


def test_label_subset_file_round_trip(data_dir, tmp_path):
  source = sources.load_source("shapes10", "train", data_dir=data_dir)
  ids = label_subsets.label_subset(source, 0.05, seed=3)
  model_dir = str(tmp_path / "run")
  path = label_subsets.write_label_subset(model_dir, ids)
  assert path == os.path.join(model_dir, "label_subset.txt")
  with open(path) as f:
    text = f.read()
  assert text == "".join(f"{i}\n" for i in ids)  # One id per line.
  np.testing.assert_array_equal(label_subsets.label_subset(source, label_file=path), ids)
  # Resuming with the same subset keeps the file; no temporary file is left.
  assert label_subsets.write_label_subset(model_dir, ids[::-1]) == path
  assert os.listdir(model_dir) == ["label_subset.txt"]
  # A different subset (or all labels) in the same model_dir is refused; the file stays.
  other = label_subsets.label_subset(source, 0.05, seed=4)
  for different, what in ((other, "250 examples"), (None, "every example")):
    with pytest.raises(
      sources.DatasetError,
      match=f"holds the labelled subset of an earlier "
      f"run \\(250 examples\\) and this run's differs \\({what}\\)",
    ) as info:
      label_subsets.write_label_subset(model_dir, different)
    assert "\n" not in str(info.value)
  with open(path) as f:
    assert f.read() == text
  # All labels and no earlier file: nothing written.
  assert label_subsets.write_label_subset(str(tmp_path / "fresh"), None) is None
  assert not os.path.exists(tmp_path / "fresh")
  # Hand-written files may have blank lines, comments and repeats.
  hand = tmp_path / "hand.txt"
  hand.write_text("# few labels\n7\n\n 3 \n7\n")
  np.testing.assert_array_equal(label_subsets.label_subset(source, label_file=str(hand)), [3, 7])


def test_label_file_errors(data_dir, tmp_path):
  source = sources.load_source("shapes10", "train", data_dir=data_dir)
  cases = {
    "3\n5000\n-1\n12\n": r"names 2 example ids that shapes10 'train' does not have \(its ids "
    r"are 0..4999\): -1, 5000$",
    "3\nfour\n": r"line 2: 'four' is not an example id",
    "# nothing\n\n": r"names no example ids",
  }
  for i, (text, message) in enumerate(cases.items()):
    path = tmp_path / f"labels{i}.txt"
    path.write_text(text)
    with pytest.raises(sources.DatasetError, match=message) as info:
      label_subsets.label_subset(source, label_file=str(path))
    assert "\n" not in str(info.value)
  with pytest.raises(sources.DatasetError, match="label file .*missing.txt does not exist"):
    label_subsets.label_subset(source, label_file=str(tmp_path / "missing.txt"))


def test_label_fraction_out_of_range(data_dir, tmp_path):
  source = sources.load_source("shapes10", "train[:100]", data_dir=data_dir)
  for fraction in (0.0, -0.1, 1.5, float("nan")):
    with pytest.raises(sources.DatasetError, match=r"label fraction must be in \(0, 1\]"):
      label_subsets.label_subset(source, fraction)
  path = tmp_path / "ids.txt"
  path.write_text("1\n")
  with pytest.raises(sources.DatasetError, match="label fraction .* or a label file .*not both"):
    label_subsets.label_subset(source, 0.1, label_file=str(path))
  runs.write(
    f"{tmp_path}/unlabeled/a.png", tf.io.encode_png(runs.random_image((6, 5, 3), 0)).numpy()
  )
  unlabelled = sources.load_source("image_folder", "unlabeled", data_dir=str(tmp_path))
  with pytest.raises(sources.DatasetError, match="needs labels, but image_folder 'unlabeled'"):
    label_subsets.label_subset(unlabelled, 0.5)

  # The flags are checked before anything runs.
  from flags import definitions  # pylint: disable=g-import-not-at-top

  defaults = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  defaults["model_dir"] = str(tmp_path)
  definitions.validate(defaults)
  for fraction in (0.0, 1.01, float("nan")):
    with pytest.raises(ValueError, match=r"--train_label_fraction must be in \(0, 1\], got"):
      definitions.validate(dict(defaults, train_label_fraction=fraction))
  with pytest.raises(ValueError, match="--train_label_fraction or --train_label_file, not both"):
    definitions.validate(dict(defaults, train_label_fraction=0.1, train_label_file=str(path)))
  config = definitions.to_config(dict(defaults, train_label_fraction=0.1, train_mode="finetune"))
  assert config.data.train_label_fraction == 0.1 and config.data.train_label_file is None


def test_finetune_input_on_a_subset(shapes100):
  # Fine-tuning on a label subset reads `train_dataset` of `subset_source`, one view, crop and
  # flip only (`Trainer.input_fn`).
  ids = label_subsets.label_subset(shapes100, 0.2, seed=0)  # About 20 of the 100 examples.
  n = len(ids)
  assert 15 <= n <= 25
  subset = label_subsets.subset_source(shapes100, ids)
  assert subset.num_examples == n
  np.testing.assert_array_equal(runs.records_numpy(subset)["id"], ids)  # Ids kept, in order.

  # Two epochs of the subset, and nothing else; each epoch in its own order.
  kwargs = dict(num_views=1, color_jitter_strength=0.0, use_blur=False)
  batches = runs.take(
    pipeline.train_dataset(subset, n, n, 1, 0, seed=2, image_size=IMAGE_SIZE, **kwargs), 2
  )
  labels = runs.records_numpy(shapes100)["label"]
  for b in batches:
    np.testing.assert_array_equal(np.sort(b["id"]), ids)
    np.testing.assert_array_equal(b["label"], labels[b["id"]])
  assert not np.array_equal(batches[0]["id"], batches[1]["id"])

  # The contract holds over the subset: pipelines, replicas and restarts do not change it.
  kwargs = dict(seed=5, **kwargs)
  one = runs.global_batches(subset, 6, 8, 1, 8, **kwargs)
  runs.assert_batches_equal(one, runs.global_batches(subset, 6, 8, 2, 4, **kwargs))
  runs.assert_batches_equal(
    one[4:], runs.global_batches(subset, 2, 8, 1, 8, start_step=4, **kwargs)
  )
  # An example's view is the one the full source gives it (seeded by its id, not position).
  images = {int(ex["id"]): ex["image"] for ex in runs.decoded(shapes100)}
  example_id = int(one[0]["id"][0])
  view = augment.simclr_augment(
    images[example_id],
    pipeline.view_seeds(5, 0, example_id)[0],
    IMAGE_SIZE,
    IMAGE_SIZE,
    color_jitter_strength=0.0,
    use_blur=False,
  )
  np.testing.assert_allclose(one[0]["views"][0, 0], view.numpy(), atol=1e-5)

  with pytest.raises(sources.DatasetError, match="repeats example ids"):
    label_subsets.subset_source(shapes100, [1, 1])
  with pytest.raises(sources.DatasetError, match="names 1 example ids that .* does not have"):
    label_subsets.subset_source(shapes100, [1, 100])


def test_label_files_with_a_bom_and_of_one_class(data_dir, tmp_path, caplog):
  source = sources.load_source("shapes10", "train[:100]", data_dir=data_dir)
  labels = runs.records_numpy(source)["label"]
  # Notepad's "UTF-8" writes a byte-order mark before the first id.
  path = tmp_path / "bom.txt"
  path.write_bytes("\ufeff0\n5\n".encode())
  np.testing.assert_array_equal(label_subsets.label_subset(source, label_file=str(path)), [0, 5])
  assert "all of class" not in caplog.text
  same = np.flatnonzero(labels == labels[0])[:3]
  (tmp_path / "one.txt").write_text("".join(f"{i}\n" for i in same))
  np.testing.assert_array_equal(
    label_subsets.label_subset(source, label_file=str(tmp_path / "one.txt")), same
  )
  assert f"its 3 ids are all of class {labels[0]} (of 10)" in caplog.text
