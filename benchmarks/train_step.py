"""Training throughput: `python -m benchmarks.train_step [--flags]` (from the repository root).

Runs real training steps -- `trainer.Trainer`'s step under the chosen strategy, fed by
`pipeline.train_dataset` (decode, two `simclr_augment` views per image, batch, prefetch) -- on
synthetic uint8 images, and prints one JSON line last:
  img_per_s             source images per second (each gives two views), from step_s
  step_s                median wall time of the timed steps
  first_step_s          the first step: tracing, compilation and one step
  stem                  "cifar" (3x3 stem, 32 px or less) or "imagenet" (7x7 and max pool)
  gflop_per_step        convolution and matmul FLOPs of one step (forward and backward),
                        counted from the traced step graph's ops and their static shapes
  achieved_gflop_per_s  gflop_per_step / step_s
  peak_rss_mb           peak resident memory of the process
Absolute figures are noisy when other processes share the cores; compare runs made together.
Bad flags: one `error: ...` line on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import typing

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import benchmarks  # noqa: E402

if typing.TYPE_CHECKING:  # TensorFlow is imported after the flags are parsed: fast refusals.
  import tensorflow as tf

  from tf_simclr import trainer as trainer_lib

_NUM_SOURCES = 512  # distinct synthetic images, cycled through by the input pipeline
_NUM_CLASSES = 10


def parse(argv):
  """The benchmark's flags; a bad one exits with one `error: ...` line."""
  p = benchmarks.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--resnet_depth", type=int, default=18)
  p.add_argument("--width_multiplier", type=float, default=1)
  p.add_argument("--sk_ratio", type=float, default=0.0)
  p.add_argument("--se_ratio", type=float, default=0.0)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument(
    "--source_size",
    type=int,
    default=0,
    help="side of the synthetic source images (default: image_size, or 256 above 64 px)",
  )
  p.add_argument("--train_batch_size", type=int, default=128)
  p.add_argument("--steps", type=int, default=6, help="timed steps after the warm-up")
  p.add_argument(
    "--warmup", type=int, default=0, help="untimed steps between the first step and the timed ones"
  )
  p.add_argument("--optimizer", default="lars", choices=["lars", "momentum", "adam"])
  p.add_argument(
    "--mixed_precision", default="none", choices=["none", "mixed_bfloat16", "mixed_float16"]
  )
  p.add_argument("--jit_compile", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--augment_on_device", action=argparse.BooleanOptionalAction, default=False)
  p.add_argument("--use_blur", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--global_bn", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--cpu_replicas", type=int, default=0)
  p.add_argument("--strategy", default="auto", choices=["auto", "mirrored", "one_device"])
  args = p.parse_args(argv)
  for name in ("steps", "train_batch_size", "image_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name}={getattr(args, name)} must be positive")
  for name in ("source_size", "cpu_replicas", "warmup"):
    if getattr(args, name) < 0:
      p.error(f"--{name}={getattr(args, name)} must be >= 0")
  return args


def synthetic_source(size: int, num_examples: int = _NUM_SOURCES):
  """A `sources.Source` of PNG-encoded uniform-noise uint8 images [size, size, 3]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr.data import sources  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, size, size, 3), np.uint8)
  encoded = [tf.io.encode_png(im).numpy() for im in images]
  records = tf.data.Dataset.from_tensor_slices(
    {
      "image": tf.constant(encoded),
      "label": tf.constant(rng.integers(0, _NUM_CLASSES, num_examples), tf.int64),
      "id": tf.range(num_examples, dtype=tf.int64),
    }
  )
  return sources.Source("synthetic", "train", num_examples, _NUM_CLASSES, records)


# FLOPs of one op from static shapes; TF's own profiler (tf.compat.v1.profiler) is legacy.
def _conv_flops(op):
  """2 * (output elements) * (kernel window * input channels), for any Conv2D direction."""
  if op.type == "Conv2D":
    out, kernel = op.outputs[0].shape, op.inputs[1].shape
  elif op.type == "Conv2DBackpropInput":  # inputs: input_sizes, filter, out_backprop
    out, kernel = op.inputs[2].shape, op.inputs[1].shape
  else:  # Conv2DBackpropFilter: its output is the filter's
    out, kernel = op.inputs[2].shape, op.outputs[0].shape
  if out.num_elements() is None or not kernel.is_fully_defined():
    return 0
  kh, kw, cin, _ = [int(k) for k in kernel]
  return 2 * out.num_elements() * kh * kw * cin


def _matmul_flops(op):
  a = op.inputs[0].shape
  out = op.outputs[0].shape
  if a.rank is None or out.num_elements() is None:
    return 0
  transpose_a = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
  k = a[-2] if transpose_a else a[-1]
  return 0 if k is None else 2 * out.num_elements() * int(k)


_FLOP_COUNTERS = {
  "Conv2D": _conv_flops,
  "Conv2DBackpropInput": _conv_flops,
  "Conv2DBackpropFilter": _conv_flops,
  "MatMul": _matmul_flops,
  "BatchMatMulV2": _matmul_flops,
  "BatchMatMulV3": _matmul_flops,
}


def count_graph_flops(graph) -> int:
  """Convolution and matmul FLOPs of every op of `graph` whose shapes are static.

  Element-wise ops (BN, ReLU, the optimizer update) are left out: a few percent of a ResNet's
  work, and not what the accelerator's peak figures describe.
  """
  total = 0
  for op in graph.get_operations():
    counter = _FLOP_COUNTERS.get(op.type)
    if counter is not None:
      total += counter(op)
  return total


def step_flops(trainer, per_replica_batch) -> int:
  """FLOPs of one training step over all replicas: forward + backward of one replica's batch.

  Traces `trainer.compute_gradients` (forward and backward, the same code the step runs)
  outside the strategy, on a batch with the per-replica shapes, and multiplies by the number
  of replicas. The contrastive logits are counted at the per-replica width (2b x 2b rather than
  2b x 2bR): negligible next to the convolutions at any batch we can run.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  # --augment_on_device: the crops, as the step hands them to its gradients.
  batch = trainer_lib.crop_views(per_replica_batch, trainer.cfg.model.image_size)
  specs = tf.nest.map_structure(lambda x: tf.TensorSpec(x.shape, x.dtype), batch)
  graph = tf.function(trainer.compute_gradients).get_concrete_function(specs).graph
  return count_graph_flops(graph) * trainer.num_replicas


@dataclasses.dataclass
class Bench:
  """What `build` sets up: the strategy, the trainer and its input."""

  strategy: tf.distribute.Strategy
  trainer: trainer_lib.Trainer
  input_fn: typing.Callable[[tf.distribute.InputContext], tf.data.Dataset]
  source_size: int

  def iterator(self):
    """The distributed training input, from step 0."""
    return iter(self.strategy.distribute_datasets_from_function(self.input_fn))

  def per_replica_batch(self):
    """One replica's batch (a dict of tensors), for `step_flops`."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    context = tf.distribute.InputContext(num_replicas_in_sync=self.strategy.num_replicas_in_sync)
    return next(iter(self.input_fn(context)))


def build(args, model_dir: str) -> Bench:
  """The run config of `args`, its strategy, state and `trainer.Trainer` on synthetic images.

  Sets the process-wide CPU devices and dtype policy that `args` asks for.
  """
  import keras  # pylint: disable=g-import-not-at-top

  from tf_simclr import config as C  # pylint: disable=g-import-not-at-top
  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
  from tf_simclr import train_state  # pylint: disable=g-import-not-at-top
  from tf_simclr import trainer as trainer_lib  # pylint: disable=g-import-not-at-top

  distribute.configure_cpu_replicas(args.cpu_replicas)
  if args.mixed_precision != "none":
    keras.mixed_precision.set_dtype_policy(args.mixed_precision)
  strategy = distribute.make_strategy(args.strategy, args.cpu_replicas, use_tpu=False)
  distribute.check_batch(args.train_batch_size, strategy.num_replicas_in_sync)
  source_size = args.source_size or (args.image_size if args.image_size <= 64 else 256)
  source = synthetic_source(source_size)
  cfg = C.RunConfig(
    C.DataConfig(dataset="synthetic", use_blur=args.use_blur, cache_dataset=True),
    C.ModelConfig(
      resnet_depth=args.resnet_depth,
      width_multiplier=args.width_multiplier,
      sk_ratio=args.sk_ratio,
      se_ratio=args.se_ratio,
      image_size=args.image_size,
      global_bn=args.global_bn,
      num_classes=_NUM_CLASSES,
    ),
    C.OptimConfig(optimizer=args.optimizer),
    C.TrainConfig(
      model_dir=model_dir,
      train_batch_size=args.train_batch_size,
      train_steps=1 + args.warmup + args.steps,  # every step run is inside the schedule
      checkpoint_steps=1,
      temperature=0.1,
    ),
    C.RuntimeConfig(
      strategy=args.strategy,
      cpu_replicas=args.cpu_replicas,
      mixed_precision=args.mixed_precision,
      jit_compile=args.jit_compile,
      augment_on_device=args.augment_on_device,
    ),
  )
  state = train_state.build_state(cfg, strategy, source.num_examples)
  trainer = trainer_lib.Trainer(cfg, strategy, state)
  return Bench(strategy, trainer, trainer.input_fn(source, start_step=0), source_size)


def time_steps(trainer, iterator, steps: int, warmup: int = 0):
  """Runs 1 + `warmup` + `steps` training steps.

  Returns (the first step's seconds, list of the last `steps` steps' seconds): the `warmup`
  steps between them are run and left out (allocator and thread pools settling).
  """
  times = []
  for _ in range(1 + warmup + steps):
    t0 = time.time()
    # .numpy() waits for the step: the loop's outputs depend on every op of the step.
    trainer.run_loop(iterator, 1)["total_loss"].numpy()
    times.append(time.time() - t0)
  return times[0], times[1 + warmup :]


def main(argv=None):
  args = parse(sys.argv[1:] if argv is None else argv)
  started = time.time()
  try:
    with tempfile.TemporaryDirectory() as model_dir:
      bench = build(args, model_dir)
      iterator = bench.iterator()
      built = time.time()
      first_step_s, times = time_steps(bench.trainer, iterator, args.steps, args.warmup)
      flops = step_flops(bench.trainer, bench.per_replica_batch())
  except ValueError as err:  # e.g. a batch that does not divide over the replicas
    sys.stderr.write(f"error: {err}\n")
    sys.exit(1)

  step_s = statistics.median(times)
  replicas = bench.strategy.num_replicas_in_sync
  result = {
    "resnet_depth": args.resnet_depth,
    "width_multiplier": args.width_multiplier,
    "image_size": args.image_size,
    "stem": "cifar" if bench.trainer.cfg.model.use_cifar_stem else "imagenet",
    "source_size": bench.source_size,
    "train_batch_size": args.train_batch_size,
    "views": 2 * args.train_batch_size,
    "mixed_precision": args.mixed_precision,
    "jit_compile": args.jit_compile,
    "augment_on_device": args.augment_on_device,
    "use_blur": args.use_blur,
    "optimizer": args.optimizer,
    "replicas": replicas,
    "strategy": type(bench.strategy).__name__,
    "cpus": os.cpu_count(),
    "warmup_steps": args.warmup,
    "timed_steps": args.steps,
    "img_per_s": round(args.train_batch_size / step_s, 2),
    "step_s": round(step_s, 3),
    "step_s_min": round(min(times), 3),
    "step_s_max": round(max(times), 3),
    "first_step_s": round(first_step_s, 2),
    "build_s": round(built - started, 2),
    "gflop_per_step": round(flops / 1e9, 1),
    "flop_per_step": flops,
    "achieved_gflop_per_s": round(flops / 1e9 / step_s, 1),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    "total_s": round(time.time() - started, 1),
  }
  print(json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  main()
