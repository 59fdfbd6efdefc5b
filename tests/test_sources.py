"""Tests of tf_simclr.data's sources: the built-in datasets, TFDS splits, image folders, errors.

Nothing here downloads: the built-ins are generated into tmp dirs (conftest.py's `data_dir` holds
shapes10) and image folders are written here.
"""

import os
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import runs
from tf_simclr.data import deadleaves10
from tf_simclr.data import label_subsets
from tf_simclr.data import pipeline
from tf_simclr.data import shapes10
from tf_simclr.data import sources


def _bmp(image):
  """A 24-bit BMP file of uint8 [H, W, 3] (TF can decode BMP but not encode it)."""
  h, w, _ = image.shape
  row = (w * 3 + 3) // 4 * 4
  pixels = b"".join(image[y, :, ::-1].tobytes().ljust(row, b"\0") for y in range(h - 1, -1, -1))
  header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
  info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
  return header + info + pixels


def _gif(frames, palette):
  """A GIF of frames uint8 [H, W] (palette indices) with a 256-colour palette uint8 [256, 3].

  LZW with a clear code every 200 codes keeps codes 9 bits wide: valid, just not compressed.
  """
  h, w = frames[0].shape
  out = [b"GIF89a", struct.pack("<HHBBB", w, h, 0xF7, 0, 0), palette.astype(np.uint8).tobytes()]
  for frame in frames:
    out.append(b"\x21\xf9\x04\x00\x00\x00\x00\x00")  # Graphic control: no transparency.
    out.append(b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0))
    codes = []
    for i, index in enumerate(frame.reshape(-1).tolist()):
      if i % 200 == 0:
        codes.append(256)  # Clear.
      codes.append(index)
    codes.append(257)  # End of information.
    bits = "".join(format(c, "09b")[::-1] for c in codes)  # LSB first.
    bits += "0" * (-len(bits) % 8)
    data = bytes(int(bits[i : i + 8][::-1], 2) for i in range(0, len(bits), 8))
    out.append(b"\x08")  # LZW minimum code size.
    for i in range(0, len(data), 255):
      out.append(bytes([len(data[i : i + 255])]) + data[i : i + 255])
    out.append(b"\x00")
  out.append(b"\x3b")
  return b"".join(out)


def test_shapes10_builds_offline(data_dir):
  builder = tfds.builder("shapes10", data_dir=data_dir)
  assert builder.is_prepared()
  assert str(builder.info.version) == "1.0.0"
  assert "shapes" in builder.info.description
  for split, n in (("train", 5000), ("test", 1000)):
    source = sources.load_source("shapes10", split, data_dir=data_dir)
    assert (source.num_examples, source.num_classes) == (n, 10)
    records = runs.records_numpy(source)
    np.testing.assert_array_equal(records["id"], np.arange(n))
    np.testing.assert_array_equal(np.bincount(records["label"], minlength=10), [n // 10] * 10)
    images, labels, _ = runs.images_numpy(source, limit=50)
    assert images.dtype == np.uint8 and images.shape == (50, 32, 32, 3)
    # Stored in generation order, losslessly (PNG).
    generated, generated_labels = shapes10.generate(split)
    np.testing.assert_array_equal(images, generated[:50])
    np.testing.assert_array_equal(labels, generated_labels[:50])


def test_shapes10_deterministic(data_dir, tmp_path):
  other = sources.load_source("shapes10", "test", data_dir=str(tmp_path))
  first = sources.load_source("shapes10", "test", data_dir=data_dir)
  a, b = runs.records_numpy(first), runs.records_numpy(other)
  assert a["image"][:200] == b["image"][:200]  # The encoded bytes, not just the pixels.
  np.testing.assert_array_equal(a["label"], b["label"])
  # The splits are different images.
  train_images, _ = shapes10.generate("train")
  test_images, _ = shapes10.generate("test")
  assert not np.array_equal(train_images[:10], test_images[:10])


def _foreground(images):
  """Boolean [N, 32, 32] masks: pixels far from the background colour (median of the border)."""
  border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
  background = np.median(border.astype(np.float32), axis=1)  # [N, 3]
  distance = np.linalg.norm(images.astype(np.float32) - background[:, None, None], axis=-1)
  return distance > 50


def _shape_features(masks, size=12):
  """Masks cropped to their bounding box and resampled to [size, size]: position and scale
  removed, shape kept. [N, size*size]."""
  out = np.zeros((len(masks), size * size), np.float32)
  for i, m in enumerate(masks):
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
      continue
    crop = m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    rows = (np.arange(size) + 0.5) * crop.shape[0] / size
    cols = (np.arange(size) + 0.5) * crop.shape[1] / size
    out[i] = crop[rows.astype(int)][:, cols.astype(int)].reshape(-1)
  return out


def test_shapes10_class_is_the_shape_not_the_colour():
  train_images, train_labels = shapes10.generate("train")
  test_images, test_labels = shapes10.generate("test")
  train_x = _shape_features(_foreground(train_images))
  test_x = _shape_features(_foreground(test_images))
  means = np.stack([train_x[train_labels == c].mean(0) for c in range(10)])
  distances = ((test_x[:, None] - means[None]) ** 2).sum(-1)
  accuracy = np.mean(distances.argmin(1) == test_labels)
  assert accuracy > 0.6, accuracy  # Chance is 0.1.

  # Colour is a nuisance: the mean shape colour of every class is about the same.
  masks = _foreground(train_images)
  weights = masks[..., None].astype(np.float32)
  colours = (train_images * weights).sum((1, 2)) / np.maximum(weights.sum((1, 2)), 1)  # [N, 3]
  class_means = np.stack([colours[train_labels == c].mean(0) for c in range(10)])  # [10, 3]
  assert np.abs(class_means - colours.mean(0)).max() < 15, class_means


@pytest.mark.xdist_group("deadleaves")  # with test_learning: one build per session
def test_deadleaves10_builds_offline_deterministically(deadleaves_dir):
  data_dir = deadleaves_dir  # built by conftest.py, shared with test_learning's runs
  test = sources.load_source("deadleaves10", "test", data_dir=data_dir)
  assert (test.num_examples, test.num_classes) == (1000, 10)
  builder = tfds.builder("deadleaves10", data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 5000
  records = runs.records_numpy(test)
  np.testing.assert_array_equal(records["id"], np.arange(1000))
  np.testing.assert_array_equal(np.bincount(records["label"], minlength=10), [100] * 10)
  images, labels, _ = runs.images_numpy(test, limit=1000)
  # Stored losslessly in generation order, and generation repeats bit for bit (TFDS stored
  # the first generation; this is the second). The train split holds other images.
  generated, generated_labels = deadleaves10.generate("test")
  np.testing.assert_array_equal(images, generated)
  np.testing.assert_array_equal(labels, generated_labels)
  train = sources.load_source("deadleaves10", "train[:10]", data_dir=data_dir)
  assert not np.array_equal(runs.images_numpy(train, limit=10)[0], generated[:10])
  # Grey: colour carries nothing.
  assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
  # Leaves fill the image: nearly every 8x8 window holds a leaf edge (grey range > 40), so a
  # crop anywhere shows leaves. A window of flat background or inside one leaf is rare.
  windows = images[..., 0].reshape(1000, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 64)
  edged = (windows.max(1).astype(int) - windows.min(1)) > 40
  assert edged.mean() > 0.9, edged.mean()


def _make_labelled_folder(root):
  """train/{dog,Cat,bird} with PNG/JPEG/BMP/GIF files; returns {relative path: image}."""
  expected = {}
  png = runs.random_image((6, 5, 3), 1)
  runs.write(f"{root}/train/dog/b.PNG", tf.io.encode_png(png).numpy())
  expected["dog/b.PNG"] = png
  bmp = runs.random_image((6, 5, 3), 2)
  runs.write(f"{root}/train/dog/a.bmp", _bmp(bmp))
  expected["dog/a.bmp"] = bmp
  jpeg = np.full((8, 8, 3), 200, np.uint8)
  runs.write(f"{root}/train/Cat/x.JPEG", tf.io.encode_jpeg(jpeg, quality=100).numpy())
  expected["Cat/x.JPEG"] = jpeg
  gray = np.random.default_rng(3).integers(0, 256, (4, 7, 1), dtype=np.uint8)
  runs.write(f"{root}/train/Cat/deeper/g.png", tf.io.encode_png(gray).numpy())
  expected["Cat/deeper/g.png"] = np.repeat(gray, 3, axis=-1)
  palette = np.random.default_rng(4).integers(0, 256, (256, 3), dtype=np.uint8)
  frames = [np.random.default_rng(5 + i).integers(0, 256, (5, 6), dtype=np.uint8) for i in range(2)]
  runs.write(f"{root}/train/bird/anim.gif", _gif(frames, palette))
  expected["bird/anim.gif"] = palette[frames[0]]  # The first frame.
  runs.write(f"{root}/train/bird/notes.txt", b"not an image")
  return expected


def test_image_folder_labelled(tmp_path):
  root = str(tmp_path)
  expected = _make_labelled_folder(root)
  source = sources.load_source("image_folder", "train", data_dir=root)
  # Classes are the sorted folder names (byte order): Cat, bird, dog.
  assert (source.num_examples, source.num_classes) == (5, 3)
  records = runs.records_numpy(source)
  paths = [os.path.relpath(p.decode(), f"{root}/train") for p in records["image"]]
  assert paths == ["Cat/deeper/g.png", "Cat/x.JPEG", "bird/anim.gif", "dog/a.bmp", "dog/b.PNG"]
  np.testing.assert_array_equal(records["label"], [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(records["id"], np.arange(5))
  for path, example in zip(paths, runs.decoded(source)):
    image = example["image"].numpy()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    if path.endswith("JPEG"):
      np.testing.assert_allclose(image, expected[path], atol=2)
    else:
      np.testing.assert_array_equal(image, expected[path])


def test_image_folder_unlabelled(tmp_path):
  for i in range(3):
    runs.write(
      f"{tmp_path}/unlabeled/img{i}.png", tf.io.encode_png(runs.random_image((6, 5, 3), i)).numpy()
    )
  source = sources.load_source("image_folder", "unlabeled", data_dir=str(tmp_path))
  assert (source.num_examples, source.num_classes) == (3, 0)
  records = runs.records_numpy(source)
  np.testing.assert_array_equal(records["label"], [-1, -1, -1])
  batches = runs.take(pipeline.train_dataset(source, 2, 2, 1, 0, seed=0, image_size=8), 3)
  assert all((b["label"] == -1).all() for b in batches)


def test_image_folder_corrupt_files(tmp_path):
  root = str(tmp_path)
  for i in range(4):
    runs.write(f"{root}/train/a/{i}.png", tf.io.encode_png(runs.random_image((6, 5, 3), i)).numpy())
  # Not an image at all: skipped when listing, so it never gets an id.
  runs.write(f"{root}/train/a/0bad.jpg", b"this is not a jpeg")
  # An image header with a cut body: listed (id 2), then dropped with a warning when decoding.
  runs.write(
    f"{root}/train/a/1truncated.png", tf.io.encode_png(runs.random_image((6, 5, 3), 9)).numpy()[:40]
  )
  source = sources.load_source("image_folder", "train", data_dir=root)
  assert source.num_examples == 5
  names = [os.path.basename(p.decode()) for p in runs.records_numpy(source)["image"]]
  assert names == ["0.png", "1.png", "1truncated.png", "2.png", "3.png"]
  ids = [int(ex["id"]) for ex in runs.decoded(source)]
  assert ids == [0, 1, 3, 4]  # Ids stay those of the listing.
  # Training goes on past it: every step still has a full batch, never the bad id.
  batches = runs.take(pipeline.train_dataset(source, 2, 2, 1, 0, seed=0, image_size=8), 6)
  assert all(b["views"].shape == (2, 2, 8, 8, 3) and 2 not in b["id"] for b in batches)
  # Eval counts the examples it could read, in static batches.
  eval_batches = runs.take(pipeline.eval_dataset(source, 2, 1, 0, image_size=8), 10)
  assert len(eval_batches) == 3
  assert sum(b["mask"].sum() for b in eval_batches) == 4


def test_image_folder_errors(tmp_path):
  root = str(tmp_path)
  with pytest.raises(sources.DatasetError, match="needs data_dir"):
    sources.load_source("image_folder", "train")
  with pytest.raises(sources.DatasetError, match=f"{root}/nowhere does not exist"):
    sources.load_source("image_folder", "train", data_dir=f"{root}/nowhere")
  os.makedirs(f"{root}/train/empty_class")
  os.makedirs(f"{root}/val")
  with pytest.raises(sources.DatasetError, match="has no split 'test'.*train, val"):
    sources.load_source("image_folder", "test", data_dir=root)
  with pytest.raises(sources.DatasetError, match=f"{root}/train holds no readable images"):
    sources.load_source("image_folder", "train", data_dir=root)
  with pytest.raises(sources.DatasetError, match=f"{root}/val holds no readable images"):
    sources.load_source("image_folder", "val", data_dir=root)
  runs.write(f"{root}/val/x.png", b"garbage")
  with pytest.raises(sources.DatasetError, match="holds no readable images"):
    sources.load_source("image_folder", "val", data_dir=root)


def test_unknown_dataset(tmp_path):
  with pytest.raises(
    sources.DatasetError, match="Unknown dataset 'cifar1'.*cifar10.*image_folder.*shapes10"
  ) as info:
    sources.load_source("cifar1", "train", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)


def test_unknown_split(data_dir):
  with pytest.raises(
    sources.DatasetError, match="'shapes10' has no split 'validation'.*test, train"
  ):
    sources.load_source("shapes10", "validation", data_dir=data_dir)


def test_manual_download_detected_before_downloading(tmp_path):
  # Our message (not "Could not download and prepare ...", which wraps a failed download) and
  # an error raised on its own, not while handling one: the check ran before any download.
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(
    sources.DatasetError,
    match="imagenet2012' must be downloaded by hand: "
    f"put ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar in {manual}/",
  ) as info:
    sources.load_source("imagenet2012", "train", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)
  assert info.value.__context__ is None
  written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
  assert not written  # Nothing was downloaded.


@pytest.mark.parametrize("name", ["imagenet2012_subset/1pct", "imagenet2012_subset/10pct"])
def test_imagenet_label_subsets_are_tfds_names(tmp_path, name):
  # The name with its config reaches tfds.builder (no 'Unknown dataset' / 'Cannot use'); what
  # stops it, without a download, is ImageNet's archives that must be fetched by hand.
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(
    sources.DatasetError,
    match=f"'{name}' must be downloaded by hand: put "
    f"ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar in {manual}/",
  ):
    sources.load_source(name, "train", data_dir=str(tmp_path))
  assert not [f for _, _, files in os.walk(tmp_path) for f in files]


def test_directory_links_never_add_an_image_twice(tmp_path, caplog):
  root = str(tmp_path)
  for cls, n in (("a", 2), ("b", 1), ("c", 1)):
    for i in range(n):
      runs.png(i, f"{root}/train/{cls}/{i}.png")
  runs.png(7, f"{root}/elsewhere/e.png")
  os.symlink("..", f"{root}/train/a/loop")  # the split folder: would list b and c as a
  os.symlink("../..", f"{root}/train/a/up")  # above it
  os.symlink("../b", f"{root}/train/a/b_too")  # another class
  os.symlink(".", f"{root}/elsewhere/self")  # a loop outside the split
  os.symlink(f"{root}/elsewhere", f"{root}/train/c/more")  # outside: followed, once
  source = sources.load_source("image_folder", "train", data_dir=root)
  records = runs.records_numpy(source)
  paths = [os.path.relpath(p.decode(), f"{root}/train") for p in records["image"]]
  assert paths == ["a/0.png", "a/1.png", "b/0.png", "c/0.png", "c/more/e.png"]
  np.testing.assert_array_equal(records["label"], [0, 0, 1, 2, 2])
  assert "not following 4 directory links" in caplog.text


def test_fifos_are_skipped_and_any_file_name_is_read(tmp_path, caplog):
  import threading  # pylint: disable=g-import-not-at-top

  root = str(tmp_path)
  image = runs.png(1, f"{root}/train/a/0.png")
  odd = os.fsencode(f"{root}/train/a/") + b"\xff\xfe.png"  # not valid UTF-8
  with open(odd, "wb") as f:
    f.write(tf.io.encode_png(runs.random_image((6, 5, 3), 2)).numpy())
  fifo = f"{root}/train/a/pipe.png"
  os.mkfifo(fifo)
  got = []
  thread = threading.Thread(
    target=lambda: got.append(sources.load_source("image_folder", "train", data_dir=root)),
    daemon=True,
  )
  thread.start()
  thread.join(60)
  if thread.is_alive():  # blocked opening the FIFO: release it, then fail
    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    pytest.fail("listing hung on a FIFO")
  source = got[0]
  assert source.num_examples == 2
  assert "1 entries that are not regular files" in caplog.text and "pipe.png" in caplog.text
  images = {int(ex["id"]): ex["image"].numpy() for ex in runs.decoded(source)}
  np.testing.assert_array_equal(images[0], image)
  np.testing.assert_array_equal(images[1], runs.random_image((6, 5, 3), 2))
  assert source.files[1].endswith("a/\\xff\\xfe.png")


def test_undecodable_files_are_named_and_none_decoding_is_an_error(tmp_path, caplog):
  root = str(tmp_path)
  for i in range(3):
    runs.png(i, f"{root}/train/a/{i}.png")
  for name in ("cut1.png", "cut2.png"):  # PNG magic, cut body: listed, fail to decode
    runs.write(
      f"{root}/train/a/{name}", tf.io.encode_png(runs.random_image((6, 5, 3), 9)).numpy()[:40]
    )
    runs.write(
      f"{root}/bad/a/{name}", tf.io.encode_png(runs.random_image((6, 5, 3), 9)).numpy()[:40]
    )
  source = sources.load_source("image_folder", "train", data_dir=root)
  assert source.num_examples == 5
  caplog.clear()
  assert sorted(int(ex["id"]) for ex in runs.decoded(source)) == [0, 1, 2]
  warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
  assert len(warnings) == 2, caplog.text
  assert "a/cut1.png; skipped (1 so far)" in warnings[0]
  assert "a/cut2.png; skipped (2 so far)" in warnings[1]
  # Nothing decodes: one line at load time, not a training stream that searches forever.
  with pytest.raises(sources.DatasetError, match=r"bad: none of its 2 image files decodes"):
    sources.load_source("image_folder", "bad", data_dir=root)


def test_eval_split_labels_classes_as_the_training_split(tmp_path, caplog):
  root = str(tmp_path)
  for split, classes in (("train", "abc"), ("test", "acd")):
    for c in classes:
      runs.png(ord(c), f"{root}/{split}/{c}/0.png")
  train = sources.load_source("image_folder", "train", data_dir=root)
  assert train.class_names == ("a", "b", "c")
  test = sources.load_source("image_folder", "test", data_dir=root, class_names=train.class_names)
  records = runs.records_numpy(test)
  # a and c keep train's labels 0 and 2 (by their own folders: 0 and 1); d is skipped.
  np.testing.assert_array_equal(records["label"], [0, 2])
  assert [os.path.basename(os.path.dirname(p.decode())) for p in records["image"]] == ["a", "c"]
  assert test.num_classes == 3
  assert "lacks 1 classes of the training split: b" in caplog.text
  assert "1 classes that the training split does not have: d" in caplog.text


def test_split_slices_names_and_label_files(data_dir, tmp_path, caplog):
  with pytest.raises(
    sources.DatasetError,
    match=r"'train\[5000:\]' selects no examples; its "
    r"splits are: test \(1000 examples\), train \(5000 examples\)",
  ):
    sources.load_source("shapes10", "train[5000:]", data_dir=data_dir)
  with pytest.raises(sources.DatasetError) as info:
    sources.load_source("shapes11", "train", data_dir=data_dir)
  close = str(info.value).split("Close names: ")[1].split(".")[0].split(", ")
  assert "shapes10" in close and len(close) == len(set(close)), close
  (tmp_path / "ids.txt").write_text("3\n7\n3\n9\n7\n")
  np.testing.assert_array_equal(label_subsets.read_label_file(str(tmp_path / "ids.txt")), [3, 7, 9])
  assert "lists 2 ids more than once (e.g. 3, 7)" in caplog.text


def test_reversed_slices_are_refused_before_anything_is_written(data_dir, tmp_path):
  from flags import definitions  # pylint: disable=g-import-not-at-top
  from tf_simclr import plan as plan_lib  # pylint: disable=g-import-not-at-top

  with pytest.raises(
    sources.DatasetError, match=r"'train\[50%:40%\]' is a reversed slice .*-500 examples"
  ):
    sources.load_source("shapes10", "train[50%:40%]", data_dir=data_dir)
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(
    model_dir=str(tmp_path / "m"),
    dataset="shapes10",
    data_dir=data_dir,
    train_steps=1,
    image_size=16,
    mode="train_then_eval",
  )
  # The evaluation split too, when the plan is made: not after training.
  cfg = definitions.to_config(dict(values, train_split="train[:100]", eval_split="test[9:3]"))
  with pytest.raises(sources.DatasetError, match=r"'test\[9:3\]' is a reversed slice"):
    plan_lib.make_plan(cfg)
  assert not os.path.exists(tmp_path / "m")


class BuggyBuilder(tfds.core.GeneratorBasedBuilder):
  """A TFDS builder with a bug (not a data problem): its info raises KeyError."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return {}["features"]

  def _split_generators(self, dl_manager):
    return {}

  def _generate_examples(self):
    yield from ()


def test_only_builder_errors_about_the_data_become_dataset_errors(data_dir):
  # An unknown config is the user's: one DatasetError line.
  with pytest.raises(sources.DatasetError, match="Cannot use dataset 'shapes10/nope'"):
    sources.load_source("shapes10/nope", "train", data_dir=data_dir)
  # A builder's own bug keeps its type (and traceback), not "Cannot use/prepare dataset".
  with pytest.raises(RuntimeError, match="KeyError.*features") as info:  # TFDS's wrapping
    sources.load_source("buggy_builder", "train", data_dir=data_dir)
  assert not isinstance(info.value, sources.DatasetError)


def test_hidden_and_system_folders_are_skipped_and_named(tmp_path, caplog):
  root = str(tmp_path)
  for cls in ("a", "b"):
    runs.png(0, f"{root}/train/{cls}/0.png")
  # What Jupyter, macOS's archiver and git leave beside (and inside) class folders.
  runs.png(1, f"{root}/train/.ipynb_checkpoints/0-checkpoint.png")
  runs.png(2, f"{root}/train/__MACOSX/a/0.png")
  runs.png(3, f"{root}/train/a/.ipynb_checkpoints/0-checkpoint.png")
  source = sources.load_source("image_folder", "train", data_dir=root)
  assert source.class_names == ("a", "b") and source.num_examples == 2
  assert [os.path.relpath(f, f"{root}/train") for f in source.files] == ["a/0.png", "b/0.png"]
  assert "skipping 3 hidden or system folders" in caplog.text
  assert "train/.ipynb_checkpoints" in caplog.text
  # An unlabelled split: its images, not a class made of the checkpoint folder.
  runs.png(4, f"{root}/loose/x.png")
  runs.png(5, f"{root}/loose/.ipynb_checkpoints/x-checkpoint.png")
  loose = sources.load_source("image_folder", "loose", data_dir=root)
  assert (loose.num_classes, loose.num_examples) == (0, 1)
