"""Shared test set-up.

TensorFlow can split the host CPU into logical devices only once per process, before any op
runs, so every in-process test sees the same four logical CPUs: `/cpu:0` alone is the
single-device case, `/cpu:0..1` and `/cpu:0..3` are the 2- and 4-replica MirroredStrategy cases.
End-to-end tests run `run.py` in subprocesses and set their own devices.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

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
def replica_runs(tmp_path_factory):
  """test_run_e2e's 1/2/4-replica runs, made once for test_run_e2e, test_multiworker and
  test_after_pretraining.

  pytest-xdist makes a session fixture once per worker process, so those modules put their tests
  in one xdist_group (pytest.ini runs `--dist loadgroup`), which one worker runs.
  """
  import test_run_e2e  # pylint: disable=g-import-not-at-top

  return test_run_e2e.make_replica_runs(tmp_path_factory)
