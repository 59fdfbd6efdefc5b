"""Strategy selection, TF_CONFIG checks, SIGTERM flag and cross-worker agreement in one process.

Two real workers are in test_multiworker.py.
"""

import importlib.util
import json
import os
import signal

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import distribute


@pytest.mark.parametrize(
  "tf_config,words",
  [
    ("{not json", ["not valid JSON"]),
    (json.dumps({"cluster": {"worker": ["a:1"]}}), ['"cluster" and "task"']),
    (
      json.dumps(
        {"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}
      ),
      ["'ps'"],
    ),
    (
      json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}),
      ["is not in the cluster"],
    ),
  ],
)
def test_bad_tf_config_is_refused_before_any_connection(monkeypatch, tf_config, words):
  monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(ValueError) as info:
    distribute.make_strategy("multi_worker")
  assert all(w in str(info.value) for w in words), str(info.value)


def test_multi_worker_needs_tf_config_and_no_cpu_replicas(monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  with pytest.raises(ValueError, match="TF_CONFIG"):
    distribute.make_strategy("multi_worker")
  monkeypatch.setenv(
    "TF_CONFIG",
    json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}),
  )
  with pytest.raises(ValueError, match="cpu_replicas"):
    distribute.make_strategy("multi_worker", cpu_replicas=2)


def test_the_step_is_on_an_accelerator_where_make_strategy_puts_it():
  # Named TPUs are decided from the arguments alone, before any connection.
  assert distribute.steps_on_accelerator("tpu")
  assert distribute.steps_on_accelerator("auto", use_tpu=True, tpu_name="t", cpu_replicas=2)
  assert distribute.steps_on_accelerator("auto", use_tpu=True, master="grpc://10.0.0.2:8470")
  assert not distribute.steps_on_accelerator("auto", use_tpu=False, tpu_name="t")
  # Otherwise the GPUs decide; logical CPU replicas always train on the CPU.
  gpus = bool(tf.config.list_physical_devices("GPU"))
  for name in ("auto", "mirrored", "one_device", "multi_worker"):
    assert distribute.steps_on_accelerator(name) == gpus, name
  assert not distribute.steps_on_accelerator("mirrored", cpu_replicas=2)
  for name in ("auto", "one_device"):  # what they build here agrees
    devices = distribute.make_strategy(name).extended.worker_devices
    assert any("GPU" in d for d in devices) == distribute.steps_on_accelerator(name), devices


def test_one_process_is_its_own_chief(strategies):
  for strategy in strategies.values():
    assert distribute.is_chief(strategy)
    assert distribute.num_workers(strategy) == 1


def test_cluster_sync_without_workers_returns_the_local_values(strategies):
  rows = distribute.ClusterSync(strategies[2])(1, 7, 3)
  np.testing.assert_array_equal(rows, [[1, 7, 3]])


def test_stop_signal_records_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with distribute.StopSignal() as stop:
    assert not stop.received
    os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, in this thread
    for _ in range(1000):
      if stop.received:
        break
    assert stop.received
  assert signal.getsignal(signal.SIGTERM) is before


def test_unusable_tpu_is_one_clear_error():
  if importlib.util.find_spec("cloud_tpu_client") is not None:
    pytest.skip("cloud-tpu-client is installed: the resolver would try to reach the TPU API")
  # Without the client, TPUClusterResolver refuses a named TPU at once (a RuntimeError).
  with pytest.raises(ValueError, match="cannot set up the TPU 'no-such-tpu': .*cloud-tpu-client"):
    distribute.make_strategy("tpu", tpu_name="no-such-tpu", tpu_zone="zone", gcp_project="project")


def test_ctrl_c_stops_like_sigterm_and_a_second_one_at_once():
  runner_handler = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own
  try:
    with distribute.StopSignal() as stop:
      os.kill(os.getpid(), signal.SIGINT)  # without the handler: KeyboardInterrupt here
      for _ in range(1000):
        if stop.received:
          break
      assert stop.received and stop.name == "SIGINT"
      # The second Ctrl-C gets the default action: the process ends at once, in any code.
      assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # SIGINT ignored by the parent (nohup, a background job) stays ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with distribute.StopSignal():
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  finally:
    signal.signal(signal.SIGINT, runner_handler)


def test_native_bfloat16_is_read_from_the_cpu_flags():
  assert not distribute.native_bfloat16("processor: 0\nflags\t\t: fpu avx2 avx512f fma\n")
  assert distribute.native_bfloat16("flags\t\t: fpu avx512f avx512_bf16 amx_tile\n")
  assert distribute.native_bfloat16("flags\t\t: fpu amx_bf16\n")
  assert distribute.native_bfloat16("Features\t: fp asimd bf16 i8mm\n")  # aarch64
  assert not distribute.warn_slow_bfloat16(None, "none")


def test_one_device_with_cpu_replicas_is_a_contradiction():
  # Refused before any device is set up (it used to give a MirroredStrategy silently).
  with pytest.raises(ValueError, match="strategy=one_device runs on one device, but cpu_r"):
    distribute.make_strategy("one_device", cpu_replicas=4)
