"""Tests of tf_simclr.data.pipeline: the determinism contract, sharding, restarts, evaluation.

On shapes10 (conftest.py's `data_dir`) and shapes100 image folders written here.
"""

import functools
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import runs
from tf_simclr import augment
from tf_simclr.data import pipeline
from tf_simclr.data import sources

IMAGE_SIZE = 16  # Small views keep the pipeline tests fast; the contract does not depend on it.


def test_train_dataset_structure_and_repeatability(shapes100):
  assert shapes100.num_examples == 100
  a = runs.take(pipeline.train_dataset(shapes100, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE), 4)
  b = runs.take(pipeline.train_dataset(shapes100, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE), 4)
  for x, y in zip(a, b):
    assert x["views"].shape == (8, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert x["views"].dtype == np.float32 and x["label"].dtype == x["id"].dtype == np.int64
    assert 0.0 <= x["views"].min() and x["views"].max() <= 1.0
    np.testing.assert_array_equal(x["views"], y["views"])
    np.testing.assert_array_equal(x["id"], y["id"])
  # Labels are those of the ids.
  labels = runs.records_numpy(shapes100)["label"]
  for x in a:
    np.testing.assert_array_equal(x["label"], labels[x["id"]])
  # Another seed: another order.
  c = runs.take(pipeline.train_dataset(shapes100, 16, 8, 1, 0, seed=4, image_size=IMAGE_SIZE), 1)
  assert not np.array_equal(a[0]["id"], c[0]["id"])


@pytest.mark.parametrize("crop_on_device", [False, True], ids=["tpu", "gpu"])
def test_augment_on_device_gives_the_host_views(shapes100, crop_on_device):
  # --augment_on_device: the host crops (TPU) or only draws (elsewhere); the training step
  # (trainer.crop_views, trainer.step_images) does the rest. The model must see the views of
  # the host path, in the same view-major order.
  from tf_simclr import trainer  # pylint: disable=g-import-not-at-top

  host = runs.take(pipeline.train_dataset(shapes100, 16, 8, 1, 0, seed=3, image_size=IMAGE_SIZE), 2)
  split = runs.take(
    pipeline.train_dataset(
      shapes100,
      16,
      8,
      1,
      0,
      seed=3,
      image_size=IMAGE_SIZE,
      augment_on_device=True,
      crop_on_device=crop_on_device,
    ),
    2,
  )
  step = tf.function(lambda b: trainer.step_images(trainer.crop_views(b, IMAGE_SIZE)))
  for h, d in zip(host, split):
    np.testing.assert_array_equal(h["id"], d["id"])
    assert d["distort"]["factors"].shape == (8, 2, 4)
    assert ("image" in d) == crop_on_device and ("views" in d) != crop_on_device
    want, want_labels = trainer.step_images(h)
    got, got_labels = step(d)
    assert got.shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert np.abs(got.numpy() - want.numpy()).max() < 1e-4
    np.testing.assert_array_equal(got_labels, want_labels)
    # View-major: row i is view one of example i, row 8 + i its view two.
    np.testing.assert_array_equal(want.numpy()[8 + 3], h["views"][3, 1])


@pytest.mark.parametrize("pipelines,per_replica", [(2, 8), (2, 4), (4, 4)])
def test_pipelines_equal_one_pipeline(shapes100, pipelines, per_replica):
  # 8 steps of 16 = 128 examples: the batches cross the epoch boundary at 100.
  one = runs.global_batches(shapes100, 8, 16, 1, 16, seed=7)
  many = runs.global_batches(shapes100, 8, 16, pipelines, per_replica, seed=7)
  runs.assert_batches_equal(one, many)


def _distributed(strategy, global_batch_size, dataset_fn):
  """`strategy`'s distributed dataset of `dataset_fn`, given each pipeline's InputContext."""

  def fn(context):
    return dataset_fn(
      per_replica_batch_size=context.get_per_replica_batch_size(global_batch_size),
      num_input_pipelines=context.num_input_pipelines,
      input_pipeline_id=context.input_pipeline_id,
    )

  return strategy.distribute_datasets_from_function(fn)


def test_strategy_replicas_equal_one_replica(shapes100, strategies):
  fn = functools.partial(pipeline.train_dataset, shapes100, 16, seed=5, image_size=IMAGE_SIZE)
  results = {}
  for replicas in (1, 2):
    iterator = iter(_distributed(strategies[replicas], 16, fn))
    steps = []
    for _ in range(3):
      parts = strategies[replicas].experimental_local_results(next(iterator))
      steps.append({k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]})
    results[replicas] = steps
  runs.assert_batches_equal(results[1], results[2])


def test_crop_on_device_replicas_equal_one_replica(shapes100, strategies):
  # --augment_on_device off a TPU, distributed as training does: each replica crops and
  # distorts its share of the source images; together they make the one replica's views.
  from tf_simclr import trainer  # pylint: disable=g-import-not-at-top

  fn = functools.partial(
    pipeline.train_dataset,
    shapes100,
    16,
    seed=5,
    image_size=IMAGE_SIZE,
    augment_on_device=True,
    crop_on_device=True,
  )

  def images(batch):  # [V*b, s, s, 3] view-major -> [b, V, s, s, 3]
    views = trainer.step_images(trainer.crop_views(batch, IMAGE_SIZE))[0]
    return tf.transpose(tf.reshape(views, [2, -1, IMAGE_SIZE, IMAGE_SIZE, 3]), [1, 0, 2, 3, 4])

  results = {}
  for replicas in (1, 2):
    strategy = strategies[replicas]
    batch = next(iter(_distributed(strategy, 16, fn)))
    parts = strategy.experimental_local_results(strategy.run(tf.function(images), args=(batch,)))
    results[replicas] = np.concatenate([p.numpy() for p in parts])
  assert results[1].shape == (16, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
  np.testing.assert_allclose(results[2], results[1], atol=2e-6)
  assert np.abs(results[1][:, 0] - results[1][:, 1]).max() > 0.1  # two different views


@pytest.mark.parametrize("start_step,pipelines", [(3, 1), (7, 1), (7, 2)])
def test_restart_resumes_at_the_same_examples(shapes100, start_step, pipelines):
  fresh = runs.global_batches(shapes100, start_step + 3, 16, 1, 16, seed=11)
  resumed = runs.global_batches(
    shapes100, 3, 16, pipelines, 16 // pipelines, seed=11, start_step=start_step
  )
  runs.assert_batches_equal(fresh[start_step:], resumed)


@pytest.mark.parametrize("shuffle_buffer", [None, 32])
def test_epochs(shapes100, shuffle_buffer):
  # G = 20 divides 100: steps 0-4 are epoch 0, steps 5-9 epoch 1.
  batches = runs.take(
    pipeline.train_dataset(
      shapes100, 20, 20, 1, 0, seed=2, image_size=IMAGE_SIZE, shuffle_buffer=shuffle_buffer
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


def test_view_seeds_contract(shapes100):
  """The views are simclr_augment with the documented seeds."""
  batch = runs.take(
    pipeline.train_dataset(shapes100, 4, 4, 1, 0, seed=9, image_size=IMAGE_SIZE), 1
  )[0]
  images = {int(ex["id"]): ex["image"] for ex in runs.decoded(shapes100)}

  def later(v, example_id):  # the contract's seed of view v in epoch 3
    key = tf.constant([9, 1], tf.int64)
    for data in (3, int(example_id), v):
      key = tf.random.experimental.stateless_fold_in(key, tf.constant(data, tf.int64), alg="philox")
    return key

  for i, example_id in enumerate(batch["id"]):
    for v in range(2):
      key = tf.constant([9, 1], tf.int64)
      for data in (0, int(example_id), v):  # epoch 0, id, view
        key = tf.random.experimental.stateless_fold_in(
          key, tf.constant(data, tf.int64), alg="philox"
        )
      for epoch in (0, 3):  # view_seeds computes the same folds with fewer draws
        np.testing.assert_array_equal(
          pipeline.view_seeds(9, epoch, example_id)[v], key if epoch == 0 else later(v, example_id)
        )
      view = augment.simclr_augment(images[int(example_id)], key, IMAGE_SIZE, IMAGE_SIZE)
      np.testing.assert_allclose(batch["views"][i, v], view.numpy(), atol=1e-5)


def test_the_views_shown_are_the_first_step_s(shapes100):
  # trainer.view_examples (TensorBoard's "augmented views") against a global batch of 16 on two
  # pipelines: the stream does not depend on the batch size.
  from tf_simclr import config as C  # pylint: disable=g-import-not-at-top
  from tf_simclr import trainer  # pylint: disable=g-import-not-at-top

  cfg = C.RunConfig(
    C.DataConfig(dataset="shapes10"),
    C.ModelConfig(image_size=IMAGE_SIZE),
    C.OptimConfig(),
    C.TrainConfig(seed=6),
    C.RuntimeConfig(),
  )
  shown = trainer.view_examples(cfg, shapes100)
  first = runs.take(
    pipeline.train_dataset(shapes100, 16, 8, 2, 0, seed=6, image_size=IMAGE_SIZE), 1
  )[0]
  np.testing.assert_array_equal(shown["id"].numpy(), first["id"][:4])
  np.testing.assert_array_equal(
    shown["images"].numpy(), first["views"][:4].reshape(8, IMAGE_SIZE, IMAGE_SIZE, 3)
  )


def test_train_dataset_validates_batching(shapes100):
  with pytest.raises(
    ValueError,
    match=r"global_batch_size=16 must be a positive multiple of "
    r"the number of input pipelines \(3\)",
  ):
    pipeline.train_dataset(shapes100, 16, 4, 3, 0, seed=0, image_size=8)
  with pytest.raises(ValueError, match="per-replica batch size 3 does not divide the 8"):
    pipeline.train_dataset(shapes100, 16, 3, 2, 0, seed=0, image_size=8)
  with pytest.raises(ValueError, match=r"input_pipeline_id must be in \[0, 2\)"):
    pipeline.train_dataset(shapes100, 16, 8, 2, 2, seed=0, image_size=8)


def test_cache_gives_the_same_stream(shapes100, tmp_path):
  a = runs.take(pipeline.train_dataset(shapes100, 16, 16, 1, 0, seed=1, image_size=8), 8)
  b = runs.take(
    pipeline.train_dataset(shapes100, 16, 16, 1, 0, seed=1, image_size=8, cache=True), 8
  )
  runs.assert_batches_equal(a, b)
  for i in range(5):
    runs.write(
      f"{tmp_path}/train/c{i % 2}/{i}.png",
      tf.io.encode_png(runs.random_image((6, 5, 3), i)).numpy(),
    )
  folder = sources.load_source("image_folder", "train", data_dir=str(tmp_path))
  a = runs.take(pipeline.train_dataset(folder, 4, 2, 1, 0, seed=1, image_size=8), 6)
  b = runs.take(pipeline.train_dataset(folder, 4, 2, 1, 0, seed=1, image_size=8, cache=True), 6)
  runs.assert_batches_equal(a, b)


@pytest.mark.parametrize(
  "pipelines,per_replica,replicas_per_pipeline,cache",
  [(1, 8, 1, False), (3, 4, 1, False), (2, 3, 2, True)],
)
def test_eval_dataset_covers_each_example_once(
  data_dir, pipelines, per_replica, replicas_per_pipeline, cache
):
  source = sources.load_source("shapes10", "test[:37]", data_dir=data_dir)
  global_batch = per_replica * replicas_per_pipeline * pipelines
  steps = pipeline.eval_steps(37, global_batch, pipelines)
  ids, mask_total, labels = [], 0.0, runs.records_numpy(source)["label"]
  for p in range(pipelines):
    batches = runs.take(
      pipeline.eval_dataset(
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
  assert pipeline.eval_steps(37, 8, 1) == 5
  assert pipeline.eval_steps(37, 12, 3) == 4  # ceil(13 / 4)
  assert pipeline.eval_steps(40, 8, 2) == 5


def test_a_truncated_file_is_counted_once_however_often_it_is_read(tmp_path, caplog):
  root = str(tmp_path)
  for i in range(2):
    runs.png(i, f"{root}/train/a/{i}.png")
  jpeg = tf.io.encode_jpeg(runs.random_image((32, 32, 3), 9)).numpy()
  runs.write(f"{root}/train/a/cut.jpg", jpeg[: len(jpeg) // 2])
  source = sources.load_source("image_folder", "train", data_dir=root)
  assert source.num_examples == 3
  caplog.clear()
  # Six epochs of the two images that decode: the cut one is read (and fails) in each.
  batches = runs.take(pipeline.train_dataset(source, 2, 2, 1, 0, seed=0, image_size=8), 6)
  assert all(2 not in b["id"] for b in batches)
  warnings = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
  assert len(warnings) == 1 and "a/cut.jpg; skipped (1 so far)" in warnings[0], warnings


def test_dropped_files_are_named_from_their_stream_positions(tmp_path, caplog):
  # Half the files are cut JPEGs, listed last: runs of consecutive drops in the shuffled train
  # stream of a second pipeline after a restart, and drops at the very end of an eval pass.
  root = str(tmp_path)
  for i in range(4):
    runs.png(i, f"{root}/train/a/{i}.png")
  jpeg = tf.io.encode_jpeg(runs.random_image((32, 32, 3), 9)).numpy()
  for i in range(4):
    runs.write(f"{root}/train/a/cut{i}.jpg", jpeg[: len(jpeg) // 2])
  source = sources.load_source("image_folder", "train", data_dir=root)
  cut = {f"a/cut{i}.jpg" for i in range(4)}

  def named():
    names = [r.getMessage() for r in caplog.records if "cannot decode" in r.getMessage()]
    caplog.clear()
    return [n.split(" cannot decode ")[1].split(";")[0].split("train/")[1] for n in names]

  caplog.clear()
  batches = runs.take(
    pipeline.train_dataset(source, 4, 2, 2, 1, seed=3, image_size=8, start_step=1), 5
  )
  assert all(set(b["id"]) <= {0, 1, 2, 3} for b in batches)
  # The files of this pipeline's slice that the 5 batches had to skip (their ids from the
  # stream without decoding), at least, are named; a file that decodes never is.
  stream = pipeline.global_stream(source, 3, 4, 8, False).batch(4).take(20)
  ids = np.concatenate([b["id"][2:] for b in runs.take(stream, 20)])
  skipped = ids[:10]
  names = named()
  assert sorted(set(names)) == sorted(names) and set(names) <= cut
  assert {f"a/cut{i - 4}.jpg" for i in skipped if i >= 4} <= set(names)
  # Eval: the dropped files are the last of the split, each counted once.
  for cache in (False, True):
    eval_batches = runs.take(pipeline.eval_dataset(source, 2, 1, 0, image_size=8, cache=cache), 10)
    assert sum(b["mask"].sum() for b in eval_batches) == 4
    assert sorted(named()) == sorted(cut)


# A process that only feeds accelerators computes its 224 px views (one XLA launch each) with
# one intra-op thread; the test process has TF's default pool, over which XLA splits its loops.
_FEED_ONLY_VIEWS = """
import sys
import numpy as np
import tensorflow as tf
from tf_simclr import augment
from tf_simclr.data import pipeline
pipeline.feed_only_threads()
image = np.load(sys.argv[1])
np.save(sys.argv[2], np.stack([augment.simclr_augment(image, [i, 5], 224, 224) for i in range(6)]))
print(tf.config.threading.get_intra_op_parallelism_threads())
"""


def test_feed_only_threads_leave_the_views_bit_for_bit(tmp_path):
  image = np.random.default_rng(4).integers(0, 256, (375, 500, 3), dtype=np.uint8)
  np.save(tmp_path / "image.npy", image)
  env = {k: v for k, v in runs.env().items() if k != "TF_NUM_INTRAOP_THREADS"}
  res = subprocess.run(
    [sys.executable, "-c", _FEED_ONLY_VIEWS, str(tmp_path / "image.npy"), str(tmp_path / "v.npy")],
    cwd=runs.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-2000:]
  assert res.stdout.split()[-1] == "1"
  here = np.stack([augment.simclr_augment(image, [i, 5], 224, 224) for i in range(6)])
  np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), here)
