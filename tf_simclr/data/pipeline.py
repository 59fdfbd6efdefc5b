"""The deterministic, distributable input pipelines: a `sources.Source` in, batches out.

Called by `train` (`train_dataset`: pretraining and fine-tuning input, and the views shown in
TensorBoard), `evaluate` and `knn` (`eval_dataset`), `label_subsets` (the root key of its
permutation) and `image_folder` (which checks at load time that a split decodes with this
module's decoder).

The determinism contract of `train_dataset` (also a contract for other tools: keep it):
  Let `key(a, b) = tf.random.experimental.stateless_fold_in(a, b, alg='philox')` with int64
  data. The global example stream is, epoch after epoch, the source's fixed order cut into blocks
  of `shuffle_buffer` examples (the last may be shorter), each block permuted by
  `tf.random.experimental.stateless_shuffle(range(len), key(key([seed, 0], epoch), block),
  alg='philox')`. Global batch k is stream examples [k*G, (k+1)*G) (batches may span epochs).
  View v of the example with id i seen in epoch e is
  `augment.simclr_augment(image, key(key(key([seed, 1], e), i), v), ...)`.
  So the data, their order and their views depend only on `seed` and the step, not on the number
  of replicas, hosts or input pipelines, nor on a restart at `start_step`, nor on
  `tf.random.set_seed`. With a source at most `shuffle_buffer` examples long (the default for
  anything up to 50,000), every epoch is a uniformly random permutation.

Distribution: input pipeline p of P reads the whole global stream (cheaply: records stay encoded)
and keeps the contiguous slice [p*G/P, (p+1)*G/P) of each global batch, which it alone decodes and
augments, in per-replica batches. `tf.distribute` hands a pipeline's consecutive per-replica
batches to its replicas in order, so the concatenation over replicas of step k's batches is
global batch k, exactly as with one replica. Every pipeline reads every record: P times the
read I/O of sharding by file, the price of this exactness; `cache=True` pays it once.

Corrupt-file policy for 'image_folder' (image files are what users bring, and a long run should
not die on one bad file):
  1. When listing, each file with an image extension must start with the magic bytes of JPEG,
     PNG, GIF or BMP; files that do not are skipped, and their number (with a few names) is logged.
     Ids are assigned after this check, in listing order, so they never change during a run
     (`image_folder`).
  2. A file that passes the check but fails to read or decode later is dropped from the stream;
     the log names the first few such files and counts them all (`_DecodeFailures`). A split of
     which no file decodes is refused when it is loaded (training would search it forever).
     The rest of the run goes on, but bit-for-bit reproducibility across pipeline counts does not
     hold past such a drop (the affected pipeline's later batches shift by one example), and an
     eval pass counts one example fewer. Fix or delete the file to get it back.
  TFDS data was validated when it was prepared; its errors are raised, never skipped.
"""

from __future__ import annotations

import functools
import math
import os

from absl import logging
import tensorflow as tf

from tf_simclr import augment
from tf_simclr import distribute
from tf_simclr.data import sources

DEFAULT_SHUFFLE_BUFFER = 50_000
# Stream tags of the root keys [seed, tag]: the order and the views never share random numbers
# (tag 2 is the labelled subset's permutation, `label_subsets`).
SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
SUBSET_STREAM = 2
RNG_ALG = "philox"  # Pinned, rather than 'auto_select', so the keys cannot depend on the device.


# The map functions here are traced as written (`do_not_convert`): their control flow is
# explicit (tf.cond, Python values), and AutoGraph's source rewrite of them and of the
# augmentation they call was start-up time in every process.
@tf.autograph.experimental.do_not_convert
def _read(record):
  return dict(record, image=tf.io.read_file(record["image"]))


def decode_image(encoded):
  """uint8 [H, W, 3] from JPEG/PNG/GIF (first frame)/BMP bytes; grayscale becomes RGB."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


class _DecodeFailures:
  """Counts the files of a split that fail to decode; names the first few in the log."""

  NAMED = 5

  def __init__(self, source: sources.Source, locate):
    self.where = f"{source.name} split {source.split!r}"
    self.files = source.files
    self.locate = locate  # stream position -> id; called only for the dropped positions
    self.failed = set()  # ids: a file is read again each epoch, but counted once
    self.count = 0

  def __call__(self, last, position) -> bool:
    """Logs the files at the stream positions strictly between `last` and `position`."""
    for p in range(int(last) + 1, int(position)):
      self.log(int(self.locate(p)))
    return True

  def log(self, i: int):
    """Logs file `i` once."""
    if i in self.failed:
      return
    self.failed.add(i)
    self.count = len(self.failed)
    name = self.files[i] if 0 <= i < len(self.files) else f"id {i}"
    if self.count <= self.NAMED:
      logging.warning("%s: cannot decode %s; skipped (%d so far)", self.where, name, self.count)
    elif math.log10(self.count).is_integer():
      logging.warning("%s: %d files that cannot be decoded skipped so far", self.where, self.count)


def decode_records(
  source: sources.Source, records: tf.data.Dataset, read: bool | None = None, locate=None
):
  """Reads (if `read`, default `source.reads_files`) and decodes the 'image' of `records`.

  Public for the tests of the corrupt-file policy. Elements keep their keys; 'image' becomes
  uint8 [H, W, 3]. Only user files may be corrupt (see the module docstring's corrupt-file
  policy): for sources that read files, an example that fails to read or decode is dropped,
  and logged by `_DecodeFailures`. The decoding map numbers its elements and ignores its
  errors; a sequential scan finds the gaps in the numbers (nothing per file: a one-element
  dataset per file cost 0.1 ms) and `locate(position)`, called for the dropped positions only,
  gives their ids (default: skip to the position in `records`, which must be deterministic and
  not cached; an infinite stream passes a faster one). A finite stream ends with a marker, so
  that files dropped at its end are counted too.
  """
  read = source.reads_files if read is None else read

  @tf.autograph.experimental.do_not_convert
  def decode_record(record):
    data = record["image"]
    return dict(record, image=decode_image(tf.io.read_file(data) if read else data))

  if not source.reads_files:
    return records.map(decode_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if locate is None:
    locate = lambda p: next(iter(records.skip(p).take(1)))["id"]  # noqa: E731
  failures = _DecodeFailures(source, locate)
  finite = int(records.cardinality()) != tf.data.INFINITE_CARDINALITY
  ds = records
  if finite:  # An end marker (id -1, never decoded) reveals the files dropped at the end.
    end = {k: tf.zeros([], spec.dtype) for k, spec in records.element_spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(dict(end, id=tf.constant(-1, tf.int64))))

  @tf.autograph.experimental.do_not_convert
  def decode_at(position, record):
    if not finite:
      return position, decode_record(record)
    empty = tf.zeros([0, 0, 3], tf.uint8)
    image = tf.cond(record["id"] < 0, lambda: empty, lambda: decode_record(record)["image"])
    return position, dict(record, image=image)

  @tf.autograph.experimental.do_not_convert
  def check(last, element):
    position, record = element
    gap = position > last + 1
    logged = tf.cond(gap, lambda: tf.py_function(failures, [last, position], tf.bool), lambda: True)
    with tf.control_dependencies([logged]):
      return position, dict(record, id=tf.identity(record["id"]))

  ds = ds.enumerate().map(decode_at, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors().scan(tf.constant(-1, tf.int64), check)
  return ds.filter(lambda record: record["id"] >= 0) if finite else ds


def feed_only_threads() -> None:
  """One intra-op thread per op, for a process whose CPU only feeds accelerators (or serves
  tf.data); unless TF_NUM_INTRAOP_THREADS says otherwise. Must run before TensorFlow starts.

  The maps below run their ops single-threaded (`max_intra_op_parallelism`), but an XLA
  launch (a 224 px view's colour ops, `augment`) splits each of its loops over the whole
  intra-op pool regardless, while the map's other calls keep every core busy: on 2 cores that
  cost the host path 12-32% of its throughput (docs/benchmarks.md). A training step on the CPU
  needs the pool: `run.py` calls this only when the step runs elsewhere.
  """
  if "TF_NUM_INTRAOP_THREADS" in os.environ:
    return
  try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
  except RuntimeError:  # TensorFlow started already (a program that imported this one)
    logging.warning("TensorFlow has started: its intra-op thread pool stays as it is")


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True  # Parallel maps keep their order: part of the contract.
  options.autotune.enabled = True
  # One thread per op inside the pipeline: parallelism comes from the parallel maps.
  options.threading.max_intra_op_parallelism = 1
  # The pipelines shard themselves; a strategy must not shard them again.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  return options


def root_key(seed: int, stream: int) -> tf.Tensor:
  return tf.constant([seed, stream], tf.int64)


def _fold_in(key, data):
  return tf.random.experimental.stateless_fold_in(key, tf.cast(data, tf.int64), alg=RNG_ALG)


def view_seeds(seed: int, epoch, example_id, num_views: int = 2) -> tf.Tensor:
  """The stateless seeds of an example's views: int64 [num_views, 2] (the contract above)."""
  key = _fold_in(_fold_in(root_key(seed, _AUGMENT_STREAM), epoch), example_id)
  return tf.stack([_fold_in(key, v) for v in range(num_views)])


def check_batching(
  global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
):
  """Refuses inconsistent batching arguments; returns G / P, a pipeline's share of a batch."""
  if global_batch_size <= 0 or per_replica_batch_size <= 0:
    raise ValueError(
      f"batch sizes must be positive, got global {global_batch_size} and "
      f"per replica {per_replica_batch_size}"
    )
  if num_input_pipelines <= 0 or not 0 <= input_pipeline_id < num_input_pipelines:
    raise ValueError(
      f"input_pipeline_id must be in [0, {num_input_pipelines}), got {input_pipeline_id}"
    )
  share = distribute.check_batch(
    global_batch_size, num_input_pipelines, "global_batch_size", "input pipelines"
  )
  if share % per_replica_batch_size:
    raise ValueError(
      f"per-replica batch size {per_replica_batch_size} does not divide the "
      f"{share} examples of each global batch that an input pipeline serves "
      f"(global batch {global_batch_size} / {num_input_pipelines} pipelines)"
    )
  return share


def block_order(root, epoch, index, size) -> tf.Tensor:
  """int32 [size]: the order of block `index` of `epoch` in the shuffled stream.

  `root` is `root_key(seed, SHUFFLE_STREAM)`; `global_stream` and the tf.data service's workers
  (`data_service.step_examples`) both shuffle with it, so their streams agree.
  """
  return tf.random.experimental.stateless_shuffle(
    tf.range(size), _fold_in(_fold_in(root, epoch), index), alg=RNG_ALG
  )


def global_stream(
  source: sources.Source, seed: int, start_example: int, shuffle_buffer: int, cache: bool
) -> tf.data.Dataset:
  """The infinite shuffled example stream from example `start_example` on.

  Elements: the records plus 'epoch' (int64), still encoded (or paths, unless cached).
  """
  n = source.num_examples
  block = min(n, shuffle_buffer)
  blocks_per_epoch = math.ceil(n / block)
  # Start at example `start_example` of the stream without reading the epochs before it.
  start_epoch, offset = divmod(start_example, n)
  start_block, offset = divmod(offset, block)

  records = source.records
  if cache:
    if source.reads_files:
      records = records.map(_read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    records = records.cache()
  root = root_key(seed, SHUFFLE_STREAM)

  @tf.autograph.experimental.do_not_convert
  def shuffle_block(counter, blk):
    epoch, index = counter // blocks_per_epoch, counter % blocks_per_epoch
    size = tf.shape(blk["id"])[0]
    order = block_order(root, epoch, index, size)
    blk = {k: tf.gather(v, order) for k, v in blk.items()}
    blk["epoch"] = tf.fill([size], epoch)
    return blk

  ds = records.batch(block).repeat().skip(start_block)
  ds = ds.enumerate(start=start_epoch * blocks_per_epoch + start_block)
  ds = ds.map(shuffle_block).unbatch()
  return ds.skip(offset)


def _locate(source, seed, shuffle_buffer, slices, position) -> int:
  """The id at `position` of a pipeline's stream (a dropped file's); slices: its (first stream
  example, G, the first and the number of its examples in each global batch)."""
  start, global_batch_size, begin, share = slices
  example = start + position // share * global_batch_size + begin + position % share
  return int(next(iter(global_stream(source, seed, example, shuffle_buffer, False)))["id"])


def example_to_views(
  ex: dict,
  seed: int,
  image_size: int,
  num_views: int,
  color_jitter_strength: float,
  use_blur: bool,
  min_scale: float,
  horizontal_flip: bool,
  augment_on_device: bool,
  crop_on_device: bool = False,
  crop_interpolation: str = "bicubic",
) -> dict:
  """One decoded example's training views, seeded by (`seed`, its epoch, its id).

  `ex` holds 'image' uint8 [H, W, 3], 'epoch', 'id' and 'label' (int64 scalars). Returns
  `train_dataset`'s element without the batch axis: 'views' float32 [V, s, s, 3], 'label', 'id'
  (and 'distort' with `augment_on_device`; with `crop_on_device` too, 'image' instead of
  'views', for the step to crop: `trainer.crop_views`, with the same `crop_interpolation`).
  The tf.data service workers call it too.
  """
  seeds = view_seeds(seed, ex["epoch"], ex["id"], num_views)
  # Every form draws the same view from (seed, these arguments).
  view = dict(
    height=image_size,
    width=image_size,
    color_jitter_strength=color_jitter_strength,
    min_scale=min_scale,
    flip=horizontal_flip,
  )
  out = {"label": ex["label"], "id": ex["id"]}

  def stacked(params):  # V dicts of [...] -> one dict of [V, ...]
    return {k: tf.stack([p[k] for p in params]) for k in params[0]}

  if augment_on_device and crop_on_device:
    boxes = [augment.box_params(tf.shape(ex["image"]), s, **view) for s in tf.unstack(seeds)]
    return dict(out, image=ex["image"], distort=stacked(boxes))
  view = dict(view, interpolation=crop_interpolation)  # the host resizes the crops
  if augment_on_device:
    crops = [augment.crop_view(ex["image"], s, **view) for s in tf.unstack(seeds)]
    return dict(out, views=tf.stack([c for c, _ in crops]), distort=stacked([p for _, p in crops]))
  views = [
    augment.simclr_augment(ex["image"], s, use_blur=use_blur, **view) for s in tf.unstack(seeds)
  ]
  return dict(out, views=tf.stack(views))


def train_dataset(
  source: sources.Source,
  global_batch_size: int,
  per_replica_batch_size: int,
  num_input_pipelines: int,
  input_pipeline_id: int,
  seed: int,
  image_size: int,
  num_views: int = 2,
  start_step: int = 0,
  color_jitter_strength: float = 1.0,
  use_blur: bool = True,
  min_scale: float = 0.08,
  horizontal_flip: bool = True,
  cache: bool = False,
  shuffle_buffer: int | None = None,
  augment_on_device: bool = False,
  crop_on_device: bool = False,
  crop_interpolation: str = "bicubic",
) -> tf.data.Dataset:
  """The pretraining input of one input pipeline: infinite, in per-replica batches.

  Follows the determinism contract of the module docstring: the concatenation, over the
  replicas of all pipelines, of their k-th step batches is global batch k, the same for any
  number of pipelines and replicas and after a restart at `start_step`.

  Args:
    source: from `load_source`.
    global_batch_size: G, examples per step over all replicas.
    per_replica_batch_size: b, examples per batch of this dataset; must divide G / P.
    num_input_pipelines: P, e.g. `input_context.num_input_pipelines`; must divide G.
    input_pipeline_id: this pipeline, in [0, P).
    seed: the run's seed (`--seed`).
    image_size: s, side of the square views.
    num_views: V, augmented views per example.
    start_step: the first step to produce (a restart resumes at the same example and views).
    color_jitter_strength, use_blur, min_scale: passed to `augment.simclr_augment`.
    horizontal_flip: passed to `augment.simclr_augment` as `flip`.
    cache: keep the (encoded) records in memory after the first epoch.
    shuffle_buffer: examples per shuffle block; None: min(num_examples, 50,000).
    augment_on_device: leave the flip, colour jitter, grayscale and blur to the training step
      (`augment.crop_view` here, `augment.distort_batch` there); same views up to rounding.
    crop_on_device: with `augment_on_device`, leave the crop and resize to the step too
      (`augment.box_params` here, `augment.crop_batch` there): batches of source images
      zero-padded to the batch's largest, so shapes vary from batch to batch (not for TPUs).
    crop_interpolation: the crops' resize, `augment.INTERPOLATIONS` ('bicubic': the reference).

  Returns:
    tf.data.Dataset of {'views': float32 [b, V, s, s, 3] in [0, 1], 'label': int64 [b],
    'id': int64 [b]}; with `augment_on_device`, 'views' are the crops and 'distort' holds
    their parameters (`augment.DISTORT_SIGNATURE`, each with leading axes [b, V]); with
    `crop_on_device` too, 'image' uint8 [b, H, W, 3] instead of 'views', and 'distort' holds
    the boxes as well (`augment.BOX_SIGNATURE`).
  """
  share = check_batching(
    global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
  )
  if num_views < 1 or image_size < 1 or start_step < 0:
    raise ValueError(
      f"need num_views >= 1, image_size >= 1 and start_step >= 0, got "
      f"{num_views}, {image_size}, {start_step}"
    )
  if shuffle_buffer is None:
    shuffle_buffer = min(source.num_examples, DEFAULT_SHUFFLE_BUFFER)
  if shuffle_buffer < 1:
    raise ValueError(f"shuffle_buffer must be positive, got {shuffle_buffer}")
  ds = global_stream(source, seed, start_step * global_batch_size, shuffle_buffer, cache)
  # Keep this pipeline's contiguous slice of each global batch, before any decoding.
  begin = input_pipeline_id * share
  ds = ds.batch(global_batch_size, drop_remainder=True)
  ds = ds.map(lambda batch: {k: v[begin : begin + share] for k, v in batch.items()}).unbatch()
  slices = (start_step * global_batch_size, global_batch_size, begin, share)
  locate = functools.partial(_locate, source, seed, shuffle_buffer, slices)
  ds = decode_records(source, ds, read=source.reads_files and not cache, locate=locate)

  make_views = functools.partial(
    example_to_views,
    seed=seed,
    image_size=image_size,
    num_views=num_views,
    color_jitter_strength=color_jitter_strength,
    use_blur=use_blur,
    min_scale=min_scale,
    horizontal_flip=horizontal_flip,
    augment_on_device=augment_on_device,
    crop_on_device=crop_on_device,
    crop_interpolation=crop_interpolation,
  )
  make_views = tf.autograph.experimental.do_not_convert(make_views)
  ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = batch_views(ds, per_replica_batch_size)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def batch_views(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """`example_to_views` elements in batches of `batch_size`; source images (`crop_on_device`)
  zero-padded to the largest of their batch."""
  if "image" in ds.element_spec:
    return ds.padded_batch(batch_size, drop_remainder=True)
  return ds.batch(batch_size, drop_remainder=True)


def eval_steps(num_examples: int, global_batch_size: int, num_input_pipelines: int) -> int:
  """Steps that cover a split exactly once, the same number on every pipeline.

  Pipeline p holds examples p, p + P, ...: at most ceil(N / P), served G / P per step.
  """
  share = global_batch_size // num_input_pipelines
  return math.ceil(math.ceil(num_examples / num_input_pipelines) / share)


def eval_dataset(
  source: sources.Source,
  per_replica_batch_size: int,
  num_input_pipelines: int,
  input_pipeline_id: int,
  image_size: int,
  cache: bool = False,
  global_batch_size: int | None = None,
) -> tf.data.Dataset:
  """The evaluation input of one input pipeline: each example once, padded to static batches.

  Pipeline p takes the examples with id = p mod P, in order. Each pipeline's dataset is padded
  with mask-0 examples (zero image, label 0, id -1) to exactly `eval_steps(...)` steps of
  G / P examples, so all pipelines run the same number of full, static-shape batches.

  Args:
    source: from `load_source`.
    per_replica_batch_size: b.
    num_input_pipelines, input_pipeline_id: P and p.
    image_size: s; images go through `augment.preprocess_eval`.
    cache: keep this pipeline's (encoded) records in memory after the first pass.
    global_batch_size: G; None means b * P (one replica per pipeline).

  Returns:
    A finite tf.data.Dataset of eval_steps * G / (P b) batches {'image': float32 [b, s, s, 3],
    'label': int64 [b], 'mask': float32 [b] (1 real, 0 padding), 'id': int64 [b]}.
  """
  global_batch_size = global_batch_size or per_replica_batch_size * num_input_pipelines
  share = check_batching(
    global_batch_size, per_replica_batch_size, num_input_pipelines, input_pipeline_id
  )
  total = eval_steps(source.num_examples, global_batch_size, num_input_pipelines) * share

  ds = shard = source.records.shard(num_input_pipelines, input_pipeline_id)
  if cache:
    if source.reads_files:
      ds = ds.map(_read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.cache()
  # Dropped files are looked up in the uncached shard: a second iterator of the cache would fill it.
  locate = lambda position: next(iter(shard.skip(position).take(1)))["id"]
  ds = decode_records(source, ds, read=source.reads_files and not cache, locate=locate)

  @tf.autograph.experimental.do_not_convert
  def preprocess(ex):
    return {
      "image": augment.preprocess_eval(ex["image"], image_size, image_size),
      "label": ex["label"],
      "mask": tf.constant(1.0),
      "id": ex["id"],
    }

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  padding = tf.data.Dataset.from_tensors(
    {
      "image": tf.zeros([image_size, image_size, 3]),
      "label": tf.constant(0, tf.int64),
      "mask": tf.constant(0.0),
      "id": tf.constant(-1, tf.int64),
    }
  ).repeat()
  # take() rather than an exact pad count: stays exact if a corrupt file was dropped.
  ds = ds.concatenate(padding).take(total)
  ds = ds.batch(per_replica_batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
