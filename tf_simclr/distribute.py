"""Choosing a tf.distribute strategy: TPU, several workers, several GPUs, or CPU replicas.

`--cpu_replicas=N` splits the host CPU into N logical devices and mirrors over them: the
distributed path (all-gather of negatives, synchronized BN, gradient all-reduce) on one laptop,
which is how its correctness is tested.

Also what the training loop needs to stop together: `StopSignal` (SIGTERM, sent by schedulers
and preemptible VMs before they stop a job) and `ClusterSync` (values agreed over workers).
"""

from __future__ import annotations

import glob
import json
import os
import signal
import threading

from absl import logging
import numpy as np
import tensorflow as tf

from tf_simclr import config
from tf_simclr import errors

STRATEGIES = config.STRATEGIES


def configure_cpu_replicas(num_replicas: int) -> None:
  """Splits the first physical CPU into `num_replicas` logical devices.

  Must run before TensorFlow initialises its devices (before any op runs); TensorFlow cannot
  change logical devices afterwards in the same process.
  """
  if num_replicas <= 1:
    return
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
    cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_replicas
  )


def _tpu_strategy(tpu_name, tpu_zone, gcp_project, master):
  # As in TF's TPU guide: resolve, connect, initialise, then build the strategy.
  tpu = tpu_name or master or ""
  try:
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(
      tpu=tpu, zone=tpu_zone, project=gcp_project
    )
    tf.config.experimental_connect_to_cluster(resolver)
    topology = tf.tpu.experimental.initialize_tpu_system(resolver)
  except (ValueError, RuntimeError, ImportError, OSError, tf.errors.OpError) as err:
    # e.g. no TPU name off Cloud, an unreachable metadata server (zone, project), no
    # cloud-tpu-client for a named TPU, an unknown TPU, a TensorFlow without TPU support.
    raise ValueError(
      f"cannot set up the TPU {tpu or '(found from the environment)'!r}: "
      f"{errors.first_line(err)[:300]}"
    ) from None
  logging.info(
    "TPU topology: %d tasks, %d TPUs per task", topology.num_tasks, topology.num_tpus_per_task
  )
  return tf.distribute.TPUStrategy(resolver)


def _check_tf_config(text: str) -> None:
  """Raises ValueError, naming the problem, unless TF_CONFIG describes this task in a cluster."""
  try:
    config = json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"TF_CONFIG is not valid JSON ({err})") from None
  cluster = config.get("cluster") if isinstance(config, dict) else None
  task = config.get("task") if isinstance(config, dict) else None
  if not isinstance(cluster, dict) or not isinstance(task, dict):
    raise ValueError(
      'TF_CONFIG needs "cluster" and "task", e.g. {"cluster": {"worker": '
      '["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}'
    )
  others = sorted(set(cluster) - {"chief", "worker"})
  if others:
    raise ValueError(
      f"TF_CONFIG: multi_worker training uses 'chief' and 'worker' tasks only, not {others}"
    )
  kind, index = task.get("type"), task.get("index")
  tasks = cluster.get(kind)
  if not isinstance(tasks, list) or not isinstance(index, int) or not 0 <= index < len(tasks):
    raise ValueError(f"TF_CONFIG: task {task} is not in the cluster {cluster}")


def _tpu_available() -> bool:
  """Whether this host is a TPU VM, judged from its device files.

  Asking TPUClusterResolver would query the cloud metadata server, which hangs off the cloud.
  """
  return os.path.exists("/dev/accel0") or bool(glob.glob("/dev/vfio/[0-9]*"))


def _tpu_choice(strategy, cpu_replicas, use_tpu, tpu_name, master) -> str | None:
  """The TPU that `make_strategy` uses: 'asked' (`strategy=tpu`, or `auto` with `use_tpu` and a
  name or master), 'attached' (`auto` with `use_tpu` on a TPU VM, at most one CPU replica), or
  None. Decided from the arguments and the host's device files: no connection, TF not started.
  """
  if strategy == "tpu" or (strategy == "auto" and use_tpu and (tpu_name or master)):
    return "asked"
  if strategy == "auto" and use_tpu and cpu_replicas <= 1 and _tpu_available():
    return "attached"
  return None


def steps_on_accelerator(
  strategy: str = "auto",
  cpu_replicas: int = 0,
  use_tpu: bool | None = None,
  tpu_name: str | None = None,
  master: str | None = None,
) -> bool:
  """Whether `make_strategy` with these arguments runs the step on a TPU or GPUs.

  Answered before TensorFlow starts (physical devices only), for settings that must precede it.
  """
  if _tpu_choice(strategy, cpu_replicas, use_tpu, tpu_name, master):
    return True
  return cpu_replicas <= 1 and bool(tf.config.list_physical_devices("GPU"))


def make_strategy(
  strategy: str = "auto",
  cpu_replicas: int = 0,
  use_tpu: bool | None = None,
  tpu_name: str | None = None,
  tpu_zone: str | None = None,
  gcp_project: str | None = None,
  master: str | None = None,
) -> tf.distribute.Strategy:
  """Returns the strategy asked for.

  Args:
    strategy: `auto` (a TPU if `use_tpu` and one is named or attached, else all GPUs, else
      the CPU, or `cpu_replicas` logical CPUs), `tpu`, `multi_worker` (cluster from
      TF_CONFIG), `mirrored` (all local GPUs, or the logical CPUs), `one_device`.
    cpu_replicas: mirror over this many logical CPU devices (needs `configure_cpu_replicas`
      first); 0 or 1 means the plain CPU.
    use_tpu: the reference's `--use_tpu`. It does not force the TPU path: with
      `strategy=auto`, True selects a TPU only if one is named (`tpu_name` or `master`), or if
      this host is a TPU VM and `cpu_replicas` is at most 1; otherwise `auto` goes on to the
      GPUs or the CPU. Without it, `auto` never selects a TPU, even on a TPU VM.
    tpu_name, tpu_zone, gcp_project, master: for TPUClusterResolver.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "one_device" and cpu_replicas > 1:  # Would silently be mirrored (below).
    raise ValueError(
      f"strategy=one_device runs on one device, but cpu_replicas={cpu_replicas} asks for "
      "several: use strategy=mirrored (or auto) with cpu_replicas"
    )
  tpu = _tpu_choice(strategy, cpu_replicas, use_tpu, tpu_name, master)
  if tpu == "asked":
    return _tpu_strategy(tpu_name, tpu_zone, gcp_project, master)
  if strategy == "multi_worker":
    if "TF_CONFIG" not in os.environ:
      raise ValueError(
        "strategy=multi_worker needs the cluster in the TF_CONFIG environment variable"
      )
    _check_tf_config(os.environ["TF_CONFIG"])
    if cpu_replicas > 1:
      raise ValueError(
        "--cpu_replicas does not apply to strategy=multi_worker: each worker "
        "uses all its GPUs, or one CPU"
      )
    # A worker that dies is detected by the coordination service that this strategy starts
    # (heartbeats, 10 s by default) and fails the collectives of the others; a collective
    # timeout (CommunicationOptions) is, per TF's docs, for debugging only.
    return tf.distribute.MultiWorkerMirroredStrategy()

  gpus = tf.config.list_logical_devices("GPU")
  if cpu_replicas > 1:
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:cpu_replicas]
    if len(devices) < cpu_replicas:
      raise ValueError(
        f"cpu_replicas={cpu_replicas} but only {len(devices)} logical CPU "
        "devices exist (configure_cpu_replicas must run before TF starts)"
      )
    # The default NCCL all-reduce is GPU-only; reduce through one device.
    return tf.distribute.MirroredStrategy(
      devices, cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
  if strategy == "one_device":
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
  if tpu == "attached":
    return _tpu_strategy(None, None, None, "local")
  if gpus or strategy == "mirrored":
    return tf.distribute.MirroredStrategy()
  return tf.distribute.OneDeviceStrategy("/cpu:0")


def check_batch(
  batch_size: int, parts: int, what: str = "train_batch_size", parts_name: str = "replicas"
) -> int:
  """Refuses a batch that does not split evenly into `parts`; returns the share of each.

  Args:
    batch_size: B, e.g. the global batch.
    parts: P, e.g. the replicas or the input pipelines that share it.
    what, parts_name: the names in the message, e.g. 'eval_batch_size', 'input pipelines'.
  Returns:
    B // P.
  Raises:
    ValueError: B <= 0, or B not a multiple of P.
  """
  if batch_size <= 0 or batch_size % parts:
    raise ValueError(
      f"{what}={batch_size} must be a positive multiple of the number of {parts_name} ({parts})"
    )
  return batch_size // parts


def input_fn(global_batch_size: int, make_dataset):
  """The argument of `strategy.distribute_datasets_from_function`: one dataset per pipeline.

  Args:
    global_batch_size: G, examples per step over all replicas.
    make_dataset: called with keyword arguments `per_replica_batch_size` (G / replicas),
      `num_input_pipelines` and `input_pipeline_id` (from the `tf.distribute.InputContext`);
      returns that pipeline's tf.data.Dataset of per-replica batches.
  Returns:
    A function of a `tf.distribute.InputContext` returning a tf.data.Dataset.
  """

  def fn(ctx: tf.distribute.InputContext):
    return make_dataset(
      per_replica_batch_size=ctx.get_per_replica_batch_size(global_batch_size),
      num_input_pipelines=ctx.num_input_pipelines,
      input_pipeline_id=ctx.input_pipeline_id,
    )

  return fn


def distribute_input(
  strategy: tf.distribute.Strategy, global_batch_size: int, make_dataset, what: str = "batch_size"
) -> tf.distribute.DistributedDataset:
  """`make_dataset` (see `input_fn`) distributed over the replicas of `strategy`.

  Raises:
    ValueError: `global_batch_size` (named `what` in the message) does not split evenly over
      the replicas.
  """
  check_batch(global_batch_size, strategy.num_replicas_in_sync, what)
  return strategy.distribute_datasets_from_function(input_fn(global_batch_size, make_dataset))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """Whether this process writes what there is one of: summaries, results, exports, flags.

  The chief is the 'chief' task if the cluster has one, else worker 0; a single process
  (TPUStrategy's single client too) is its own chief.
  """
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return True
  resolver = strategy.cluster_resolver
  jobs = resolver.cluster_spec().jobs
  if not jobs:
    return True
  if "chief" in jobs:
    return resolver.task_type == "chief"
  return resolver.task_type == "worker" and resolver.task_id == 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
  """Processes that train together: the chief and worker tasks of a multi-worker cluster, else 1."""
  if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
    return 1  # TPUStrategy drives every TPU host from one client
  spec = strategy.cluster_resolver.cluster_spec()
  return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) or 1


def native_bfloat16(cpuinfo: str) -> bool:
  """Whether a CPU, described by the text of /proc/cpuinfo, has bfloat16 arithmetic.

  x86: the `avx512_bf16` or `amx_bf16` flag; ARM: `bf16` among the features.
  """
  flags = set()
  for line in cpuinfo.splitlines():
    if line.startswith(("flags", "Features")):
      flags.update(line.partition(":")[2].split())
  return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def warn_slow_bfloat16(strategy: tf.distribute.Strategy, mixed_precision: str) -> bool:
  """Warns (returns True) when mixed_bfloat16 will run on a CPU without bfloat16 arithmetic.

  TensorFlow then emulates it, several times slower than float32.
  """
  if mixed_precision != "mixed_bfloat16" or isinstance(strategy, tf.distribute.TPUStrategy):
    return False
  if tf.config.list_logical_devices("GPU"):
    return False
  try:
    with open("/proc/cpuinfo") as f:
      text = f.read()
  except OSError:
    return False
  if native_bfloat16(text):
    return False
  logging.warning(
    "--mixed_precision=mixed_bfloat16 on a CPU without bfloat16 arithmetic (no "
    "avx512_bf16 / amx_bf16): TensorFlow emulates it, several times slower than "
    "float32 (--mixed_precision=none) here"
  )
  return True


class StopSignal:
  """Remembers that SIGTERM or SIGINT arrived, so that training can stop between step calls.

  SIGTERM is what schedulers and preemptible VMs send some seconds before they stop a job;
  SIGINT is Ctrl-C. Python runs the handler in the main thread between bytecodes, so it never
  interrupts a step (a tf.function call); the loop reads `received` between calls. A first
  SIGINT restores the default action, so that a second Ctrl-C stops the process at once. A
  context manager: the previous handlers come back on exit. Off the main thread, where Python
  cannot install signal handlers, and for a signal the parent process ignores, the signals keep
  their previous meaning.

  Attributes:
    received: whether a signal arrived.
    name: the first signal's name ('SIGTERM' or 'SIGINT'), or None.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = False
    self.name = None
    self._previous = {}

  def __enter__(self) -> "StopSignal":
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        if signal.getsignal(signum) is signal.SIG_IGN:
          continue  # Ignored by whoever started us (nohup, a shell's background job): keep it.
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *unused_exc_info):
    for signum, previous in self._previous.items():
      # None: the previous handler was not set from Python; SIG_DFL is then what it was.
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame  # Only flags: anything more could run in the middle of the loop's code.
    self.received = True
    self.name = self.name or signal.Signals(signum).name
    if signum == signal.SIGINT:
      signal.signal(signal.SIGINT, signal.SIG_DFL)
      os.write(
        2,
        b"SIGINT: stopping when the current call of steps ends (a few seconds), with a "
        b"checkpoint; press Ctrl-C again to stop at once, without one\n",
      )


class ClusterSync:
  """Gathers a few integers from every worker between step calls, so all decide alike.

  With several workers this is one small all-gather (every worker must call it at the same
  point, as any collective); otherwise it returns the local values without communicating.
  """

  def __init__(self, strategy: tf.distribute.Strategy):
    self._gather = None
    if num_workers(strategy) > 1:
      # One tf.function, traced once: every worker then runs the same collective each call.
      @tf.function(autograph=False)
      def gather(values):
        per_replica = strategy.run(tf.identity, args=(values,))
        return strategy.gather(per_replica, axis=0)

      self._gather = gather

  def __call__(self, *values: int) -> np.ndarray:
    """int64 [R, len(values)]: row r holds the values of the worker of replica r (R >= 1)."""
    local = tf.constant([values], tf.int64)
    return (self._gather(local) if self._gather is not None else local).numpy()
