"""The training loop: per-replica step, multi-step tf.function, checkpoints and summaries.

The step is written for one replica (its share of the global batch); `strategy.run` appears
only in the loop. The loss is divided by the number of replicas because gradients are summed
across replicas when they are applied, so the applied gradient is that of the global mean.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

from absl import logging
import keras
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import datasets
from tf_simclr import losses
from tf_simclr import model as model_lib
from tf_simclr import optimizers
from tf_simclr import schedules
from tf_simclr.config import RunConfig


def num_views(train_mode: str) -> int:
  """Two augmented views per example when pretraining, one when fine-tuning."""
  return 2 if train_mode == "pretrain" else 1


def validate_batch(global_batch_size: int, num_replicas: int, what: str = "train_batch_size"):
  """Refuses a global batch that does not divide evenly over the replicas."""
  if global_batch_size <= 0 or global_batch_size % num_replicas:
    raise ValueError(f"{what}={global_batch_size} must be a positive multiple of the number of "
                     f"replicas ({num_replicas})")


@dataclasses.dataclass
class TrainState:
  """What the loop and the evaluation share: built under the strategy's scope."""
  model: model_lib.SimCLRModel
  optimizer: keras.optimizers.Optimizer
  learning_rate: schedules.WarmUpAndCosineDecay
  checkpoint: tf.train.Checkpoint
  manager: tf.train.CheckpointManager
  total_steps: int
  steps_per_loop: int


def build_state(cfg: RunConfig, strategy: tf.distribute.Strategy, num_examples: int,
                is_chief: bool = True) -> TrainState:
  """Creates model, optimizer and checkpoint manager under `strategy.scope()` and restores.

  Resumes from the newest restorable checkpoint in `model_dir`; otherwise initialises from
  `cfg.train.checkpoint` (weights only) when given. Fails (ValueError) when fine-tuning has
  nothing to start from, or when a checkpoint does not fit the model asked for.
  """
  t = cfg.train
  total_steps = schedules.get_train_steps(num_examples, t.train_epochs, t.train_batch_size,
                                          t.train_steps)
  epoch_steps = max(1, int(round(num_examples / t.train_batch_size)))
  steps_per_loop = t.checkpoint_steps or t.checkpoint_epochs * epoch_steps  # as the reference
  with strategy.scope():
    # Initial weights depend on the seed alone: Keras draws initializer seeds from global RNG
    # state, which creating a strategy or a dataset may have advanced by a different amount.
    keras.utils.set_random_seed(t.seed)
    model = model_lib.build_model(cfg.model)
    learning_rate = schedules.WarmUpAndCosineDecay(
        cfg.optim.learning_rate, num_examples, t.train_batch_size, cfg.optim.warmup_epochs,
        t.train_epochs, t.train_steps, cfg.optim.learning_rate_scaling)
    optimizer = optimizers.build_optimizer(cfg.optim.optimizer, learning_rate,
                                           momentum=cfg.optim.momentum,
                                           weight_decay=cfg.optim.weight_decay)
    if cfg.runtime.mixed_precision == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Slots exist before restoring, so a checkpoint's optimizer state has somewhere to go.
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    directory = t.model_dir if is_chief else checkpoints.worker_dir(t.model_dir)
    manager = tf.train.CheckpointManager(checkpoint, directory=directory,
                                         max_to_keep=t.keep_checkpoint_max,
                                         checkpoint_name="ckpt")
    restored = checkpoints.restore_latest(checkpoint, manager, t.model_dir)
    if not restored:
      if t.checkpoint:
        checkpoints.restore_weights(model, t.checkpoint)
        if t.zero_init_logits_layer and model.supervised_head is not None:
          model.zero_init_supervised_head()
      elif t.train_mode == "finetune":
        raise ValueError("train_mode=finetune needs --checkpoint (a pretrained checkpoint) or "
                         f"a checkpoint of its own in model_dir={t.model_dir}")
  return TrainState(model, optimizer, learning_rate, checkpoint, manager, total_steps,
                    max(1, steps_per_loop))


class Trainer:
  """Runs training steps of one configuration under one strategy."""

  def __init__(self, cfg: RunConfig, strategy: tf.distribute.Strategy, state: TrainState):
    self.cfg = cfg
    self.strategy = strategy
    self.state = state
    self.num_replicas = strategy.num_replicas_in_sync
    self.pretrain = cfg.train.train_mode == "pretrain"
    self.has_sup_head = state.model.supervised_head is not None
    self.metric_names = ["total_loss", "weight_decay"]
    if self.pretrain:
      self.metric_names += ["contrast_loss", "contrast_acc", "contrast_entropy"]
    if self.has_sup_head:
      self.metric_names += ["supervised_loss", "supervised_acc"]
    self._loop = tf.function(self._train_loop, jit_compile=False)

  def replica_step(self, batch):
    """One optimisation step on this replica's batch.

    Args:
      batch: {'views': float32 [b, V, H, W, 3], 'label': int64 [b] (-1 when unlabeled), ...}.
    Returns:
      dict of scalar metrics (this replica's values).
    """
    model, optimizer = self.state.model, self.state.optimizer
    views = batch["views"]
    v = views.shape[1]
    # View-major: rows 0..b-1 are view one, b..2b-1 view two, as the loss expects.
    images = tf.reshape(tf.transpose(views, [1, 0, 2, 3, 4]), [-1] + views.shape[2:].as_list())
    labels = tf.tile(batch["label"], [v])
    t = self.cfg.train
    metrics = {}
    with tf.GradientTape() as tape:
      out = model(images, training=True)
      loss = tf.constant(0.0)
      if self.pretrain:
        con_loss, logits_ab, labels_con = losses.contrastive_loss(
            out["proj_head_output"], hidden_norm=t.hidden_norm, temperature=t.temperature)
        metrics["contrast_acc"], metrics["contrast_entropy"] = losses.contrastive_metrics(
            logits_ab, labels_con)
        metrics["contrast_loss"] = con_loss
        loss += con_loss
      if self.has_sup_head:
        labelled = tf.cast(labels >= 0, tf.float32)  # unlabeled examples carry label -1
        logits = out["logits_sup"]
        sup_loss = losses.supervised_loss(tf.maximum(labels, 0), logits, weights=labelled)
        correct = tf.cast(tf.equal(tf.argmax(logits, 1), tf.maximum(labels, 0)), tf.float32)
        metrics["supervised_loss"] = sup_loss
        metrics["supervised_acc"] = tf.math.divide_no_nan(tf.reduce_sum(correct * labelled),
                                                          tf.reduce_sum(labelled))
        loss += sup_loss
      # LARS decays the other weights itself; the supervised head's decay is an L2 term here.
      weight_decay = optimizers.supervised_head_l2(model.trainable_variables,
                                                   self.cfg.optim.weight_decay,
                                                   self.cfg.optim.optimizer)
      loss += weight_decay
      scaled_loss = loss / self.num_replicas
      if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scaled_loss = optimizer.scale_loss(scaled_loss)
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    metrics["weight_decay"] = weight_decay
    metrics["total_loss"] = loss
    return metrics

  def _train_loop(self, iterator, num_steps):
    """`num_steps` steps inside one tf.function; returns the mean of each metric."""
    sums = {k: tf.constant(0.0) for k in self.metric_names}
    for _ in tf.range(num_steps):
      per_replica = self.strategy.run(self.replica_step, args=(next(iterator),))
      sums = {k: sums[k] + self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica[k],
                                                axis=None)
              for k in self.metric_names}
    return {k: v / tf.cast(num_steps, tf.float32) for k, v in sums.items()}

  def run_loop(self, iterator, num_steps: int):
    return self._loop(iterator, tf.constant(num_steps, tf.int32))


def _progress_line(step, total, metrics, images_per_s, started, first_step):
  """`step/total  loss ... img/s ETA` for logs and terminals."""
  elapsed = time.time() - started
  done = step - first_step
  eta = (total - step) * elapsed / done if done else float("nan")
  parts = [f"step {step}/{total}", f"loss {metrics['total_loss']:.4f}"]
  for key in ("contrast_acc", "supervised_acc"):
    if key in metrics:
      parts.append(f"{key} {metrics[key]:.3f}")
  parts.append(f"{images_per_s:.1f} img/s")
  if not math.isnan(eta):
    parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
  return "  ".join(parts)


def train(cfg: RunConfig, strategy: tf.distribute.Strategy, source: datasets.Source,
          state: TrainState, is_chief: bool = True, view_examples: dict | None = None) -> int:
  """Trains from the restored step to `state.total_steps`; returns the final step.

  The input resumes at the restored step: the data order is a function of (seed, step), so a
  restarted run sees exactly the examples and views an uninterrupted one would.
  """
  t = cfg.train
  validate_batch(t.train_batch_size, strategy.num_replicas_in_sync)
  trainer = Trainer(cfg, strategy, state)
  step = int(state.optimizer.iterations.numpy())
  if step >= state.total_steps:
    logging.info("Training already complete at step %d / %d", step, state.total_steps)
    return step

  def input_fn(ctx: tf.distribute.InputContext):
    return datasets.train_dataset(
        source, global_batch_size=t.train_batch_size,
        per_replica_batch_size=ctx.get_per_replica_batch_size(t.train_batch_size),
        num_input_pipelines=ctx.num_input_pipelines, input_pipeline_id=ctx.input_pipeline_id,
        seed=t.seed, image_size=cfg.data.image_size, num_views=num_views(t.train_mode),
        start_step=step,
        color_jitter_strength=cfg.data.color_jitter_strength if trainer.pretrain else 0.0,
        use_blur=cfg.data.use_blur and trainer.pretrain, cache=cfg.data.cache_dataset)

  iterator = iter(strategy.distribute_datasets_from_function(input_fn))
  writer = (tf.summary.create_file_writer(t.model_dir) if is_chief
            else tf.summary.create_noop_writer())
  if is_chief and view_examples is not None and step == 0:
    with writer.as_default():
      tf.summary.image("augmented_views", view_examples["images"], step=0, max_outputs=8)
  progbar = (keras.utils.Progbar(state.total_steps, stateful_metrics=trainer.metric_names)
             if sys.stdout.isatty() and is_chief else None)
  if progbar is not None:
    progbar.update(step)
  started, first_step = time.time(), step
  while step < state.total_steps:
    n = min(state.steps_per_loop, state.total_steps - step)
    t0 = time.time()
    metrics = {k: float(v) for k, v in trainer.run_loop(iterator, n).items()}
    elapsed = time.time() - t0
    step = int(state.optimizer.iterations.numpy())
    images_per_s = n * t.train_batch_size / elapsed
    metrics_lr = float(state.learning_rate(step))
    with writer.as_default(step=step):
      for k, v in metrics.items():
        tf.summary.scalar(f"train/{k}", v)
      tf.summary.scalar("learning_rate", metrics_lr)
      tf.summary.scalar("examples_per_second", images_per_s)
    writer.flush()
    checkpoints.save(state.manager, step)
    if progbar is not None:
      progbar.update(step, [(k, v) for k, v in metrics.items()])
    else:
      logging.info("%s", _progress_line(step, state.total_steps, metrics, images_per_s, started,
                                        first_step))
  logging.info("Training complete at step %d", step)
  return step


def write_flags_json(model_dir: str, values: dict) -> None:
  """Writes the JSON-serialisable run settings to `model_dir/flags.json` (as the reference)."""
  serializable = {}
  for key, value in values.items():
    try:
      json.dumps(value)
      serializable[key] = value
    except TypeError:
      continue
  tf.io.gfile.makedirs(model_dir)
  with tf.io.gfile.GFile(os.path.join(model_dir, "flags.json"), "w") as f:
    json.dump(serializable, f, indent=1, sort_keys=True)
