"""Host augmentation throughput: `python -m benchmarks.augment_pipeline` (from the repo root).

Synthetic uint8 images go through a tf.data pipeline shaped like training:
two `simclr_augment` views per source image in a parallel map (AUTOTUNE),
batch, prefetch. After a warm-up, a fixed number of batches is timed and one
JSON line per config is printed, with images/s counting source images (each
giving two views). Configs:
  * 32 px views from 32x32 sources (CIFAR-10);
  * 224 px views from 256x320 sources (a common pre-resized ImageNet size;
    ImageNet's JPEGs are mostly 375x500, which changes only the cost of the
    crop slice, not of the resize and the colour ops on the 224 px view).
Also timed, in the same run: a reference-like pipeline (the reference's ops,
stateful, no blur, as its host pipeline), and the views of
`batched_augment.simclr_augment_batch` (a) mapped over batches in tf.data and
(b) in a `tf.function` on a fixed batch, as in a model graph. Absolute figures
are noisy when other processes share the cores; compare ratios of one run.

Real encoded images: `--data_dir=FOLDER` (an image folder of JPEGs, e.g. from
`benchmarks.make_jpeg_folder`) or `--tfds=NAME` (a prepared TFDS dataset)
times, instead, the real pretraining pipeline (`sources.load_source` +
`pipeline.train_dataset`, two views, batch 64, as training builds it: the host
path, also with bilinear crops, and the `--augment_on_device` host share where
the step crops and, on a TPU, where the host crops) and the reference's host
pipeline (read, decode, its preprocessing twice, with its tf.data options) on
the same files, in interleaved rounds (A, B, C, A, B, C, ...), one JSON line
per configuration with images/s and the ratio to the reference.
Every pipeline runs with an intra-op pool of `--intra_op_threads` threads: 1 (the default)
as tf_simclr's processes that only feed accelerators (`pipeline.feed_only_threads`), 0 for
TF's default (all cores: a run that trains on the CPU). Bad flags: one `error: ...` line on
stderr, exit 1.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import benchmarks  # noqa: E402
from benchmarks import batched_augment  # noqa: E402
from tf_simclr import augment  # noqa: E402
from tf_simclr.data import pipeline  # noqa: E402
from tf_simclr.data import sources  # noqa: E402

_NUM_SOURCES = 64  # Distinct synthetic images, cycled.


def _sources(source_hw):
  rng = np.random.default_rng(0)
  return tf.constant(rng.integers(0, 256, (_NUM_SOURCES,) + source_hw + (3,), np.uint8))


def _seed(index, view):
  # Same scheme as training: the seed derives from (example index, view).
  return tf.stack([tf.cast(index, tf.int64), tf.cast(view, tf.int64)])


def _batch_seeds(indices, view):
  """int64 [B, 2] seeds (index, view) for int64 [B] indices."""
  return tf.stack([indices, tf.fill(tf.shape(indices), tf.constant(view, tf.int64))], axis=1)


def reference_like_view(image, size):
  """A baseline: the reference's host pipeline rebuilt with stateful ops.

  Mirrors `preprocess_for_train` of google-research/simclr tf2/data_util.py
  (random resized crop, flip, colour jitter in random order via nested
  tf.cond, grayscale; no blur, which the reference applies in the model), so
  that the speed of `simclr_augment` can be compared in the same run.
  """
  image = tf.image.convert_image_dtype(image, tf.float32)
  begin, crop_size, _ = tf.image.sample_distorted_bounding_box(
    tf.shape(image),
    tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=100,
    use_image_if_no_bounding_boxes=True,
  )
  image = tf.slice(image, begin, crop_size)
  image = tf.image.resize([image], [size, size], method="bicubic")[0]
  image = tf.image.random_flip_left_right(image)

  def jitter(x):
    def apply(i, x):
      def brightness():
        return x * tf.random.uniform([], 0.2, 1.8)

      def contrast():
        return tf.image.random_contrast(x, 0.2, 1.8)

      def saturation():
        return tf.image.random_saturation(x, 0.2, 1.8)

      def hue():
        return tf.image.random_hue(x, 0.2)

      return tf.cond(
        i < 2, lambda: tf.cond(i < 1, brightness, contrast), lambda: tf.cond(i < 3, saturation, hue)
      )

    perm = tf.random.shuffle(tf.range(4))
    for i in range(4):
      x = tf.clip_by_value(apply(perm[i], x), 0.0, 1.0)
    return x

  image = tf.cond(tf.random.uniform([]) < 0.8, lambda: jitter(image), lambda: image)
  image = tf.cond(
    tf.random.uniform([]) < 0.2,
    lambda: tf.tile(tf.image.rgb_to_grayscale(image), [1, 1, 3]),
    lambda: image,
  )
  return tf.clip_by_value(tf.reshape(image, [size, size, 3]), 0.0, 1.0)


def _per_index_pipeline(two_views, batch_size):
  """Endless indices -> parallel `two_views(index)` map -> batch -> prefetch."""
  return (
    tf.data.Dataset.range(1 << 62)
    .map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    .batch(batch_size, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)
  )


def reference_dataset(source_hw, size, batch_size):
  """The baseline pipeline: two reference-like views per source image."""
  images = _sources(source_hw)

  def two_views(index):
    image = images[index % _NUM_SOURCES]
    return reference_like_view(image, size), reference_like_view(image, size)

  return _per_index_pipeline(two_views, batch_size)


def per_image_dataset(source_hw, size, batch_size, use_blur):
  """Two per-image views per source, parallel map, batch, prefetch."""
  images = _sources(source_hw)

  def two_views(index):
    image = images[index % _NUM_SOURCES]
    return tuple(
      augment.simclr_augment(image, _seed(index, v), size, size, use_blur=use_blur)
      for v in range(2)
    )

  return _per_index_pipeline(two_views, batch_size)


def batched_dataset(source_hw, size, batch_size, use_blur):
  """Batch the raw sources first, then two `simclr_augment_batch` views."""
  images = _sources(source_hw)

  def two_views(index):
    batch = tf.gather(images, index % _NUM_SOURCES)
    return tuple(
      batched_augment.simclr_augment_batch(
        batch, _batch_seeds(index, v), size, size, use_blur=use_blur
      )
      for v in range(2)
    )

  return (
    tf.data.Dataset.range(1 << 62)
    .batch(batch_size, drop_remainder=True)
    .map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
    .prefetch(tf.data.AUTOTUNE)
  )


def time_dataset(dataset, batch_size, warmup, steps):
  """(wall, cpu) source images per second over `steps` batches after warm-up.

  cpu is images per process CPU second times the number of cores: an estimate
  of the idle machine's figure when other processes share the cores (the
  wall figure then drops; idle threads spinning make cpu an underestimate).
  """
  seconds, cpu_seconds = _time_batches(dataset, warmup, steps)
  images = steps * batch_size
  return images / seconds, images * os.cpu_count() / cpu_seconds


def time_function(source_hw, size, batch_size, use_blur, warmup, steps):
  """Source images per second of two batched views in one tf.function."""
  images = tf.gather(_sources(source_hw), tf.range(batch_size) % _NUM_SOURCES)

  @tf.function
  def two_views(step):
    index = step * batch_size + tf.range(batch_size, dtype=tf.int64)
    return [
      batched_augment.simclr_augment_batch(
        images, _batch_seeds(index, v), size, size, use_blur=use_blur
      )
      for v in range(2)
    ]

  for step in range(warmup):
    two_views(tf.constant(step, tf.int64))
  start, cpu_start = time.perf_counter(), time.process_time()
  for step in range(steps):
    out = two_views(tf.constant(warmup + step, tf.int64))
  out[0].numpy()
  images = steps * batch_size
  return (
    images / (time.perf_counter() - start),
    images * os.cpu_count() / (time.process_time() - cpu_start),
  )


# ----------------------------------------------------------------------------
# Real encoded images: `--data_dir=FOLDER` (an image folder of JPEGs) or `--tfds=NAME`.


def _encoded_records(args):
  """(tf.data.Dataset of encoded JPEG bytes, endless; Source for `pipeline.train_dataset`)."""
  if args.tfds:
    import tensorflow_datasets as tfds

    source = sources.load_source(args.tfds, args.split, args.tfds_data_dir)
    builder = tfds.builder(args.tfds, data_dir=args.tfds_data_dir)
    records = builder.as_dataset(
      split=args.split, decoders={"image": tfds.decode.SkipDecoding()}, shuffle_files=False
    )
    return records.map(lambda r: r["image"]).repeat(), source
  source = sources.load_source(sources.IMAGE_FOLDER, args.split, args.data_dir)
  paths = source.records.map(lambda r: r["image"])
  return paths.repeat().map(tf.io.read_file), source


def reference_jpeg_dataset(encoded, size, batch_size):
  """The reference's host pipeline on encoded JPEGs: decode, two reference-like views.

  With the reference's tf.data options (tf2/data.py): nondeterministic order, slack.
  """
  options = tf.data.Options()
  options.deterministic = False
  options.experimental_slack = True

  def two_views(data):
    # decode_jpeg for JPEGs; decode_image, as tfds, reads the PNGs of a TFDS source too.
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return reference_like_view(image, size), reference_like_view(image, size)

  return (
    encoded.map(two_views, num_parallel_calls=tf.data.AUTOTUNE)
    .batch(batch_size, drop_remainder=True)
    .prefetch(tf.data.AUTOTUNE)
    .with_options(options)
  )


def ours_jpeg_dataset(
  source,
  size,
  batch_size,
  augment_on_device,
  use_blur,
  crop_on_device=True,
  interpolation="bicubic",
):
  """The real pretraining pipeline, as training builds it (one replica, two views); with
  `augment_on_device`, the host's share on a GPU or CPU (`crop_on_device`) or on a TPU."""
  return pipeline.train_dataset(
    source,
    batch_size,
    batch_size,
    1,
    0,
    seed=0,
    image_size=size,
    use_blur=use_blur,
    augment_on_device=augment_on_device,
    crop_on_device=crop_on_device,
    crop_interpolation=interpolation,
  )


def _time_batches(dataset, warmup, steps):
  """(seconds, process CPU seconds) of `steps` batches after `warmup`, fresh iterator."""
  iterator = iter(dataset)
  for _ in range(warmup):
    next(iterator)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(steps):
    batch = next(iterator)
  tf.nest.flatten(batch)[0].numpy()
  return time.perf_counter() - start, time.process_time() - cpu_start


def jpeg_main(args):
  """Interleaved rounds (A, B, C, A, B, C, ...) of the reference and our pipelines."""
  encoded, source = _encoded_records(args)
  size, batch = args.image_size, args.batch_size
  configs = {
    "reference host pipeline (decode + 2 views, no blur)": lambda: reference_jpeg_dataset(
      encoded, size, batch
    ),
    "tf_simclr host path (no blur)": lambda: ours_jpeg_dataset(source, size, batch, False, False),
    "tf_simclr host path (no blur, --crop_interpolation=bilinear)": lambda: ours_jpeg_dataset(
      source, size, batch, False, False, interpolation="bilinear"
    ),
    "tf_simclr --augment_on_device host share": lambda: ours_jpeg_dataset(
      source, size, batch, True, False
    ),
    "tf_simclr --augment_on_device host share, TPU (the host crops)": lambda: ours_jpeg_dataset(
      source, size, batch, True, False, crop_on_device=False
    ),
  }
  if args.with_blur:
    configs["tf_simclr host path (blur)"] = lambda: ours_jpeg_dataset(
      source, size, batch, False, True
    )
  steps = args.steps or 8
  spent = {name: [0.0, 0.0] for name in configs}
  rounds = {name: [] for name in configs}
  for _ in range(args.rounds):
    for name, make in configs.items():
      wall, cpu = _time_batches(make(), args.warmup, steps)
      spent[name][0] += wall
      spent[name][1] += cpu
      rounds[name].append(round(steps * batch / wall, 1))
  images = args.rounds * steps * batch
  baseline = images / spent[next(iter(configs))][0]
  where = f"tfds {args.tfds} {args.split}" if args.tfds else f"{args.data_dir} {args.split}"
  for name, (wall, cpu) in spent.items():
    print(
      json.dumps(
        {
          "form": name,
          "size": size,
          "source": f"{where}: {source.num_examples} encoded images",
          "views_per_image": 2,
          "batch_size": batch,
          "timed_batches": steps,
          "rounds": args.rounds,
          "images_per_s": round(images / wall, 1),
          "images_per_s_by_round": rounds[name],
          "images_per_cpu_s_x_cores": round(images * os.cpu_count() / cpu, 1),
          "vs_reference": round(images / wall / baseline, 2),
          "cpus": os.cpu_count(),
          "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        }
      ),
      flush=True,
    )


def parse(argv):
  """The benchmark's flags; a bad one exits with one `error: ...` line."""
  parser = benchmarks.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--batch_size", type=int, default=None, help="default: 256, or 64 on real JPEGs as training"
  )
  parser.add_argument(
    "--steps", type=int, default=0, help="timed batches (default: 20 at 32 px, 4 at 224 px)"
  )
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--sizes", default="32,224", help="view sides, comma-separated")
  parser.add_argument("--skip_batched", action="store_true")
  parser.add_argument(
    "--intra_op_threads",
    type=int,
    default=1,
    help="TF's intra-op pool: 1 as tf_simclr's processes that only feed accelerators or serve "
    "tf.data (`pipeline.feed_only_threads`); 0 TF's default, as a run that trains on the CPU",
  )
  jpeg = parser.add_argument_group("real JPEGs (instead of the synthetic configs)")
  jpeg.add_argument("--data_dir", help="an image folder of JPEGs: DATA_DIR/<split>/<class>/")
  jpeg.add_argument("--tfds", help="a prepared TFDS dataset of encoded JPEG images")
  jpeg.add_argument("--tfds_data_dir", help="TFDS data directory for --tfds")
  jpeg.add_argument("--split", default="train")
  jpeg.add_argument("--image_size", type=int, default=224)
  jpeg.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every config")
  jpeg.add_argument("--with_blur", action="store_true", help="also time our host path with blur")
  args = parser.parse_args(argv)
  if args.data_dir and args.tfds:
    parser.error("give --data_dir or --tfds, not both")
  if args.data_dir is not None and not os.path.isdir(args.data_dir):
    parser.error(f"--data_dir={args.data_dir} is not a folder")
  for name in ("image_size", "rounds"):
    if getattr(args, name) < 1:
      parser.error(f"--{name}={getattr(args, name)} must be >= 1")
  try:
    sizes = [int(s) for s in args.sizes.split(",")]
  except ValueError:
    sizes = []
  if not sizes or min(sizes) < 1:
    parser.error(f"--sizes={args.sizes} must be positive integers separated by commas")
  args.sizes = sizes
  if args.batch_size is None:
    args.batch_size = 64 if args.data_dir or args.tfds else 256
  for name, low in (("batch_size", 1), ("steps", 0), ("warmup", 0), ("intra_op_threads", 0)):
    if getattr(args, name) < low:
      parser.error(f"--{name}={getattr(args, name)} must be >= {low}")
  return args


def main(argv=None):
  args = parse(argv)
  if args.intra_op_threads:  # before any op, for every pipeline timed (the reference's too)
    try:
      tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    except RuntimeError:
      sys.stderr.write("error: TensorFlow has started in this process: pass --intra_op_threads=0\n")
      sys.exit(1)
  if args.data_dir or args.tfds:
    try:
      return jpeg_main(args)
    except sources.DatasetError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(1)
  configs = {32: (32, 32), 224: (256, 320)}
  for size in args.sizes:
    source_hw = configs.get(size, (size, size))
    steps = args.steps or (20 if size <= 32 else 4)
    runs = [
      ("reference-like per-image map", False),
      ("tf.data per-image map", True),
      ("tf.data per-image map", False),
    ]
    if not args.skip_batched:
      runs += [("tf.data batched map", True), ("tf.function batched", True)]
    baseline = None
    for form, use_blur in runs:
      if form == "reference-like per-image map":
        wall, cpu = time_dataset(
          reference_dataset(source_hw, size, args.batch_size), args.batch_size, args.warmup, steps
        )
        baseline = wall
      elif form == "tf.data per-image map":
        wall, cpu = time_dataset(
          per_image_dataset(source_hw, size, args.batch_size, use_blur),
          args.batch_size,
          args.warmup,
          steps,
        )
      elif form == "tf.data batched map":
        wall, cpu = time_dataset(
          batched_dataset(source_hw, size, args.batch_size, use_blur),
          args.batch_size,
          args.warmup,
          steps,
        )
      else:
        wall, cpu = time_function(source_hw, size, args.batch_size, use_blur, args.warmup, steps)
      print(
        json.dumps(
          {
            "form": form,
            "size": size,
            "source": f"{source_hw[0]}x{source_hw[1]} uint8",
            "use_blur": use_blur,
            "views_per_image": 2,
            "batch_size": args.batch_size,
            "timed_batches": steps,
            "images_per_s": round(wall, 1),
            "images_per_cpu_s_x_cores": round(cpu, 1),
            "vs_reference_like": round(wall / baseline, 2),
            "cpus": os.cpu_count(),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
          }
        ),
        flush=True,
      )


if __name__ == "__main__":
  main()
