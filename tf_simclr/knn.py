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
Padded eval examples (mask 0, `datasets.eval_dataset`) are neither in the bank nor counted.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf

from tf_simclr import datasets

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
    cv, cl = top(tf.slice(bank, [start, 0], [chunk_size, d]),
                 tf.slice(bank_labels, [start], [chunk_size]),
                 tf.slice(bank_valid, [start], [chunk_size]), kc)
    # Candidates so far first: on ties top_k keeps the earlier bank row, as one top_k would.
    values, index = tf.math.top_k(tf.concat([values, cv], 1), k)
    labels = tf.gather(tf.concat([labels, cl], 1), index, batch_dims=1)
    return i + 1, values, labels

  _, values, labels = tf.while_loop(
      lambda i, *_: i < num_chunks, body,
      (tf.constant(0), tf.fill([b, k], -math.inf), tf.zeros([b, k], tf.int32)))
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
  votes = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), tf.reshape(cells, [-1]),
                                       b * num_classes)
  return tf.argmax(tf.reshape(votes, [b, num_classes]), axis=1, output_type=tf.int32)


def _replica_id(ctx):
  return tf.cast(ctx.replica_id_in_sync_group, tf.int32)


def knn_accuracy(model, strategy: tf.distribute.Strategy, train_source: datasets.Source,
                 eval_source: datasets.Source, batch_size: int, image_size: int,
                 k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 max_bank_examples: int | None = None, feature_key: str = "final_avg_pool",
                 bank_chunk_size: int = DEFAULT_BANK_CHUNK) -> dict:
  """kNN top-1 of `eval_source` against a bank of `train_source`, under `strategy`.

  Both splits go through eval preprocessing (`datasets.eval_dataset`: centre crop, resize)
  and `model(images, training=False)`.

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
  _check_k_temperature(k, temperature)
  replicas = strategy.num_replicas_in_sync
  if batch_size < 1 or batch_size % replicas:
    raise ValueError(f"kNN batch size must be a positive multiple of the {replicas} replicas, "
                     f"got {batch_size}")
  if bank_chunk_size < 1:
    raise ValueError(f"bank_chunk_size must be >= 1, got {bank_chunk_size}")
  for source in (train_source, eval_source):
    if source.num_classes == 0:
      raise ValueError(f"the kNN monitor needs labels, but {source.name} {source.split!r} is "
                       "unlabelled")
  num_classes = train_source.num_classes
  if max_bank_examples is not None:
    if max_bank_examples < 1:
      raise ValueError(f"max_bank_examples must be >= 1, got {max_bank_examples}")
    if max_bank_examples < train_source.num_examples:
      train_source = datasets.subset_source(train_source, np.arange(max_bank_examples))

  def distributed(source):
    def input_fn(ctx):
      return datasets.eval_dataset(
          source, per_replica_batch_size=ctx.get_per_replica_batch_size(batch_size),
          num_input_pipelines=ctx.num_input_pipelines, input_pipeline_id=ctx.input_pipeline_id,
          image_size=image_size, global_batch_size=batch_size)
    return strategy.distribute_datasets_from_function(input_fn)

  def features(images):
    out = model(images, training=False)[feature_key]
    return tf.math.l2_normalize(tf.cast(out, tf.float32), axis=-1)

  # 1. The bank: each replica's features stay on its device.
  @tf.function
  def embed_step(batch):
    def replica_fn(batch):
      ctx = tf.distribute.get_replica_context()
      valid = batch["mask"] > 0
      return (_replica_id(ctx), features(batch["image"]), tf.cast(batch["label"], tf.int32),
              valid, tf.reduce_sum(tf.cast(valid, tf.int32)))
    out = strategy.run(replica_fn, args=(batch,))
    return out[:4], strategy.reduce(tf.distribute.ReduceOp.SUM, out[4], axis=None)

  parts, bank_size = {}, 0  # parts: global replica id -> [(features, labels, valid), ...]
  for batch in distributed(train_source):
    local, count = embed_step(batch)
    bank_size += int(count)
    for rid, *rows in zip(*(strategy.experimental_local_results(v) for v in local)):
      parts.setdefault(int(rid), []).append(rows)
  if bank_size == 0:
    raise ValueError(f"the kNN bank is empty: {train_source.name} {train_source.split!r} has "
                     "no examples")
  k_used = min(k, bank_size)

  # Every replica's shard has eval_steps * b rows (eval_dataset pads all pipelines alike).
  chunk = min(bank_chunk_size, max(sum(int(r[0].shape[0]) for r in rows)
                                   for rows in parts.values()))
  shards = {}
  for rid, rows in parts.items():
    with tf.device(rows[0][0].device):
      bank, labels, valid = (tf.concat(column, 0) for column in zip(*rows))
      pad = -int(bank.shape[0]) % chunk  # Padded once here rather than at every eval step.
      shards[rid] = (tf.pad(bank, [[0, pad], [0, 0]]), tf.pad(labels, [[0, pad]]),
                     tf.pad(valid, [[0, pad]]))
  bank = strategy.experimental_distribute_values_from_function(
      lambda ctx: shards[ctx.replica_id_in_sync_group])

  # 2. Classify the eval split against the sharded bank.
  @tf.function
  def query_step(batch, bank):
    def replica_fn(batch, bank):
      ctx = tf.distribute.get_replica_context()
      many = ctx.num_replicas_in_sync > 1
      query = features(batch["image"])  # [b, d]
      queries = ctx.all_gather(query, axis=0) if many else query  # [B, d]
      sims, labels = nearest_neighbours(queries, bank[0], bank[1], k_used, bank[2],
                                        chunk_size=chunk)  # [B, k']
      if many:  # Merge the shards' candidates: [B, R k'] -> [B, k].
        sims = ctx.all_gather(sims, axis=1)
        labels = ctx.all_gather(labels, axis=1)
        sims, index = tf.math.top_k(sims, k_used)
        labels = tf.gather(labels, index, batch_dims=1)
      predicted = vote(sims, labels, num_classes, temperature)  # [B]
      if many:  # This replica's rows of the gathered batch.
        b = tf.shape(query)[0]
        predicted = predicted[_replica_id(ctx) * b:(_replica_id(ctx) + 1) * b]
      mask = batch["mask"]
      correct = tf.cast(tf.equal(predicted, tf.cast(batch["label"], tf.int32)), tf.float32)
      return tf.stack([tf.reduce_sum(correct * mask), tf.reduce_sum(mask)])
    return strategy.reduce(tf.distribute.ReduceOp.SUM,
                           strategy.run(replica_fn, args=(batch, bank)), axis=None)

  totals = np.zeros([2])
  for batch in distributed(eval_source):
    totals += query_step(batch, bank).numpy()
  correct, count = totals
  if count == 0:
    raise ValueError(f"the kNN eval split {eval_source.name} {eval_source.split!r} has no "
                     "examples")
  return {"knn/top_1_accuracy": float(correct / count), "knn/k": int(k_used),
          "knn/num_examples": int(count), "knn/bank_size": int(bank_size)}
