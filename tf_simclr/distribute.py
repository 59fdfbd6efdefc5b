"""Choosing a tf.distribute strategy: TPU, several workers, several GPUs, or CPU replicas.

`--cpu_replicas=N` splits the host CPU into N logical devices and mirrors over them: the
distributed path (all-gather of negatives, synchronized BN, gradient all-reduce) on one laptop,
which is how its correctness is tested.
"""
from __future__ import annotations

import glob
import json
import os

from absl import logging
import tensorflow as tf

STRATEGIES = ("auto", "tpu", "multi_worker", "mirrored", "one_device")


def configure_cpu_replicas(num_replicas: int) -> None:
  """Splits the first physical CPU into `num_replicas` logical devices.

  Must run before TensorFlow initialises its devices (before any op runs); TensorFlow cannot
  change logical devices afterwards in the same process.
  """
  if num_replicas <= 1:
    return
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_replicas)


def _tpu_strategy(tpu_name, tpu_zone, gcp_project, master):
  # As in TF's TPU guide: resolve, connect, initialise, then build the strategy.
  resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu=tpu_name or master or "", zone=tpu_zone, project=gcp_project)
  tf.config.experimental_connect_to_cluster(resolver)
  topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  logging.info("TPU topology: %d tasks, %d TPUs per task", topology.num_tasks,
               topology.num_tpus_per_task)
  return tf.distribute.TPUStrategy(resolver)


def _tpu_available() -> bool:
  """Whether this host is a TPU VM, judged from its device files.

  Asking TPUClusterResolver would query the cloud metadata server, which hangs off the cloud.
  """
  return os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))


def make_strategy(strategy: str = "auto", cpu_replicas: int = 0, use_tpu: bool | None = None,
                  tpu_name: str | None = None, tpu_zone: str | None = None,
                  gcp_project: str | None = None, master: str | None = None
                  ) -> tf.distribute.Strategy:
  """Returns the strategy asked for.

  Args:
    strategy: `auto` (a TPU if `use_tpu` or one is attached, else all GPUs, else the CPU, or
      `cpu_replicas` logical CPUs), `tpu`, `multi_worker` (cluster from TF_CONFIG), `mirrored`
      (all local GPUs, or the logical CPUs), `one_device`.
    cpu_replicas: mirror over this many logical CPU devices (needs `configure_cpu_replicas`
      first); 0 or 1 means the plain CPU.
    use_tpu: the reference's `--use_tpu`: with `strategy=auto`, True forces the TPU path.
    tpu_name, tpu_zone, gcp_project, master: for TPUClusterResolver.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "auto" and (use_tpu and (tpu_name or master)):
    strategy = "tpu"
  if strategy == "tpu":
    return _tpu_strategy(tpu_name, tpu_zone, gcp_project, master)
  if strategy == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ValueError("strategy=multi_worker needs the cluster in the TF_CONFIG environment "
                       "variable")
    json.loads(os.environ["TF_CONFIG"])  # fail early on a malformed TF_CONFIG
    return tf.distribute.MultiWorkerMirroredStrategy()

  gpus = tf.config.list_logical_devices("GPU")
  if cpu_replicas > 1:
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
    if len(devices) < cpu_replicas:
      raise ValueError(f"cpu_replicas={cpu_replicas} but only {len(devices)} logical CPU "
                       "devices exist (configure_cpu_replicas must run before TF starts)")
    # The default NCCL all-reduce is GPU-only; reduce through one device.
    return tf.distribute.MirroredStrategy(
        devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
  if strategy == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if strategy == "auto" and use_tpu and _tpu_available():
    return _tpu_strategy(None, None, None, "local")
  if gpus or strategy == "mirrored":
    return tf.distribute.MirroredStrategy()
  return tf.distribute.OneDeviceStrategy("/cpu:0")
