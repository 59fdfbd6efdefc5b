"""Tests of tf_simclr.datasets and the built-in datasets: sources, determinism, sharding, errors.

Nothing here downloads: the built-ins are generated into tmp dirs and image folders are written
here.
"""

import functools
import os
import struct
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_simclr import augment
from tf_simclr import datasets
from tf_simclr import deadleaves10
from tf_simclr import shapes10

IMAGE_SIZE = 16  # Small views keep the pipeline tests fast; the contract does not depend on it.


# ----------------------------------------------------------------------------------------------
# Helpers.


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
  """A TFDS data dir with shapes10 prepared once for the session."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  started = time.time()
  datasets.load_source("shapes10", "train", data_dir=data_dir)
  print(f"shapes10 generated and prepared in {time.time() - started:.1f} s")
  return data_dir


def _records_numpy(source):
  """All records of a source as {'label': [N], 'id': [N], 'image': list of bytes}."""
  out = {"label": [], "id": [], "image": []}
  for batch in source.records.batch(1000):
    out["label"].append(batch["label"].numpy())
    out["id"].append(batch["id"].numpy())
    out["image"] += list(batch["image"].numpy())
  return {
    "label": np.concatenate(out["label"]),
    "id": np.concatenate(out["id"]),
    "image": out["image"],
  }


def _decoded(source):
  """The source's decoded examples, in order: {'image': uint8 [H, W, 3], 'label', 'id'}."""
  return datasets.decode_records(source, source.records)


def _images_numpy(source, limit=None):
  ds = _decoded(source) if limit is None else _decoded(source).take(limit)
  batch = next(iter(ds.batch(100_000)))
  return batch["image"].numpy(), batch["label"].numpy(), batch["id"].numpy()


def _take(ds, n):
  return [tf.nest.map_structure(lambda v: v.numpy(), b) for b in ds.take(n)]


def _global_batches(source, steps, global_batch, pipelines, per_replica, **kwargs):
  """Global batches as tf.distribute assembles them from P pipelines of R replicas each.

  Pipeline p serves replicas p*R .. p*R + R - 1 with its consecutive per-replica batches, so
  step k is the concatenation over p, then r, of pipeline p's batch k*R + r.
  """
  replicas = global_batch // pipelines // per_replica
  per_pipeline = [
    _take(
      datasets.train_dataset(
        source, global_batch, per_replica, pipelines, p, image_size=IMAGE_SIZE, **kwargs
      ),
      steps * replicas,
    )
    for p in range(pipelines)
  ]
  out = []
  for k in range(steps):
    parts = [per_pipeline[p][k * replicas + r] for p in range(pipelines) for r in range(replicas)]
    out.append({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
  return out


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["id"], y["id"])
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["views"], y["views"])  # Bit for bit.


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


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _random_image(seed, h=6, w=5):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# shapes10.


def test_shapes10_builds_offline(shapes_dir):
  builder = tfds.builder("shapes10", data_dir=shapes_dir)
  assert builder.is_prepared()
  assert str(builder.info.version) == "1.0.0"
  assert "shapes" in builder.info.description
  for split, n in (("train", 5000), ("test", 1000)):
    source = datasets.load_source("shapes10", split, data_dir=shapes_dir)
    assert (source.num_examples, source.num_classes) == (n, 10)
    records = _records_numpy(source)
    np.testing.assert_array_equal(records["id"], np.arange(n))
    np.testing.assert_array_equal(np.bincount(records["label"], minlength=10), [n // 10] * 10)
    images, labels, _ = _images_numpy(source, limit=50)
    assert images.dtype == np.uint8 and images.shape == (50, 32, 32, 3)
    # Stored in generation order, losslessly (PNG).
    generated, generated_labels = shapes10.generate(split)
    np.testing.assert_array_equal(images, generated[:50])
    np.testing.assert_array_equal(labels, generated_labels[:50])


def test_shapes10_deterministic(shapes_dir, tmp_path):
  other = datasets.load_source("shapes10", "test", data_dir=str(tmp_path))
  first = datasets.load_source("shapes10", "test", data_dir=shapes_dir)
  a, b = _records_numpy(first), _records_numpy(other)
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


# ----------------------------------------------------------------------------------------------
# deadleaves10.


def test_deadleaves10_builds_offline_deterministically(tmp_path):
  data_dir = str(tmp_path)
  test = datasets.load_source("deadleaves10", "test", data_dir=data_dir)
  assert (test.num_examples, test.num_classes) == (1000, 10)
  builder = tfds.builder("deadleaves10", data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 5000
  records = _records_numpy(test)
  np.testing.assert_array_equal(records["id"], np.arange(1000))
  np.testing.assert_array_equal(np.bincount(records["label"], minlength=10), [100] * 10)
  images, labels, _ = _images_numpy(test, limit=1000)
  # Stored losslessly in generation order, and generation repeats bit for bit (TFDS stored
  # the first generation; this is the second). The train split holds other images.
  generated, generated_labels = deadleaves10.generate("test")
  np.testing.assert_array_equal(images, generated)
  np.testing.assert_array_equal(labels, generated_labels)
  train = datasets.load_source("deadleaves10", "train[:10]", data_dir=data_dir)
  assert not np.array_equal(_images_numpy(train, limit=10)[0], generated[:10])
  # Grey: colour carries nothing.
  assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
  # Leaves fill the image: nearly every 8x8 window holds a leaf edge (grey range > 40), so a
  # crop anywhere shows leaves. A window of flat background or inside one leaf is rare.
  windows = images[..., 0].reshape(1000, 4, 8, 4, 8).transpose(0, 1, 3, 2, 4).reshape(-1, 64)
  edged = (windows.max(1).astype(int) - windows.min(1)) > 40
  assert edged.mean() > 0.9, edged.mean()


# ----------------------------------------------------------------------------------------------
# image_folder.


def _make_labelled_folder(root):
  """train/{dog,Cat,bird} with PNG/JPEG/BMP/GIF files; returns {relative path: image}."""
  expected = {}
  png = _random_image(1)
  _write(f"{root}/train/dog/b.PNG", tf.io.encode_png(png).numpy())
  expected["dog/b.PNG"] = png
  bmp = _random_image(2)
  _write(f"{root}/train/dog/a.bmp", _bmp(bmp))
  expected["dog/a.bmp"] = bmp
  jpeg = np.full((8, 8, 3), 200, np.uint8)
  _write(f"{root}/train/Cat/x.JPEG", tf.io.encode_jpeg(jpeg, quality=100).numpy())
  expected["Cat/x.JPEG"] = jpeg
  gray = np.random.default_rng(3).integers(0, 256, (4, 7, 1), dtype=np.uint8)
  _write(f"{root}/train/Cat/deeper/g.png", tf.io.encode_png(gray).numpy())
  expected["Cat/deeper/g.png"] = np.repeat(gray, 3, axis=-1)
  palette = np.random.default_rng(4).integers(0, 256, (256, 3), dtype=np.uint8)
  frames = [np.random.default_rng(5 + i).integers(0, 256, (5, 6), dtype=np.uint8) for i in range(2)]
  _write(f"{root}/train/bird/anim.gif", _gif(frames, palette))
  expected["bird/anim.gif"] = palette[frames[0]]  # The first frame.
  _write(f"{root}/train/bird/notes.txt", b"not an image")
  return expected


def test_image_folder_labelled(tmp_path):
  root = str(tmp_path)
  expected = _make_labelled_folder(root)
  source = datasets.load_source("image_folder", "train", data_dir=root)
  # Classes are the sorted folder names (byte order): Cat, bird, dog.
  assert (source.num_examples, source.num_classes) == (5, 3)
  records = _records_numpy(source)
  paths = [os.path.relpath(p.decode(), f"{root}/train") for p in records["image"]]
  assert paths == ["Cat/deeper/g.png", "Cat/x.JPEG", "bird/anim.gif", "dog/a.bmp", "dog/b.PNG"]
  np.testing.assert_array_equal(records["label"], [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(records["id"], np.arange(5))
  for path, example in zip(paths, _decoded(source)):
    image = example["image"].numpy()
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    if path.endswith("JPEG"):
      np.testing.assert_allclose(image, expected[path], atol=2)
    else:
      np.testing.assert_array_equal(image, expected[path])


def test_image_folder_unlabelled(tmp_path):
  for i in range(3):
    _write(f"{tmp_path}/unlabeled/img{i}.png", tf.io.encode_png(_random_image(i)).numpy())
  source = datasets.load_source("image_folder", "unlabeled", data_dir=str(tmp_path))
  assert (source.num_examples, source.num_classes) == (3, 0)
  records = _records_numpy(source)
  np.testing.assert_array_equal(records["label"], [-1, -1, -1])
  batches = _take(datasets.train_dataset(source, 2, 2, 1, 0, seed=0, image_size=8), 3)
  assert all((b["label"] == -1).all() for b in batches)


def test_image_folder_corrupt_files(tmp_path):
  root = str(tmp_path)
  for i in range(4):
    _write(f"{root}/train/a/{i}.png", tf.io.encode_png(_random_image(i)).numpy())
  # Not an image at all: skipped when listing, so it never gets an id.
  _write(f"{root}/train/a/0bad.jpg", b"this is not a jpeg")
  # An image header with a cut body: listed (id 2), then dropped with a warning when decoding.
  _write(f"{root}/train/a/1truncated.png", tf.io.encode_png(_random_image(9)).numpy()[:40])
  source = datasets.load_source("image_folder", "train", data_dir=root)
  assert source.num_examples == 5
  names = [os.path.basename(p.decode()) for p in _records_numpy(source)["image"]]
  assert names == ["0.png", "1.png", "1truncated.png", "2.png", "3.png"]
  ids = [int(ex["id"]) for ex in _decoded(source)]
  assert ids == [0, 1, 3, 4]  # Ids stay those of the listing.
  # Training goes on past it: every step still has a full batch, never the bad id.
  batches = _take(datasets.train_dataset(source, 2, 2, 1, 0, seed=0, image_size=8), 6)
  assert all(b["views"].shape == (2, 2, 8, 8, 3) and 2 not in b["id"] for b in batches)
  # Eval counts the examples it could read, in static batches.
  eval_batches = _take(datasets.eval_dataset(source, 2, 1, 0, image_size=8), 10)
  assert len(eval_batches) == 3
  assert sum(b["mask"].sum() for b in eval_batches) == 4


def test_image_folder_errors(tmp_path):
  root = str(tmp_path)
  with pytest.raises(datasets.DatasetError, match="needs data_dir"):
    datasets.load_source("image_folder", "train")
  with pytest.raises(datasets.DatasetError, match=f"{root}/nowhere does not exist"):
    datasets.load_source("image_folder", "train", data_dir=f"{root}/nowhere")
  os.makedirs(f"{root}/train/empty_class")
  os.makedirs(f"{root}/val")
  with pytest.raises(datasets.DatasetError, match="has no split 'test'.*train, val"):
    datasets.load_source("image_folder", "test", data_dir=root)
  with pytest.raises(datasets.DatasetError, match=f"{root}/train holds no readable images"):
    datasets.load_source("image_folder", "train", data_dir=root)
  with pytest.raises(datasets.DatasetError, match=f"{root}/val holds no readable images"):
    datasets.load_source("image_folder", "val", data_dir=root)
  _write(f"{root}/val/x.png", b"garbage")
  with pytest.raises(datasets.DatasetError, match="holds no readable images"):
    datasets.load_source("image_folder", "val", data_dir=root)


# ----------------------------------------------------------------------------------------------
# train_dataset: the determinism contract.


@pytest.fixture(scope="module")
def small(shapes_dir):
  """100 shapes10 examples: epochs are a few steps long."""
  return datasets.load_source("shapes10", "train[:100]", data_dir=shapes_dir)


def test_train_dataset_structure_and_repeatability(small):
  assert small.num_examples == 100
  a = _take(datasets.train_dataset(small, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE), 4)
  b = _take(datasets.train_dataset(small, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE), 4)
  for x, y in zip(a, b):
    assert x["views"].shape == (8, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert x["views"].dtype == np.float32 and x["label"].dtype == x["id"].dtype == np.int64
    assert 0.0 <= x["views"].min() and x["views"].max() <= 1.0
    np.testing.assert_array_equal(x["views"], y["views"])
    np.testing.assert_array_equal(x["id"], y["id"])
  # Labels are those of the ids.
  labels = _records_numpy(small)["label"]
  for x in a:
    np.testing.assert_array_equal(x["label"], labels[x["id"]])
  # Another seed: another order.
  c = _take(datasets.train_dataset(small, 16, 8, 1, 0, seed=4, image_size=IMAGE_SIZE), 1)
  assert not np.array_equal(a[0]["id"], c[0]["id"])


def test_augment_on_device_gives_the_host_views(small):
  # --augment_on_device: the host crops, the training step (train.step_images) distorts.
  # The model must see the views of the host path, in the same view-major order.
  from tf_simclr import train  # pylint: disable=g-import-not-at-top

  host = _take(datasets.train_dataset(small, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE), 2)
  split = _take(
    datasets.train_dataset(
      small, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE, augment_on_device=True
    ),
    2,
  )
  step = tf.function(train.step_images)
  for h, d in zip(host, split):
    np.testing.assert_array_equal(h["id"], d["id"])
    assert d["distort"]["factors"].shape == (8, 2, 4)
    want, want_labels = train.step_images(h)
    got, got_labels = step(d)
    assert got.shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(got.numpy() - want.numpy()).max() < 1e-4
    np.testing.assert_array_equal(got_labels, want_labels)
    # View-major: row i is view one of example i, row 8 + i its view two.
    np.testing.assert_array_equal(want.numpy()[8 + 3], h["views"][3, 1])


@pytest.mark.parametrize("pipelines,per_replica", [(2, 8), (2, 4), (4, 4)])
def test_pipelines_equal_one_pipeline(small, pipelines, per_replica):
  # 8 steps of 16 = 128 examples: the batches cross the epoch boundary at 100.
  one = _global_batches(small, 8, 16, 1, 16, seed=7)
  many = _global_batches(small, 8, 16, pipelines, per_replica, seed=7)
  _assert_batches_equal(one, many)


def _distributed(strategy, global_batch_size, dataset_fn):
  """`strategy`'s distributed dataset of `dataset_fn`, given each pipeline's InputContext."""

  def fn(context):
    return dataset_fn(
      per_replica_batch_size=context.get_per_replica_batch_size(global_batch_size),
      num_input_pipelines=context.num_input_pipelines,
      input_pipeline_id=context.input_pipeline_id,
    )

  return strategy.distribute_datasets_from_function(fn)


def test_strategy_replicas_equal_one_replica(small, strategies):
  fn = functools.partial(datasets.train_dataset, small, 16, seed=5, image_size=IMAGE_SIZE)
  results = {}
  for replicas in (1, 2):
    iterator = iter(_distributed(strategies[replicas], 16, fn))
    steps = []
    for _ in range(3):
      parts = strategies[replicas].experimental_local_results(next(iterator))
      steps.append({k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]})
    results[replicas] = steps
  _assert_batches_equal(results[1], results[2])


@pytest.mark.parametrize("start_step,pipelines", [(3, 1), (7, 1), (7, 2)])
def test_restart_resumes_at_the_same_examples(small, start_step, pipelines):
  fresh = _global_batches(small, start_step + 3, 16, 1, 16, seed=11)
  resumed = _global_batches(
    small, 3, 16, pipelines, 16 // pipelines, seed=11, start_step=start_step
  )
  _assert_batches_equal(fresh[start_step:], resumed)


@pytest.mark.parametrize("shuffle_buffer", [None, 32])
def test_epochs(small, shuffle_buffer):
  # G = 20 divides 100: steps 0-4 are epoch 0, steps 5-9 epoch 1.
  batches = _take(
    datasets.train_dataset(
      small, 20, 20, 1, 0, seed=2, image_size=IMAGE_SIZE, shuffle_buffer=shuffle_buffer
    ),
    10,
  )
  ids = np.concatenate([b["id"] for b in batches])
  views = np.concatenate([b["views"] for b in batches])
  epoch0, epoch1 = ids[:100], ids[100:]
  np.testing.assert_array_equal(np.sort(epoch0), np.arange(100))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(100))
  assert not np.array_equal(epoch0, epoch1)  # Each epoch has its own order...
  assert np.mean(epoch0 != np.arange(100)) > 0.8  # ...not the file order.
  # ...and its own views of each example; the two views of an example differ.
  first = views[:100][np.argsort(epoch0)]
  second = views[100:][np.argsort(epoch1)]
  assert all(not np.array_equal(first[i], second[i]) for i in range(100))
  assert all(not np.array_equal(first[i, 0], first[i, 1]) for i in range(100))
  if shuffle_buffer:
    # Blocks of 32: ids 0-31 fill the first 32 positions of an epoch, in a shuffled order.
    np.testing.assert_array_equal(np.sort(epoch0[:32]), np.arange(32))


def test_view_seeds_contract(small):
  """The views are simclr_augment with the documented seeds."""
  batch = _take(datasets.train_dataset(small, 4, 4, 1, 0, seed=9, image_size=IMAGE_SIZE), 1)[0]
  images = {int(ex["id"]): ex["image"] for ex in _decoded(small)}
  for i, example_id in enumerate(batch["id"]):
    for v in range(2):
      key = tf.constant([9, 1], tf.int64)
      for data in (0, int(example_id), v):  # epoch 0, id, view
        key = tf.random.experimental.stateless_fold_in(
          key, tf.constant(data, tf.int64), alg="philox"
        )
      view = augment.simclr_augment(images[int(example_id)], key, IMAGE_SIZE, IMAGE_SIZE)
      np.testing.assert_allclose(batch["views"][i, v], view.numpy(), atol=1e-5)


def test_example_views(small):
  shown = datasets.example_views(small, seed=6, image_size=IMAGE_SIZE)
  first = _take(datasets.train_dataset(small, 16, 8, 1, 0, seed=6, image_size=IMAGE_SIZE), 1)[0]
  np.testing.assert_array_equal(shown["id"].numpy(), first["id"][:4])
  np.testing.assert_array_equal(
    shown["images"].numpy(), first["views"][:4].reshape(8, IMAGE_SIZE, IMAGE_SIZE, 3)
  )


def test_train_dataset_validates_batching(small):
  with pytest.raises(
    ValueError,
    match=r"global_batch_size=16 must be a positive multiple of "
    r"the number of input pipelines \(3\)",
  ):
    datasets.train_dataset(small, 16, 4, 3, 0, seed=0, image_size=8)
  with pytest.raises(ValueError, match="per-replica batch size 3 does not divide the 8"):
    datasets.train_dataset(small, 16, 3, 2, 0, seed=0, image_size=8)
  with pytest.raises(ValueError, match=r"input_pipeline_id must be in \[0, 2\)"):
    datasets.train_dataset(small, 16, 8, 2, 2, seed=0, image_size=8)


def test_cache_gives_the_same_stream(small, tmp_path):
  a = _take(datasets.train_dataset(small, 16, 16, 1, 0, seed=1, image_size=8), 8)
  b = _take(datasets.train_dataset(small, 16, 16, 1, 0, seed=1, image_size=8, cache=True), 8)
  _assert_batches_equal(a, b)
  for i in range(5):
    _write(f"{tmp_path}/train/c{i % 2}/{i}.png", tf.io.encode_png(_random_image(i)).numpy())
  folder = datasets.load_source("image_folder", "train", data_dir=str(tmp_path))
  a = _take(datasets.train_dataset(folder, 4, 2, 1, 0, seed=1, image_size=8), 6)
  b = _take(datasets.train_dataset(folder, 4, 2, 1, 0, seed=1, image_size=8, cache=True), 6)
  _assert_batches_equal(a, b)


# ----------------------------------------------------------------------------------------------
# eval_dataset.


@pytest.mark.parametrize(
  "pipelines,per_replica,replicas_per_pipeline,cache",
  [(1, 8, 1, False), (3, 4, 1, False), (2, 3, 2, True)],
)
def test_eval_dataset_covers_each_example_once(
  shapes_dir, pipelines, per_replica, replicas_per_pipeline, cache
):
  source = datasets.load_source("shapes10", "test[:37]", data_dir=shapes_dir)
  global_batch = per_replica * replicas_per_pipeline * pipelines
  steps = datasets.eval_steps(37, global_batch, pipelines)
  ids, mask_total, labels = [], 0.0, _records_numpy(source)["label"]
  for p in range(pipelines):
    batches = _take(
      datasets.eval_dataset(
        source, per_replica, pipelines, p, IMAGE_SIZE, cache=cache, global_batch_size=global_batch
      ),
      1000,
    )
    assert len(batches) == steps * replicas_per_pipeline  # The same on every pipeline.
    for b in batches:
      assert b["image"].shape == (per_replica, IMAGE_SIZE, IMAGE_SIZE, 3)
      assert b["image"].dtype == np.float32 and b["mask"].dtype == np.float32
      real = b["mask"] == 1
      ids += list(b["id"][real])
      mask_total += b["mask"].sum()
      np.testing.assert_array_equal(b["label"][real], labels[b["id"][real]])
      assert (b["id"][~real] == -1).all() and (b["image"][~real] == 0).all()
  assert mask_total == 37
  np.testing.assert_array_equal(np.sort(ids), np.arange(37))


def test_eval_steps():
  assert datasets.eval_steps(37, 8, 1) == 5
  assert datasets.eval_steps(37, 12, 3) == 4  # ceil(13 / 4)
  assert datasets.eval_steps(40, 8, 2) == 5


# ----------------------------------------------------------------------------------------------
# Errors.


def test_unknown_dataset(tmp_path):
  with pytest.raises(
    datasets.DatasetError, match="Unknown dataset 'cifar1'.*cifar10.*image_folder.*shapes10"
  ) as info:
    datasets.load_source("cifar1", "train", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)


def test_unknown_split(shapes_dir):
  with pytest.raises(
    datasets.DatasetError, match="'shapes10' has no split 'validation'.*test, train"
  ):
    datasets.load_source("shapes10", "validation", data_dir=shapes_dir)


def test_manual_download_detected_before_downloading(tmp_path):
  # Our message (not "Could not download and prepare ...", which wraps a failed download) and
  # an error raised on its own, not while handling one: the check ran before any download.
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(
    datasets.DatasetError,
    match="imagenet2012' must be downloaded by hand: "
    f"put ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar in {manual}/",
  ) as info:
    datasets.load_source("imagenet2012", "train", data_dir=str(tmp_path))
  assert "\n" not in str(info.value)
  assert info.value.__context__ is None
  written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
  assert not written  # Nothing was downloaded.


# ----------------------------------------------------------------------------------------------
# Labelled subsets (few labels).


def _expected_quota(labels, fraction):
  """Per class: round half up of fraction * count, at least 1, in exact rational arithmetic."""
  import fractions  # pylint: disable=g-import-not-at-top

  exact = fractions.Fraction(str(fraction))
  return {
    c: min(n, max(1, int(exact * n + fractions.Fraction(1, 2))))
    for c, n in zip(*np.unique(labels, return_counts=True))
  }


@pytest.mark.parametrize("split", ["train", "train[:100]"])  # Balanced; unequal class counts.
def test_label_subset_is_class_balanced(shapes_dir, split):
  source = datasets.load_source("shapes10", split, data_dir=shapes_dir)
  labels = _records_numpy(source)["label"]
  subsets = {}
  for fraction in (0.01, 0.05, 0.1, 0.5):
    ids = datasets.label_subset(source, fraction, seed=1)
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
  assert datasets.label_subset(source, 1.0, seed=1) is None  # All examples.


def test_label_subset_depends_on_the_seed_only(shapes_dir):
  source = datasets.load_source("shapes10", "train", data_dir=shapes_dir)
  again = datasets.load_source("shapes10", "train", data_dir=shapes_dir)
  first = datasets.label_subset(source, 0.1, seed=0)
  np.testing.assert_array_equal(first, datasets.label_subset(again, 0.1, seed=0))
  other = datasets.label_subset(source, 0.1, seed=1)
  assert len(other) == len(first) == 500
  assert len(np.intersect1d(first, other)) < 150  # About 10% expected by chance, not most.
  # Not the first examples of each class: spread over the split.
  assert first.max() > 4000 and first.min() < 1000


def test_label_subset_file_round_trip(shapes_dir, tmp_path):
  source = datasets.load_source("shapes10", "train", data_dir=shapes_dir)
  ids = datasets.label_subset(source, 0.05, seed=3)
  model_dir = str(tmp_path / "run")
  path = datasets.write_label_subset(model_dir, ids)
  assert path == os.path.join(model_dir, "label_subset.txt")
  with open(path) as f:
    text = f.read()
  assert text == "".join(f"{i}\n" for i in ids)  # One id per line.
  np.testing.assert_array_equal(datasets.label_subset(source, label_file=path), ids)
  # Resuming with the same subset keeps the file; no temporary file is left.
  assert datasets.write_label_subset(model_dir, ids[::-1]) == path
  assert os.listdir(model_dir) == ["label_subset.txt"]
  # A different subset (or all labels) in the same model_dir is refused; the file stays.
  other = datasets.label_subset(source, 0.05, seed=4)
  for different, what in ((other, "250 examples"), (None, "every example")):
    with pytest.raises(
      datasets.DatasetError,
      match=f"holds the labelled subset of an earlier "
      f"run \\(250 examples\\) and this run's differs \\({what}\\)",
    ) as info:
      datasets.write_label_subset(model_dir, different)
    assert "\n" not in str(info.value)
  with open(path) as f:
    assert f.read() == text
  # All labels and no earlier file: nothing written.
  assert datasets.write_label_subset(str(tmp_path / "fresh"), None) is None
  assert not os.path.exists(tmp_path / "fresh")
  # Hand-written files may have blank lines, comments and repeats.
  hand = tmp_path / "hand.txt"
  hand.write_text("# few labels\n7\n\n 3 \n7\n")
  np.testing.assert_array_equal(datasets.label_subset(source, label_file=str(hand)), [3, 7])


def test_label_file_errors(shapes_dir, tmp_path):
  source = datasets.load_source("shapes10", "train", data_dir=shapes_dir)
  cases = {
    "3\n5000\n-1\n12\n": r"names 2 example ids that shapes10 'train' does not have \(its ids "
    r"are 0..4999\): -1, 5000$",
    "3\nfour\n": r"line 2: 'four' is not an example id",
    "# nothing\n\n": r"names no example ids",
  }
  for i, (text, message) in enumerate(cases.items()):
    path = tmp_path / f"labels{i}.txt"
    path.write_text(text)
    with pytest.raises(datasets.DatasetError, match=message) as info:
      datasets.label_subset(source, label_file=str(path))
    assert "\n" not in str(info.value)
  with pytest.raises(datasets.DatasetError, match="label file .*missing.txt does not exist"):
    datasets.label_subset(source, label_file=str(tmp_path / "missing.txt"))


def test_label_fraction_out_of_range(shapes_dir, tmp_path):
  source = datasets.load_source("shapes10", "train[:100]", data_dir=shapes_dir)
  for fraction in (0.0, -0.1, 1.5, float("nan")):
    with pytest.raises(datasets.DatasetError, match=r"label fraction must be in \(0, 1\]"):
      datasets.label_subset(source, fraction)
  path = tmp_path / "ids.txt"
  path.write_text("1\n")
  with pytest.raises(datasets.DatasetError, match="label fraction .* or a label file .*not both"):
    datasets.label_subset(source, 0.1, label_file=str(path))
  _write(f"{tmp_path}/unlabeled/a.png", tf.io.encode_png(_random_image(0)).numpy())
  unlabelled = datasets.load_source("image_folder", "unlabeled", data_dir=str(tmp_path))
  with pytest.raises(datasets.DatasetError, match="needs labels, but image_folder 'unlabeled'"):
    datasets.label_subset(unlabelled, 0.5)

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


def test_finetune_input_on_a_subset(small):
  # Fine-tuning on a label subset reads `train_dataset` of `subset_source`, one view, crop and
  # flip only (`Trainer.input_fn`).
  ids = datasets.label_subset(small, 0.2, seed=0)  # About 20 of the 100 examples.
  n = len(ids)
  assert 15 <= n <= 25
  subset = datasets.subset_source(small, ids)
  assert subset.num_examples == n
  np.testing.assert_array_equal(_records_numpy(subset)["id"], ids)  # Ids kept, in order.

  # Two epochs of the subset, and nothing else; each epoch in its own order.
  kwargs = dict(num_views=1, color_jitter_strength=0.0, use_blur=False)
  batches = _take(
    datasets.train_dataset(subset, n, n, 1, 0, seed=2, image_size=IMAGE_SIZE, **kwargs), 2
  )
  labels = _records_numpy(small)["label"]
  for b in batches:
    np.testing.assert_array_equal(np.sort(b["id"]), ids)
    np.testing.assert_array_equal(b["label"], labels[b["id"]])
  assert not np.array_equal(batches[0]["id"], batches[1]["id"])

  # The contract holds over the subset: pipelines, replicas and restarts do not change it.
  kwargs = dict(seed=5, **kwargs)
  one = _global_batches(subset, 6, 8, 1, 8, **kwargs)
  _assert_batches_equal(one, _global_batches(subset, 6, 8, 2, 4, **kwargs))
  _assert_batches_equal(one[4:], _global_batches(subset, 2, 8, 1, 8, start_step=4, **kwargs))
  # An example's view is the one the full source gives it (seeded by its id, not position).
  images = {int(ex["id"]): ex["image"] for ex in _decoded(small)}
  example_id = int(one[0]["id"][0])
  view = augment.simclr_augment(
    images[example_id],
    datasets.view_seeds(5, 0, example_id)[0],
    IMAGE_SIZE,
    IMAGE_SIZE,
    color_jitter_strength=0.0,
    use_blur=False,
  )
  np.testing.assert_allclose(one[0]["views"][0, 0], view.numpy(), atol=1e-5)

  with pytest.raises(datasets.DatasetError, match="repeats example ids"):
    datasets.subset_source(small, [1, 1])
  with pytest.raises(datasets.DatasetError, match="names 1 example ids that .* does not have"):
    datasets.subset_source(small, [1, 100])


@pytest.mark.parametrize("name", ["imagenet2012_subset/1pct", "imagenet2012_subset/10pct"])
def test_imagenet_label_subsets_are_tfds_names(tmp_path, name):
  # The name with its config reaches tfds.builder (no 'Unknown dataset' / 'Cannot use'); what
  # stops it, without a download, is ImageNet's archives that must be fetched by hand.
  manual = os.path.join(str(tmp_path), "downloads", "manual")
  with pytest.raises(
    datasets.DatasetError,
    match=f"'{name}' must be downloaded by hand: put "
    f"ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar in {manual}/",
  ):
    datasets.load_source(name, "train", data_dir=str(tmp_path))
  assert not [f for _, _, files in os.walk(tmp_path) for f in files]


# ----------------------------------------------------------------------------------------------
# Careless input (issue 14): links, FIFOs, odd names, undecodable files, splits that differ.


def _png(seed, path):
  image = _random_image(seed)
  _write(path, tf.io.encode_png(image).numpy())
  return image


def test_directory_links_never_add_an_image_twice(tmp_path, caplog):
  root = str(tmp_path)
  for cls, n in (("a", 2), ("b", 1), ("c", 1)):
    for i in range(n):
      _png(i, f"{root}/train/{cls}/{i}.png")
  _png(7, f"{root}/elsewhere/e.png")
  os.symlink("..", f"{root}/train/a/loop")  # the split folder: would list b and c as a
  os.symlink("../..", f"{root}/train/a/up")  # above it
  os.symlink("../b", f"{root}/train/a/b_too")  # another class
  os.symlink(".", f"{root}/elsewhere/self")  # a loop outside the split
  os.symlink(f"{root}/elsewhere", f"{root}/train/c/more")  # outside: followed, once
  source = datasets.load_source("image_folder", "train", data_dir=root)
  records = _records_numpy(source)
  paths = [os.path.relpath(p.decode(), f"{root}/train") for p in records["image"]]
  assert paths == ["a/0.png", "a/1.png", "b/0.png", "c/0.png", "c/more/e.png"]
  np.testing.assert_array_equal(records["label"], [0, 0, 1, 2, 2])
  assert "not following 4 directory links" in caplog.text


def test_fifos_are_skipped_and_any_file_name_is_read(tmp_path, caplog):
  import threading  # pylint: disable=g-import-not-at-top

  root = str(tmp_path)
  image = _png(1, f"{root}/train/a/0.png")
  odd = os.fsencode(f"{root}/train/a/") + b"\xff\xfe.png"  # not valid UTF-8
  with open(odd, "wb") as f:
    f.write(tf.io.encode_png(_random_image(2)).numpy())
  fifo = f"{root}/train/a/pipe.png"
  os.mkfifo(fifo)
  got = []
  thread = threading.Thread(
    target=lambda: got.append(datasets.load_source("image_folder", "train", data_dir=root)),
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
  images = {int(ex["id"]): ex["image"].numpy() for ex in _decoded(source)}
  np.testing.assert_array_equal(images[0], image)
  np.testing.assert_array_equal(images[1], _random_image(2))
  assert source.files[1].endswith("a/\\xff\\xfe.png")


def test_undecodable_files_are_named_and_none_decoding_is_an_error(tmp_path, caplog):
  root = str(tmp_path)
  for i in range(3):
    _png(i, f"{root}/train/a/{i}.png")
  for name in ("cut1.png", "cut2.png"):  # PNG magic, cut body: listed, fail to decode
    _write(f"{root}/train/a/{name}", tf.io.encode_png(_random_image(9)).numpy()[:40])
    _write(f"{root}/bad/a/{name}", tf.io.encode_png(_random_image(9)).numpy()[:40])
  source = datasets.load_source("image_folder", "train", data_dir=root)
  assert source.num_examples == 5
  caplog.clear()
  assert sorted(int(ex["id"]) for ex in _decoded(source)) == [0, 1, 2]
  warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
  assert len(warnings) == 2, caplog.text
  assert "a/cut1.png; skipped (1 so far)" in warnings[0]
  assert "a/cut2.png; skipped (2 so far)" in warnings[1]
  # Nothing decodes: one line at load time, not a training stream that searches forever.
  with pytest.raises(datasets.DatasetError, match=r"bad: none of its 2 image files decodes"):
    datasets.load_source("image_folder", "bad", data_dir=root)


def test_eval_split_labels_classes_as_the_training_split(tmp_path, caplog):
  root = str(tmp_path)
  for split, classes in (("train", "abc"), ("test", "acd")):
    for c in classes:
      _png(ord(c), f"{root}/{split}/{c}/0.png")
  train = datasets.load_source("image_folder", "train", data_dir=root)
  assert train.class_names == ("a", "b", "c")
  test = datasets.load_source("image_folder", "test", data_dir=root, class_names=train.class_names)
  records = _records_numpy(test)
  # a and c keep train's labels 0 and 2 (by their own folders: 0 and 1); d is skipped.
  np.testing.assert_array_equal(records["label"], [0, 2])
  assert [os.path.basename(os.path.dirname(p.decode())) for p in records["image"]] == ["a", "c"]
  assert test.num_classes == 3
  assert "lacks 1 classes of the training split: b" in caplog.text
  assert "1 classes that the training split does not have: d" in caplog.text


def test_split_slices_names_and_label_files(shapes_dir, tmp_path, caplog):
  with pytest.raises(
    datasets.DatasetError,
    match=r"'train\[5000:\]' selects no examples; its "
    r"splits are: test \(1000 examples\), train \(5000 examples\)",
  ):
    datasets.load_source("shapes10", "train[5000:]", data_dir=shapes_dir)
  with pytest.raises(datasets.DatasetError) as info:
    datasets.load_source("shapes11", "train", data_dir=shapes_dir)
  close = str(info.value).split("Close names: ")[1].split(".")[0].split(", ")
  assert "shapes10" in close and len(close) == len(set(close)), close
  (tmp_path / "ids.txt").write_text("3\n7\n3\n9\n7\n")
  np.testing.assert_array_equal(datasets.read_label_file(str(tmp_path / "ids.txt")), [3, 7, 9])
  assert "lists 2 ids more than once (e.g. 3, 7)" in caplog.text


def test_reversed_slices_are_refused_before_anything_is_written(shapes_dir, tmp_path):
  from flags import definitions  # pylint: disable=g-import-not-at-top
  from tf_simclr import plan as plan_lib  # pylint: disable=g-import-not-at-top

  with pytest.raises(
    datasets.DatasetError, match=r"'train\[50%:40%\]' is a reversed slice .*-500 examples"
  ):
    datasets.load_source("shapes10", "train[50%:40%]", data_dir=shapes_dir)
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(
    model_dir=str(tmp_path / "m"),
    dataset="shapes10",
    data_dir=shapes_dir,
    train_steps=1,
    image_size=16,
    mode="train_then_eval",
  )
  # The evaluation split too, when the plan is made: not after training.
  cfg = definitions.to_config(dict(values, train_split="train[:100]", eval_split="test[9:3]"))
  with pytest.raises(datasets.DatasetError, match=r"'test\[9:3\]' is a reversed slice"):
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


def test_only_builder_errors_about_the_data_become_dataset_errors(shapes_dir):
  # An unknown config is the user's: one DatasetError line.
  with pytest.raises(datasets.DatasetError, match="Cannot use dataset 'shapes10/nope'"):
    datasets.load_source("shapes10/nope", "train", data_dir=shapes_dir)
  # A builder's own bug keeps its type (and traceback), not "Cannot use/prepare dataset".
  with pytest.raises(RuntimeError, match="KeyError.*features") as info:  # TFDS's wrapping
    datasets.load_source("buggy_builder", "train", data_dir=shapes_dir)
  assert not isinstance(info.value, datasets.DatasetError)


def test_hidden_and_system_folders_are_skipped_and_named(tmp_path, caplog):
  root = str(tmp_path)
  for cls in ("a", "b"):
    _png(0, f"{root}/train/{cls}/0.png")
  # What Jupyter, macOS's archiver and git leave beside (and inside) class folders.
  _png(1, f"{root}/train/.ipynb_checkpoints/0-checkpoint.png")
  _png(2, f"{root}/train/__MACOSX/a/0.png")
  _png(3, f"{root}/train/a/.ipynb_checkpoints/0-checkpoint.png")
  source = datasets.load_source("image_folder", "train", data_dir=root)
  assert source.class_names == ("a", "b") and source.num_examples == 2
  assert [os.path.relpath(f, f"{root}/train") for f in source.files] == ["a/0.png", "b/0.png"]
  assert "skipping 3 hidden or system folders" in caplog.text
  assert "train/.ipynb_checkpoints" in caplog.text
  # An unlabelled split: its images, not a class made of the checkpoint folder.
  _png(4, f"{root}/loose/x.png")
  _png(5, f"{root}/loose/.ipynb_checkpoints/x-checkpoint.png")
  loose = datasets.load_source("image_folder", "loose", data_dir=root)
  assert (loose.num_classes, loose.num_examples) == (0, 1)


def test_a_truncated_file_is_counted_once_however_often_it_is_read(tmp_path, caplog):
  root = str(tmp_path)
  for i in range(2):
    _png(i, f"{root}/train/a/{i}.png")
  jpeg = tf.io.encode_jpeg(_random_image(9, 32, 32)).numpy()
  _write(f"{root}/train/a/cut.jpg", jpeg[: len(jpeg) // 2])
  source = datasets.load_source("image_folder", "train", data_dir=root)
  assert source.num_examples == 3
  caplog.clear()
  # Six epochs of the two images that decode: the cut one is read (and fails) in each.
  batches = _take(datasets.train_dataset(source, 2, 2, 1, 0, seed=0, image_size=8), 6)
  assert all(2 not in b["id"] for b in batches)
  warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
  assert len(warnings) == 1 and "a/cut.jpg; skipped (1 so far)" in warnings[0], warnings


def test_label_files_with_a_bom_and_of_one_class(shapes_dir, tmp_path, caplog):
  source = datasets.load_source("shapes10", "train[:100]", data_dir=shapes_dir)
  labels = _records_numpy(source)["label"]
  # Notepad's "UTF-8" writes a byte-order mark before the first id.
  path = tmp_path / "bom.txt"
  path.write_bytes("\ufeff0\n5\n".encode())
  np.testing.assert_array_equal(datasets.label_subset(source, label_file=str(path)), [0, 5])
  assert "all of class" not in caplog.text
  same = np.flatnonzero(labels == labels[0])[:3]
  (tmp_path / "one.txt").write_text("".join(f"{i}\n" for i in same))
  np.testing.assert_array_equal(
    datasets.label_subset(source, label_file=str(tmp_path / "one.txt")), same
  )
  assert f"its 3 ids are all of class {labels[0]} (of 10)" in caplog.text
