"""Shared test set-up.

TensorFlow can split the host CPU into logical devices only once per process, before any op
runs, so every in-process test sees the same four logical CPUs: `/cpu:0` alone is the
single-device case, `/cpu:0..1` and `/cpu:0..3` are the 2- and 4-replica MirroredStrategy cases.
End-to-end tests run `run.py` in subprocesses and set their own devices.

Shared fixtures: `strategies`, `data_dir` (the built-in shapes10 dataset, prepared once per test
process), `shapes100` (its first 100 training examples) and `replica_runs` (the 1/2/4-replica
runs). Shared helpers are in runs.py; test modules do not import each other.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import runs  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
  _cpus[0], [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)


def mirrored(num_replicas):
  """A MirroredStrategy over the first `num_replicas` logical CPUs."""
  return tf.distribute.MirroredStrategy(
    [f"/cpu:{i}" for i in range(num_replicas)],
    cross_device_ops=tf.distribute.ReductionToOneDevice(),
  )


@pytest.fixture(scope="session")
def strategies():
  """{1: OneDeviceStrategy, 2: Mirrored(2), 4: Mirrored(4)} on logical CPUs."""
  return {1: tf.distribute.OneDeviceStrategy("/cpu:0"), 2: mirrored(2), 4: mirrored(4)}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The shapes10 data_dir, prepared once per test process (before runs race to write it)."""
  return runs.shared_data_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def deadleaves_dir(tmp_path_factory):
  """The deadleaves10 data_dir, built once per test process (its 6,000 images take ~15 s)."""
  return runs.shared_data_dir(tmp_path_factory, "deadleaves10")


@pytest.fixture(scope="session")
def shapes100(data_dir):
  """The first 100 shapes10 training examples (a Source): epochs are a few steps long."""
  from tf_simclr.data import sources  # pylint: disable=g-import-not-at-top

  return sources.load_source("shapes10", "train[:100]", data_dir=data_dir)


@pytest.fixture(scope="session")
def replica_runs(tmp_path_factory):
  """{replicas: (model_dir, CompletedProcess)}: 3-step runs on 1, 2 and 4 CPU replicas, made once
  for the tests marked `xdist_group("replica_runs")`.

  pytest-xdist makes a session fixture once per worker process, so every test that uses it is in
  that xdist_group (pytest.ini runs `--dist loadgroup`), which one worker runs; no other test is.
  """
  return runs.make_replica_runs(tmp_path_factory)


# The longest tests (seconds on 2 idle cores, `--durations`): started first, so that the other
# worker runs them while one runs the `replica_runs` group, instead of one of them starting last.
# xdist hands out the largest group first, then single tests in collection order.
LONG_FIRST = (
  "test_learning.py::test_short_pretraining_beats_the_untrained_encoder",
  "test_small_images.py::test_small_images_preset_beats_raw_pixels",
  "test_faults.py::test_interrupted_run_resumes_to_the_uninterrupted_weights",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.nodeid.rsplit("/", 1)[-1]
    return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

  items.sort(key=rank)  # stable: the rest keep their order
