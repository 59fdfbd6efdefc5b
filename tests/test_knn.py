"""Tests of tf_simclr.knn: NumPy references, closed forms, and 1 replica = 2 replicas end to end."""

import numpy as np
import pytest
import tensorflow as tf

from runs import numpy_knn
from tf_simclr import knn
from tf_simclr import model as model_lib
from tf_simclr.config import ModelConfig
from tf_simclr.data import pipeline
from tf_simclr.data import sources

IMAGE_SIZE = 16


def _knn_predict(
  query, bank, bank_labels, num_classes, k=knn.DEFAULT_K, temperature=knn.DEFAULT_TEMPERATURE
):
  """`knn_accuracy`'s classifier on in-memory features: normalise, neighbours, vote. int32 [b]."""
  query = tf.math.l2_normalize(tf.constant(query, tf.float32), axis=-1)
  bank = tf.math.l2_normalize(tf.constant(bank, tf.float32), axis=-1)
  sims, labels = knn.nearest_neighbours(query, bank, bank_labels, k)
  return knn.vote(sims, labels, num_classes, temperature)


def _random_problem(seed, b=9, m=50, d=6, num_classes=4):
  rng = np.random.default_rng(seed)
  return (
    rng.normal(size=(b, d)).astype(np.float32),
    rng.normal(size=(m, d)).astype(np.float32),
    rng.integers(0, num_classes, m),
    num_classes,
  )


@pytest.mark.parametrize("k", [1, 5, 50, 80])  # 80 > M = 50: clipped to the whole bank.
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_neighbours_and_vote_match_numpy(k, temperature):
  query, bank, labels, num_classes = _random_problem(k)
  got = _knn_predict(query, bank, labels, num_classes, k=k, temperature=temperature).numpy()
  np.testing.assert_array_equal(got, numpy_knn(query, bank, labels, num_classes, k, temperature))


def test_neighbours_and_vote_depend_on_k():
  # Guards the reference comparison above against a k that is silently ignored.
  query, bank, labels, num_classes = _random_problem(0, b=200)
  by_k = [
    _knn_predict(query, bank, labels, num_classes, k=k, temperature=0.5).numpy() for k in (1, 50)
  ]
  assert (by_k[0] != by_k[1]).any()


@pytest.mark.parametrize("chunk_size", [7, 10, 50])
def test_nearest_neighbours_chunked_and_masked(chunk_size):
  query, bank, labels, _ = _random_problem(3, m=47)
  valid = np.random.default_rng(4).random(47) < 0.7
  whole = knn.nearest_neighbours(query, bank, labels, 12, bank_valid=valid)
  chunked = knn.nearest_neighbours(query, bank, labels, 12, bank_valid=valid, chunk_size=chunk_size)
  # NumPy: the 12 valid rows of largest inner product, in decreasing order.
  sims = query @ bank.T
  sims[:, ~valid] = -np.inf
  nearest = np.argsort(-sims, axis=1)[:, :12]
  for values, neighbour_labels in (whole, chunked):
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(sims, nearest, 1), rtol=1e-5)
    np.testing.assert_array_equal(neighbour_labels.numpy(), labels[nearest])


def test_nearest_neighbours_more_slots_than_valid_rows():
  query, bank, labels, num_classes = _random_problem(5, m=10)
  valid = np.arange(10) < 3
  values, _ = knn.nearest_neighbours(query, bank, labels, 8, bank_valid=valid, chunk_size=4)
  assert values.shape == (9, 8)
  assert np.isfinite(values.numpy()[:, :3]).all() and np.isneginf(values.numpy()[:, 3:]).all()
  # Empty slots weigh nothing: the vote is the kNN over the 3 valid rows.
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
  values, neighbour_labels = knn.nearest_neighbours(
    unit(query), unit(bank), labels, 8, bank_valid=valid
  )
  np.testing.assert_array_equal(
    knn.vote(values, neighbour_labels, num_classes, 0.1).numpy(),
    numpy_knn(query, bank, labels, num_classes, 8, 0.1, bank_valid=valid),
  )


def test_vote_closed_form():
  # Class 0: exp(0.9 / T); class 1: 2 exp(0.5 / T). Class 1 wins iff T > 0.4 / ln 2 = 0.577.
  sims = tf.constant([[0.9, 0.5, 0.5, -np.inf]])
  labels = tf.constant([[0, 1, 1, 2]])
  assert int(knn.vote(sims, labels, 3, 0.5)[0]) == 0
  assert int(knn.vote(sims, labels, 3, 0.7)[0]) == 1
  # exp(0.9 / 0.001) overflows float32; the vote must not.
  assert int(knn.vote(sims, labels, 3, 0.001)[0]) == 0


def test_well_separated_clusters_are_classified_perfectly():
  # Orthogonal class centres plus small noise: every same-class similarity is near 1 and
  # every other near 0, so even with all 60 bank rows voting (k = 200 > M) the weights
  # exp(~1 / 0.07) of the own class dominate exp(~0 / 0.07) of the others.
  rng = np.random.default_rng(0)
  centres = np.eye(3, 8, dtype=np.float32)
  bank_labels = np.repeat(np.arange(3), 20)
  bank = centres[bank_labels] + 0.05 * rng.normal(size=(60, 8)).astype(np.float32)
  query_labels = rng.integers(0, 3, 30)
  query = 5.0 * centres[query_labels] + 0.1 * rng.normal(size=(30, 8)).astype(np.float32)
  predicted = _knn_predict(query, bank, bank_labels, 3).numpy()
  np.testing.assert_array_equal(predicted, query_labels)


# ----------------------------------------------------------------------------------------------
# knn_accuracy end to end: a small ResNet-18 on shapes10.


@pytest.fixture(scope="module")
def setup(data_dir):
  tf.keras.utils.set_random_seed(0)
  config = ModelConfig(resnet_depth=18, image_size=IMAGE_SIZE)
  model = model_lib.build_model(config)
  # Fresh BN layers (offset 0) map the zero images that pad the last batch to zero features,
  # which no real image has as a near neighbour. Random BN scales and offsets give them
  # features among the nearest, so that counting padded bank rows would change the result.
  rng = np.random.default_rng(0)
  for v in model.trainable_variables:
    if v.path.endswith(("gamma", "beta")):
      v.assign(v + rng.normal(0.0, 0.3, v.shape).astype(np.float32))
  train = sources.load_source("shapes10", "train[:300]", data_dir=data_dir)
  test = sources.load_source("shapes10", "test[:60]", data_dir=data_dir)
  return config, model, train, test


def _eager_features(model, source, limit):
  """Eval-preprocessed images of the first `limit` examples through the model, eagerly."""
  batch = next(iter(pipeline.eval_dataset(source, limit, 1, 0, IMAGE_SIZE)))
  real = batch["mask"].numpy() == 1
  features = model(batch["image"], training=False)["final_avg_pool"].numpy()
  return features[real], batch["label"].numpy()[real]


def test_knn_accuracy_one_and_two_replicas_equal_numpy(setup, strategies):
  config, model, train, test = setup
  bank, bank_labels = _eager_features(model, train, 200)
  query, query_labels = _eager_features(model, test, 60)
  expected = np.mean(numpy_knn(query, bank, bank_labels, 10, 10, 0.07) == query_labels)

  # Batch 16 divides neither 200 nor 60: padded examples must count nowhere.
  one = knn.knn_accuracy(
    model,
    tf.distribute.get_strategy(),
    train,
    test,
    batch_size=16,
    image_size=IMAGE_SIZE,
    k=10,
    max_bank_examples=200,
  )
  strategy = strategies[2]
  with strategy.scope():
    replicated = model_lib.build_model(config)
  replicated.set_weights(model.get_weights())
  # A small chunk also runs the chunked scan inside the replicas.
  two = knn.knn_accuracy(
    replicated,
    strategy,
    train,
    test,
    batch_size=16,
    image_size=IMAGE_SIZE,
    k=10,
    max_bank_examples=200,
    bank_chunk_size=24,
  )
  print(f"kNN top-1: NumPy {expected}, 1 replica {one}, 2 replicas {two}")
  for result in (one, two):
    assert result == {
      "knn/top_1_accuracy": pytest.approx(expected, abs=1e-9),
      "knn/k": 10,
      "knn/num_examples": 60,
      "knn/bank_size": 200,
    }


def test_knn_monitor_traces_once_and_reads_the_current_weights(setup, strategies):
  # A run calls its monitor after each interval, with new weights: the bank and query steps
  # are traced at the first call only, and a later call still matches the NumPy kNN of the
  # weights it sees then (not the first call's).
  config, model, train, test = setup
  with strategies[2].scope():
    replicated = model_lib.build_model(config)
  saved = model.get_weights()
  rng = np.random.default_rng(1)
  moved = [
    w + rng.normal(0.0, 0.3, w.shape).astype(w.dtype) if v.path.endswith(("gamma", "beta")) else w
    for v, w in zip(model.weights, saved)
  ]  # new BN scales and offsets
  try:
    for m, strategy in ((model, tf.distribute.get_strategy()), (replicated, strategies[2])):
      m.set_weights(saved)
      monitor = knn.KnnMonitor(
        m, strategy, train, test, batch_size=16, image_size=IMAGE_SIZE, k=10, max_bank_examples=200
      )
      steps = (monitor.embed_step, monitor.query_step)
      first = monitor.at(1)
      traces = [f.experimental_get_tracing_count() for f in steps]
      assert traces == [1, 1]
      assert monitor.at(1) is first  # the same step: not computed again
      m.set_weights(moved)
      second = monitor.at(2)
      assert [f.experimental_get_tracing_count() for f in steps] == traces
      assert monitor.last == (2, second)
      bank, bank_labels = _eager_features(m, train, 200)
      query, query_labels = _eager_features(m, test, 60)
      expected = np.mean(numpy_knn(query, bank, bank_labels, 10, 10, 0.07) == query_labels)
      assert expected != first["knn/top_1_accuracy"]  # the new weights change the figure
      assert second == {
        "knn/top_1_accuracy": pytest.approx(expected, abs=1e-9),
        "knn/k": 10,
        "knn/num_examples": 60,
        "knn/bank_size": 200,
      }
  finally:
    model.set_weights(saved)  # the module's other tests use the fixture's weights


def test_knn_accuracy_clips_k_to_the_bank(setup):
  _, model, train, test = setup
  bank, bank_labels = _eager_features(model, train, 40)
  query, query_labels = _eager_features(model, test, 60)
  expected = np.mean(numpy_knn(query, bank, bank_labels, 10, 40, 0.07) == query_labels)
  result = knn.knn_accuracy(
    model,
    tf.distribute.get_strategy(),
    train,
    test,
    batch_size=32,
    image_size=IMAGE_SIZE,
    max_bank_examples=40,
  )  # k = 200 > 40.
  assert result["knn/k"] == 40 and result["knn/bank_size"] == 40
  assert result["knn/top_1_accuracy"] == pytest.approx(expected, abs=1e-9)


def test_knn_accuracy_validates(setup, strategies, tmp_path):
  _, model, train, test = setup
  strategy = tf.distribute.get_strategy()
  with pytest.raises(
    ValueError,
    match=r"kNN batch_size=5 must be a positive multiple of the "
    r"number of replicas \(2\)",
  ):
    knn.knn_accuracy(model, strategies[2], train, test, 5, IMAGE_SIZE)
  with pytest.raises(ValueError, match="k must be an integer >= 1, got 0"):
    knn.knn_accuracy(model, strategy, train, test, 8, IMAGE_SIZE, k=0)
  with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
    knn.knn_accuracy(model, strategy, train, test, 8, IMAGE_SIZE, temperature=0.0)
  with pytest.raises(ValueError, match="max_bank_examples must be >= 1"):
    knn.knn_accuracy(model, strategy, train, test, 8, IMAGE_SIZE, max_bank_examples=0)
  image = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
  (tmp_path / "unlabeled").mkdir()
  (tmp_path / "unlabeled" / "a.png").write_bytes(image)
  unlabelled = sources.load_source("image_folder", "unlabeled", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="needs labels, but image_folder 'unlabeled' is unlabelled"):
    knn.knn_accuracy(model, strategy, unlabelled, test, 8, IMAGE_SIZE)


def test_knn_accuracy_retrieves_each_example_itself(setup, data_dir, strategies):
  # Closed form: with the eval split as the bank and k = 1, each example's nearest neighbour is
  # itself (cosine 1), so top-1 is exactly 1 if features and labels stay aligned through the
  # padding, the replicas' shards and the merge of their candidates.
  config, model, _, _ = setup
  source = sources.load_source("shapes10", "train[:52]", data_dir=data_dir)
  strategy = strategies[2]
  with strategy.scope():
    replicated = model_lib.build_model(config)
  replicated.set_weights(model.get_weights())
  for m, s in ((model, tf.distribute.get_strategy()), (replicated, strategy)):
    result = knn.knn_accuracy(
      m, s, source, source, batch_size=16, image_size=IMAGE_SIZE, k=1, bank_chunk_size=8
    )
    assert result == {
      "knn/top_1_accuracy": 1.0,
      "knn/k": 1,
      "knn/num_examples": 52,
      "knn/bank_size": 52,
    }
