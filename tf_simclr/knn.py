"""k-nearest-neighbour top-1 on frozen features: a label-cheap monitor of pretraining.

As in Wu et al. 2018 ("Unsupervised feature learning via non-parametric instance
discrimination"): each eval image's L2-normalised feature (`final_avg_pool`, h) is compared by
cosine similarity with a bank of the train split's features; its k nearest neighbours vote
for their labels with weight exp(sim / T); the prediction is the class with the largest vote.

Scaling: the bank is never gathered onto one device. Each replica keeps the features of the
train examples it embedded (its shard, about M / R rows of the M-row bank). At each eval
step the queries of all replicas are all-gathered ([B, d], B the global batch); each replica
finds their k nearest neighbours in its shard, scanning it in chunks so that only [B, chunk]
similarities exist at a time; the replicas' candidates [B, R k'] are all-gathered and cut to
the top k, which is exactly the top k over the whole bank (the global top k is inside the
union of the shards' top k). Memory per replica: its shard plus [B, chunk] floats.
Padded eval examples (mask 0, `pipeline.eval_dataset`) are neither in the bank nor counted.
"""

from __future__ import annotations

import functools
import math
import numbers

from absl import logging
import numpy as np
import tensorflow as tf

from tf_simclr import collectives
from tf_simclr import distribute
from tf_simclr import evaluate
from tf_simclr.config import RunConfig
from tf_simclr.data import label_subsets
from tf_simclr.data import pipeline
from tf_simclr.data import sources

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.07
# Bank rows scanned at once: [B, chunk] float32 similarities, 64 MB at B = 256.
DEFAULT_BANK_CHUNK = 65_536


def _check_k_temperature(k, temperature):
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"kNN k must be an integer >= 1, got {k!r}")
  if not temperature > 0:
    raise ValueError(f"kNN temperature must be > 0, got {temperature}")


def nearest_neighbours(query, bank, bank_labels, k, bank_valid=None, chunk_size=None):
  """The k bank rows of largest inner product with each query row, exactly.

  Args:
    query: float32 [b, d].
    bank: float32 [m, d], m static.
    bank_labels: int [m].
    k: int >= 1; at most m are returned.
    bank_valid: bool [m]; False rows (padding) are never neighbours. None: all valid.
    chunk_size: scan the bank this many rows at a time (None: all at once). Pad m to a
      multiple of it beforehand to avoid a copy (and for static shapes on TPUs).

  Returns:
    (similarities float32 [b, k'], labels int32 [b, k']), k' = min(k, m), by decreasing
    similarity; equal similarities keep bank order, so chunking does not change the result.
    Slots with no valid row hold similarity -inf.
  """
  query = tf.convert_to_tensor(query, tf.float32)
  bank = tf.convert_to_tensor(bank, tf.float32)
  bank_labels = tf.cast(bank_labels, tf.int32)
  m = bank.shape[0]
  if m is None:
    raise ValueError("the bank needs a static number of rows")
  if bank_valid is None:
    bank_valid = tf.ones([m], tf.bool)
  k = min(k, m)

  def top(rows, labels, valid, kc):
    sims = tf.matmul(query, rows, transpose_b=True)  # [b, rows]
    sims = tf.where(valid[tf.newaxis, :], sims, -math.inf)
    values, index = tf.math.top_k(sims, kc)
    return values, tf.gather(labels, index)

  if chunk_size is None or m <= chunk_size:
    return top(bank, bank_labels, bank_valid, k)

  pad = -m % chunk_size
  if pad:
    bank = tf.pad(bank, [[0, pad], [0, 0]])
    bank_labels = tf.pad(bank_labels, [[0, pad]])
    bank_valid = tf.pad(bank_valid, [[0, pad]])
  num_chunks = (m + pad) // chunk_size
  kc = min(k, chunk_size)
  b = tf.shape(query)[0]
  d = bank.shape[1]

  def body(i, values, labels):
    start = i * chunk_size
    cv, cl = top(
      tf.slice(bank, [start, 0], [chunk_size, d]),
      tf.slice(bank_labels, [start], [chunk_size]),
      tf.slice(bank_valid, [start], [chunk_size]),
      kc,
    )
    # Candidates so far first: on ties top_k keeps the earlier bank row, as one top_k would.
    values, index = tf.math.top_k(tf.concat([values, cv], 1), k)
    labels = tf.gather(tf.concat([labels, cl], 1), index, batch_dims=1)
    return i + 1, values, labels

  _, values, labels = tf.while_loop(
    lambda i, *_: i < num_chunks,
    body,
    (tf.constant(0), tf.fill([b, k], -math.inf), tf.zeros([b, k], tf.int32)),
  )
  return values, labels


def vote(similarities, labels, num_classes, temperature=DEFAULT_TEMPERATURE):
  """Weighted kNN vote: argmax_c sum_j [labels_j = c] exp(similarities_j / T).

  Args:
    similarities: float32 [b, k]; -inf marks an empty slot (weight 0).
    labels: int [b, k], in [0, num_classes).
    num_classes: C.
    temperature: T > 0.

  Returns:
    int32 [b]; ties go to the smaller class.
  """
  similarities = tf.convert_to_tensor(similarities, tf.float32)
  labels = tf.cast(labels, tf.int32)
  # exp((s - s_max) / T) = exp(s / T) * const per row: the same argmax, without overflow at
  # small T.
  top = tf.reduce_max(similarities, axis=1, keepdims=True)
  top = tf.where(tf.math.is_finite(top), top, 0.0)
  weights = tf.exp((similarities - top) / temperature)  # [b, k]
  b = tf.shape(labels)[0]
  cells = tf.range(b)[:, tf.newaxis] * num_classes + labels  # Row-major index into [b, C].
  votes = tf.math.unsorted_segment_sum(
    tf.reshape(weights, [-1]), tf.reshape(cells, [-1]), b * num_classes
  )
  return tf.argmax(tf.reshape(votes, [b, num_classes]), axis=1, output_type=tf.int32)


def _replica_id(ctx):
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


class KnnMonitor:
  """kNN top-1 of an eval split against a bank of a train split's features, under a strategy.

  Both splits go through eval preprocessing (`pipeline.eval_dataset`: centre crop, resize)
  and `model(images, training=False)`. The two steps (embed the bank, classify the eval split)
  are tf.functions made here, so they are traced once for all the calls of a run: the model's
  variables are read, not captured, so each call sees the current weights.
  """

  def __init__(
    self,
    model,
    strategy: tf.distribute.Strategy,
    train_source: sources.Source,
    eval_source: sources.Source,
    batch_size: int,
    image_size: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    max_bank_examples: int | None = None,
    feature_key: str = "final_avg_pool",
    bank_chunk_size: int = DEFAULT_BANK_CHUNK,
  ):
    """Checks the arguments and makes the steps; see `knn_accuracy` for their meaning.

    Raises:
      ValueError: bad k, temperature, batch size, bank_chunk_size or max_bank_examples; an
        unlabelled split.
    """
    _check_k_temperature(k, temperature)
    distribute.check_batch(batch_size, strategy.num_replicas_in_sync, "kNN batch_size")
    if bank_chunk_size < 1:
      raise ValueError(f"bank_chunk_size must be >= 1, got {bank_chunk_size}")
    for source in (train_source, eval_source):
      if source.num_classes == 0:
        raise ValueError(
          f"the kNN monitor needs labels, but {source.name} {source.split!r} is unlabelled"
        )
    if max_bank_examples is not None:
      if max_bank_examples < 1:
        raise ValueError(f"max_bank_examples must be >= 1, got {max_bank_examples}")
      if max_bank_examples < train_source.num_examples:
        train_source = label_subsets.subset_source(train_source, np.arange(max_bank_examples))
    self.model, self.strategy = model, strategy
    self.train_source, self.eval_source = train_source, eval_source
    self.batch_size, self.image_size = batch_size, image_size
    self.k, self.temperature, self.feature_key = k, temperature, feature_key
    self.bank_chunk_size = bank_chunk_size
    self.num_classes = train_source.num_classes
    self.embed_step = tf.function(self._embed_step, autograph=False)
    self.query_step = tf.function(self._query_step, autograph=False)
    # The last (step, result) of `at`, so that a second call at one step need not redo it.
    self.last = None

  def _distributed(self, source):
    make_dataset = functools.partial(
      pipeline.eval_dataset, source, image_size=self.image_size, global_batch_size=self.batch_size
    )
    return distribute.distribute_input(
      self.strategy, self.batch_size, make_dataset, "kNN batch_size"
    )

  def _features(self, images, mask):
    """(L2-normalised features float32 [b, d], how many rows of `mask` [b] are not finite)."""
    out = tf.cast(self.model(images, training=False)[self.feature_key], tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(out), axis=1)
    bad = tf.reduce_sum((1.0 - tf.cast(finite, tf.float32)) * tf.cast(mask, tf.float32))
    return tf.math.l2_normalize(out, axis=-1), bad

  def _embed_step(self, batch):
    """A batch's features, labels and validity, left on each replica; and its valid count and
    non-finite feature count."""

    def replica_fn(batch):
      ctx = tf.distribute.get_replica_context()
      valid = batch["mask"] > 0
      features, bad = self._features(batch["image"], batch["mask"])
      counts = tf.stack([tf.reduce_sum(tf.cast(valid, tf.float32)), bad])
      return (_replica_id(ctx), features, tf.cast(batch["label"], tf.int32), valid, counts)

    out = self.strategy.run(replica_fn, args=(batch,))
    return out[:4], self.strategy.reduce(tf.distribute.ReduceOp.SUM, out[4], axis=None)

  def _query_step(self, batch, bank, k, chunk):
    """(correct, counted, non-finite features) of an eval batch against the sharded bank:
    float32 [3]."""

    def replica_fn(batch, bank):
      ctx = tf.distribute.get_replica_context()
      many = ctx.num_replicas_in_sync > 1
      query, bad = self._features(batch["image"], batch["mask"])  # [b, d]
      queries = collectives.all_gather(ctx, query, axis=0) if many else query  # [B, d]
      sims, labels = nearest_neighbours(
        queries, bank[0], bank[1], k, bank[2], chunk_size=chunk
      )  # [B, k']
      if many:  # Merge the shards' candidates: [B, R k'] -> [B, k].
        sims = collectives.all_gather(ctx, sims, axis=1)
        labels = collectives.all_gather(ctx, labels, axis=1)
        sims, index = tf.math.top_k(sims, k)
        labels = tf.gather(labels, index, batch_dims=1)
      predicted = vote(sims, labels, self.num_classes, self.temperature)  # [B]
      if many:  # This replica's rows of the gathered batch.
        b = tf.shape(query)[0]
        predicted = predicted[_replica_id(ctx) * b : (_replica_id(ctx) + 1) * b]
      mask = batch["mask"]
      correct = tf.cast(tf.equal(predicted, tf.cast(batch["label"], tf.int32)), tf.float32)
      return tf.stack([tf.reduce_sum(correct * mask), tf.reduce_sum(mask), bad])

    return self.strategy.reduce(
      tf.distribute.ReduceOp.SUM, self.strategy.run(replica_fn, args=(batch, bank)), axis=None
    )

  def _bank(self, step=None):
    """The bank, each replica's features kept on its device: (bank, size, chunk).

    bank: per replica (features [m, d], labels [m], valid [m]), m a multiple of chunk.
    Raises evaluate.NonFiniteOutputError when a feature is not finite.
    """
    strategy = self.strategy
    parts, bank_size = {}, 0  # parts: global replica id -> [(features, labels, valid), ...]
    bad = 0.0
    for batch in self._distributed(self.train_source):
      local, counts = self.embed_step(batch)
      count, batch_bad = counts.numpy()
      bank_size, bad = bank_size + int(count), bad + batch_bad
      for rid, *rows in zip(*(strategy.experimental_local_results(v) for v in local)):
        parts.setdefault(int(rid), []).append(rows)
    where = f"{self.train_source.name}/{self.train_source.split} (the kNN bank)"
    evaluate.check_finite_outputs("features", bad, bank_size, where, step)
    if bank_size == 0:
      raise ValueError(
        f"the kNN bank is empty: {self.train_source.name} "
        f"{self.train_source.split!r} has no examples"
      )
    # Every replica's shard has eval_steps * b rows (eval_dataset pads all pipelines alike).
    chunk = min(
      self.bank_chunk_size, max(sum(int(r[0].shape[0]) for r in rows) for rows in parts.values())
    )
    shards = {}
    for rid, rows in parts.items():
      with tf.device(rows[0][0].device):
        bank, labels, valid = (tf.concat(column, 0) for column in zip(*rows))
        pad = -int(bank.shape[0]) % chunk  # Padded once here rather than at every eval step.
        shards[rid] = (
          tf.pad(bank, [[0, pad], [0, 0]]),
          tf.pad(labels, [[0, pad]]),
          tf.pad(valid, [[0, pad]]),
        )
    bank = strategy.experimental_distribute_values_from_function(
      lambda ctx: shards[ctx.replica_id_in_sync_group]
    )
    return bank, bank_size, chunk

  def accuracy(self, step: int | None = None) -> dict:
    """kNN top-1 with the model's current weights: embeds the bank, classifies the eval split.

    `step`: the training step of the weights, for messages.

    Returns:
      {'knn/top_1_accuracy': float, 'knn/k': int (the k used), 'knn/num_examples': int (eval
       examples counted), 'knn/bank_size': int}.
    Raises:
      ValueError: an empty bank or eval split.
      evaluate.NonFiniteOutputError: a feature of either split is not finite (NaN or inf).
    """
    bank, bank_size, chunk = self._bank(step)
    k_used = min(self.k, bank_size)
    totals = np.zeros([3])
    for batch in self._distributed(self.eval_source):
      # k and chunk are Python ints, fixed by the splits: the step is traced for them once.
      totals += self.query_step(batch, bank, k_used, chunk).numpy()
    correct, count, bad = totals
    split = f"{self.eval_source.name}/{self.eval_source.split}"
    evaluate.check_finite_outputs("features", bad, count, split, step)
    if count == 0:
      raise ValueError(
        f"the kNN eval split {self.eval_source.name} {self.eval_source.split!r} has no examples"
      )
    return {
      "knn/top_1_accuracy": float(correct / count),
      "knn/k": int(k_used),
      "knn/num_examples": int(count),
      "knn/bank_size": int(bank_size),
    }

  def at(self, step: int) -> dict:
    """`accuracy()` at training step `step`, computed once per step (`last` keeps it)."""
    if self.last is None or self.last[0] != step:
      self.last = (step, self.accuracy(step))
    return self.last[1]


def knn_accuracy(
  model,
  strategy: tf.distribute.Strategy,
  train_source: sources.Source,
  eval_source: sources.Source,
  batch_size: int,
  image_size: int,
  k: int = DEFAULT_K,
  temperature: float = DEFAULT_TEMPERATURE,
  max_bank_examples: int | None = None,
  feature_key: str = "final_avg_pool",
  bank_chunk_size: int = DEFAULT_BANK_CHUNK,
) -> dict:
  """kNN top-1 of `eval_source` against a bank of `train_source`, under `strategy`, once.

  A `KnnMonitor` used once; a run that monitors training keeps one (`knn_monitor`).

  Args:
    model: a SimCLRModel (or any model returning a dict with `feature_key`: float [b, d]),
      built under `strategy.scope()`.
    strategy: the run's tf.distribute strategy.
    train_source: labelled split for the bank (its `num_classes` are the classes).
    eval_source: labelled split to classify.
    batch_size: global batch size, a multiple of the number of replicas.
    image_size: side of the square model input.
    k: neighbours; min(k, bank size) are used.
    temperature: T of the vote weights exp(sim / T).
    max_bank_examples: bank from the first this many train examples (by id); None: all.
    feature_key: the model output to use.
    bank_chunk_size: bank rows scanned at once per replica (memory [B, chunk]).

  Returns:
    {'knn/top_1_accuracy': float, 'knn/k': int (the k used), 'knn/num_examples': int (eval
     examples counted), 'knn/bank_size': int}.

  Raises:
    ValueError: bad k, temperature, batch size or max_bank_examples; an unlabelled split;
      an empty bank or eval split.
  """
  return KnnMonitor(
    model,
    strategy,
    train_source,
    eval_source,
    batch_size,
    image_size,
    k=k,
    temperature=temperature,
    max_bank_examples=max_bank_examples,
    feature_key=feature_key,
    bank_chunk_size=bank_chunk_size,
  ).accuracy()


def knn_monitor(
  cfg: RunConfig,
  strategy: tf.distribute.Strategy,
  state,
  sources: tuple,
  step: int,
  is_chief: bool = True,
  writer=None,
) -> dict:
  """kNN top-1 of the eval split against the train split's features, during a run.

  The run's `KnnMonitor` is made at the first call and kept in `state.knn` (so its steps are
  traced once per run). Runs on every worker (its collectives need them all), once per step:
  a second call at the same step returns the first's result. The chief adds the figures to
  `result.json` / `result_<step>.json` (keeping what they hold of that step) and to
  TensorBoard, when given a `writer`.

  Args:
    cfg: the run's configuration (eval_batch_size, image_size, knn_k, knn_temperature).
    state: the run's `train_state.TrainState` (its model, and `state.knn` to keep the monitor in).
    sources: (bank source, eval source), both labelled.
  Returns:
    {'knn/top_1_accuracy', 'knn/k', 'knn/num_examples', 'knn/bank_size'}.
  """
  t = cfg.train
  if state.knn is None:
    state.knn = KnnMonitor(
      state.model,
      strategy,
      sources[0],
      sources[1],
      t.eval_batch_size,
      cfg.model.image_size,
      k=t.knn_k,
      temperature=t.knn_temperature,
    )
  if state.knn.last is not None and state.knn.last[0] == step:
    return state.knn.last[1]
  result = state.knn.at(step)
  if is_chief and writer is not None:
    evaluate.write_results(t.model_dir, result, step, writer, merge=True)
  logging.info(
    "Step %d: kNN top-1 %.4f (k=%d, bank %d)",
    step,
    result["knn/top_1_accuracy"],
    result["knn/k"],
    result["knn/bank_size"],
  )
  return result
