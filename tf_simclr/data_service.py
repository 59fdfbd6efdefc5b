"""The pretraining input on a tf.data service: servers, the check of a dispatcher, the pipeline.

`python -m tf_simclr.data_service dispatcher --port=5050 [--work_dir=DIR]` and
`python -m tf_simclr.data_service worker --dispatcher_address=HOST:5050 [--port=5051]` start
the servers; they run until killed (SIGTERM or Ctrl-C stops them cleanly, status 0).
`run.py --data_service=grpc://HOST:5050` then sends its pretraining input there
(docs/distributed.md).

The processing mode is `distributed_epoch`: the dispatcher hands each global batch's number
(a step) to one worker, which makes the examples of that batch (`datasets`' determinism
contract: same ids, epochs and views), one element each. Every example of the stream is thus
made once, by one worker, and every input pipeline of the run draws from the same job, so the
run trains on the same examples and views as without the service, in an order that depends on
which worker finishes first (`parallel_epochs` would make every worker produce the whole stream:
each example once per worker).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import re
import signal
import socket
import sys
import threading

import tensorflow as tf

from tf_simclr.data import pipeline
from tf_simclr.data import sources

PROCESSING_MODE = "distributed_epoch"
# How long the start of a run waits for the dispatcher (TCP connect, then registering a dataset):
# tf.data service itself retries an unreachable dispatcher for minutes without a word.
CONNECT_TIMEOUT_S = 10.0
_ADDRESS = re.compile(r"grpc://(?P<host>[^\s:/]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})")


class ServiceError(ValueError):
  """The dispatcher cannot be used; the message is one line meant for the user."""


def check_dispatcher(service: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
  """Raises ServiceError unless a tf.data service dispatcher answers at `service` in time.

  First a TCP connection (refused or unresolvable addresses fail at once), then the registration
  of a one-element dataset, in a thread because it blocks while the dispatcher does not answer.
  """
  match = _ADDRESS.fullmatch(service or "")
  if not match:
    raise ServiceError(f"--data_service must be grpc://HOST:PORT, got {service!r}")
  host, port = match["host"].strip("[]"), int(match["port"])
  try:
    socket.create_connection((host, port), timeout=timeout_s).close()
  except OSError as err:
    raise ServiceError(
      f"no tf.data service dispatcher at {service}: {err.strerror or err} (start one with "
      "python -m tf_simclr.data_service dispatcher)"
    ) from None
  answer = []
  probe = tf.data.Dataset.range(1)
  thread = threading.Thread(
    target=lambda: answer.append(tf.data.experimental.service.register_dataset(service, probe)),
    daemon=True,  # left blocked, it must not keep the process alive
  )
  thread.start()
  thread.join(timeout_s)
  if not answer:
    raise ServiceError(
      f"{service} accepts connections but no tf.data service dispatcher answered within "
      f"{timeout_s:g} s"
    )


def job_name(model_dir: str, start_step: int) -> str:
  """The job every input pipeline of one run (and one start) shares at the dispatcher.

  A resume is a new job: the dispatcher may still hold the previous start's, half consumed.
  """
  digest = hashlib.sha256(model_dir.encode()).hexdigest()[:16]
  return f"tf_simclr_{digest}_step{start_step}"


def step_examples(step, num_examples: int, block: int, seed: int, global_batch_size: int):
  """The stream positions of global batch `step` as {'position', 'epoch'}: int64, G elements.

  The blocks of `datasets`' determinism contract that the batch touches, each permuted as
  `pipeline.global_stream` does; 'position' indexes `Source.records`.
  """
  per_epoch = math.ceil(num_examples / block)
  first = step * global_batch_size
  last = first + global_batch_size - 1

  def counter(position):  # the stream's block number (epoch * per_epoch + block)
    return position // num_examples * per_epoch + position % num_examples // block

  root = pipeline.root_key(seed, pipeline.SHUFFLE_STREAM)

  @tf.autograph.experimental.do_not_convert
  def block_positions(c):
    epoch, index = c // per_epoch, c % per_epoch
    size = tf.cast(tf.minimum(tf.constant(block, tf.int64), num_examples - index * block), tf.int32)
    order = pipeline.block_order(root, epoch, index, size)
    return {"position": index * block + tf.cast(order, tf.int64), "epoch": tf.fill([size], epoch)}

  ds = tf.data.Dataset.range(counter(first), counter(last) + 1).map(block_positions).unbatch()
  return ds.skip(first % num_examples % block).take(global_batch_size)


def worker_dataset(
  source: sources.Source,
  global_batch_size: int,
  seed: int,
  image_size: int,
  num_views: int = 2,
  start_step: int = 0,
  num_steps: int | None = None,
  shuffle_buffer: int | None = None,
  **augmentation,
) -> tf.data.Dataset:
  """What the service's workers run: the examples of steps [start_step, + num_steps), one each.

  Args:
    source: an image-folder `sources.Source` (its records are file paths).
    global_batch_size, seed, image_size, num_views, start_step, shuffle_buffer: as
      `pipeline.train_dataset`.
    num_steps: None: without end.
    **augmentation: `pipeline.example_to_views`'s color_jitter_strength, use_blur, min_scale,
      horizontal_flip, augment_on_device and crop_on_device.

  Returns:
    tf.data.Dataset of `pipeline.example_to_views` elements: 'views' float32 [V, s, s, 3], ...
  """
  if not source.reads_files:
    raise ServiceError("the tf.data service reads image folders (examples by id) only")
  n = source.num_examples
  block = min(n, shuffle_buffer or pipeline.DEFAULT_SHUFFLE_BUFFER)
  # The records as constants of the graph that the workers run: a path is cheap to look up.
  table = source.records.batch(n).get_single_element()
  end = 2**62 if num_steps is None else start_step + num_steps

  @tf.autograph.experimental.do_not_convert
  def record(ex):
    found = {k: tf.gather(v, ex["position"]) for k, v in table.items()}
    return dict(found, epoch=ex["epoch"])

  @tf.autograph.experimental.do_not_convert
  def decode(ex):
    return dict(ex, image=pipeline.decode_image(tf.io.read_file(ex["image"])))

  steps = tf.data.Dataset.range(start_step, end)  # splittable: one split per global batch
  ds = steps.flat_map(lambda k: step_examples(k, n, block, seed, global_batch_size))
  ds = ds.map(record)
  # A file that fails to read or decode is dropped, and logged by the worker that met it.
  ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=True)

  @tf.autograph.experimental.do_not_convert
  def views(ex):
    return pipeline.example_to_views(
      ex, seed=seed, image_size=image_size, num_views=num_views, **augmentation
    )

  ds = ds.map(views, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.prefetch(tf.data.AUTOTUNE)


def train_dataset(
  source: sources.Source,
  global_batch_size: int,
  per_replica_batch_size: int,
  num_input_pipelines: int,
  input_pipeline_id: int,
  *,
  service: str,
  job: str,
  **kwargs,
) -> tf.data.Dataset:
  """`pipeline.train_dataset`'s batches, made by the tf.data service at `service`.

  Every pipeline joins the job `job` (`job_name`): the workers make each example of the
  stream once, and each goes to whichever pipeline asks first.

  Args:
    source, global_batch_size, per_replica_batch_size, num_input_pipelines,
      input_pipeline_id: as `pipeline.train_dataset`.
    service: grpc://HOST:PORT of the dispatcher.
    job: the job's name, the same in every pipeline and process of the run.
    **kwargs: `worker_dataset`'s (seed, image_size, start_step, augmentation, ...);
      `cache` is refused by the flags and ignored here.

  Returns:
    tf.data.Dataset of {'views': float32 [b, V, s, s, 3], 'label': int64 [b], 'id': int64 [b]}
    (and 'distort' with augment_on_device; 'image' for 'views' with crop_on_device),
    b = per_replica_batch_size.
  """
  pipeline.check_batching(
    global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
  )
  kwargs.pop("cache", None)
  ds = worker_dataset(source, global_batch_size, **kwargs)
  ds = ds.apply(tf.data.experimental.service.distribute(PROCESSING_MODE, service, job_name=job))
  ds = pipeline.batch_views(ds, per_replica_batch_size)
  return ds.prefetch(tf.data.AUTOTUNE)


# ----------------------------------------------------------------------------------------------
# The servers.


class _Parser(argparse.ArgumentParser):
  """Bad arguments raise ValueError (one `error:` line, status 1), not argparse's usage, 2."""

  def error(self, message):
    raise ValueError(message)


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog="python -m tf_simclr.data_service", description="tf.data service servers for run.py"
  )
  sub = parser.add_subparsers(dest="role", required=True, parser_class=_Parser)
  dispatcher = sub.add_parser("dispatcher", help="the dispatcher (one per run)")
  dispatcher.add_argument("--port", type=int, default=5050)
  dispatcher.add_argument(
    "--work_dir",
    default=None,
    help="fault-tolerant state (local or gs://): a restarted dispatcher resumes its jobs",
  )
  worker = sub.add_parser("worker", help="a worker: decodes and augments")
  worker.add_argument("--dispatcher_address", required=True, help="HOST:PORT of the dispatcher")
  worker.add_argument("--port", type=int, default=5051)
  worker.add_argument(
    "--worker_address",
    default=f"{socket.gethostname()}:%port%",
    help="HOST:PORT at which the trainers reach this worker (%%port%%: the bound port)",
  )
  return parser


def start_server(args: argparse.Namespace):
  """The DispatchServer or WorkerServer that `args` (from the command line) describe."""
  service = tf.data.experimental.service
  if args.role == "dispatcher":
    config = service.DispatcherConfig(
      port=args.port, work_dir=args.work_dir, fault_tolerant_mode=bool(args.work_dir)
    )
    return service.DispatchServer(config)
  config = service.WorkerConfig(
    dispatcher_address=args.dispatcher_address.removeprefix("grpc://"),
    worker_address=args.worker_address,
    port=args.port,
  )
  return service.WorkerServer(config)


def main(argv=None) -> int:
  """Starts the server; returns its exit status when SIGTERM or SIGINT stops it."""
  try:
    args = _parser().parse_args(argv)
    if not 0 <= args.port < 65536:
      raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.role == "worker":  # its CPU only runs input pipelines
      pipeline.feed_only_threads()
    server = start_server(args)
  except (ValueError, tf.errors.OpError) as err:
    print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
    return 1
  stop = threading.Event()
  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, lambda *_: stop.set())
  where = server.target if args.role == "dispatcher" else server._address  # noqa: SLF001
  print(f"tf.data service {args.role} at {where}; SIGTERM stops it", flush=True)
  while not stop.wait(1.0):  # the main thread must run Python for the handlers to run
    pass
  server._stop()  # noqa: SLF001  (the public API has no stop)
  return 0


if __name__ == "__main__":
  sys.exit(main())
