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

from tf_simclr import augment
from tf_simclr import checkpoints
from tf_simclr import convert
from tf_simclr import datasets
from tf_simclr import distill
from tf_simclr import distribute
from tf_simclr import evaluate
from tf_simclr import export
from tf_simclr import knn
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


def warn_batch_over_split(global_batch_size: int, source: datasets.Source) -> str | None:
  """Warns (returns the message) when a batch is larger than the split it draws from."""
  if global_batch_size <= source.num_examples:
    return None
  message = (f"--train_batch_size={global_batch_size} is larger than the {source.num_examples} "
             f"examples of {source.name} split {source.split!r}: each batch repeats examples "
             "(pretraining contrasts the copies of an image as negatives of each other)")
  logging.warning("%s", message)
  return message


def step_images(batch, color_jitter_strength: float = 1.0, use_blur: bool = True):
  """A replica's batch as the model takes it: (images [V*b, H, W, 3], labels int64 [V*b]).

  Rows are view-major (0..b-1 view one, b..2b-1 view two), as the contrastive loss expects.
  With --augment_on_device, 'views' are crops and 'distort' their parameters, each [b, V, ...]:
  the flip, colour jitter, grayscale and blur run here, in the step, on the accelerator.
  """
  views = batch["views"]
  v = views.shape[1]

  def view_major(x):  # [b, V, ...] -> [V*b, ...]
    x = tf.convert_to_tensor(x)
    perm = [1, 0] + list(range(2, x.shape.rank))
    return tf.reshape(tf.transpose(x, perm), [-1] + x.shape[2:].as_list())

  images = view_major(views)
  if "distort" in batch:
    params = {k: view_major(p) for k, p in batch["distort"].items()}
    images = augment.distort_batch(images, params, color_jitter_strength, use_blur)
  return images, tf.tile(batch["label"], [v])


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
  # Distillation's teacher (inference only, not in the checkpoint); None otherwise.
  teacher: model_lib.SimCLRModel | None = None
  # The kNN monitor's last (step, result), so the evaluation at that step need not redo it.
  knn_result: tuple | None = None
  # The signal that stopped training early ('SIGTERM', 'SIGINT'), set by `train`.
  stopped_by: str | None = None


def init_weights(model: model_lib.SimCLRModel, path: str, new_head: bool = False) -> None:
  """Initialises `model` from a tf_simclr checkpoint (prefix or directory) or exported SavedModel,
  or a google-research/simclr checkpoint or SavedModel (converted in memory, `convert`).

  `new_head` (`--zero_init_logits_layer`): a reference model's supervised head is not read, so
  its number of classes may differ.

  Raises:
    ValueError: nothing readable at `path`; checkpoints.CheckpointMismatchError (a ValueError)
      when it holds another model.
  """
  if convert.is_reference(path):
    convert.restore_reference(model, path, new_head=new_head)
  elif export.is_saved_model(path):
    export.restore_from_saved_model(model, path)
  else:
    checkpoints.restore_weights(model, path)


def build_state(cfg: RunConfig, strategy: tf.distribute.Strategy, num_examples: int,
                is_chief: bool = True) -> TrainState:
  """Creates model, optimizer and checkpoint manager under `strategy.scope()` and restores.

  Resumes from the newest restorable checkpoint in `model_dir`; otherwise initialises from
  `cfg.train.checkpoint` (weights only: a checkpoint or an exported SavedModel) when given.
  Distillation also builds and restores the teacher (`cfg.train.teacher_checkpoint`). With
  `cfg.train.mode == "eval"` nothing is restored: the evaluation loop restores each checkpoint.
  Fails (ValueError) when fine-tuning has nothing to start from, when a checkpoint does not fit
  the model asked for, or when the teacher is unusable or predicts another number of classes.
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
    # An eval job beside a training job must not touch (set aside) checkpoints being pruned.
    restored = t.mode == "eval" or checkpoints.restore_latest(checkpoint, manager, t.model_dir)
    if not restored:
      if t.checkpoint:
        init_weights(model, t.checkpoint, new_head=t.zero_init_logits_layer)
        if t.zero_init_logits_layer and model.supervised_head is not None:
          model.zero_init_supervised_head()
      elif t.train_mode == "finetune":
        raise ValueError("train_mode=finetune needs --checkpoint (a pretrained checkpoint or "
                         f"SavedModel) or a checkpoint of its own in model_dir={t.model_dir}")
    teacher = None
    if t.train_mode == "distill" and t.mode != "eval":
      teacher = distill.load_teacher(t.teacher_checkpoint)
      distill.check_classes(teacher.config, cfg.model.num_classes, t.teacher_checkpoint)
  return TrainState(model, optimizer, learning_rate, checkpoint, manager, total_steps,
                    max(1, steps_per_loop), teacher)


def knn_monitor(cfg: RunConfig, strategy: tf.distribute.Strategy, state: TrainState,
                sources: tuple, step: int, is_chief: bool = True, writer=None) -> dict:
  """kNN top-1 of the eval split against the train split's features (`knn.knn_accuracy`).

  Runs on every worker (its collectives need them all), once per step: a second call at the
  same step returns `state.knn_result`. The chief adds the figures to `result.json` /
  `result_<step>.json` (keeping what they hold of that step) and to TensorBoard, when given
  a `writer`.

  Args:
    sources: (bank source, eval source), both labelled.
  Returns:
    {'knn/top_1_accuracy', 'knn/k', 'knn/num_examples', 'knn/bank_size'}.
  """
  if state.knn_result is not None and state.knn_result[0] == step:
    return state.knn_result[1]
  t = cfg.train
  result = knn.knn_accuracy(state.model, strategy, sources[0], sources[1], t.eval_batch_size,
                            cfg.data.image_size, k=t.knn_k, temperature=t.knn_temperature)
  state.knn_result = (step, result)
  if is_chief and writer is not None:
    evaluate.write_results(t.model_dir, result, step, writer, merge=True)
  logging.info("Step %d: kNN top-1 %.4f (k=%d, bank %d)", step, result["knn/top_1_accuracy"],
               result["knn/k"], result["knn/bank_size"])
  return result


class Trainer:
  """Runs training steps of one configuration under one strategy."""

  def __init__(self, cfg: RunConfig, strategy: tf.distribute.Strategy, state: TrainState):
    self.cfg = cfg
    self.strategy = strategy
    self.state = state
    self.num_replicas = strategy.num_replicas_in_sync
    self.pretrain = cfg.train.train_mode == "pretrain"
    self.distill = cfg.train.train_mode == "distill"
    if self.distill and (state.teacher is None or state.model.supervised_head is None):
      raise ValueError("train_mode=distill needs a teacher and a student with a supervised head")
    self.has_sup_head = state.model.supervised_head is not None
    self.metric_names = ["total_loss", "weight_decay"]
    if self.pretrain:
      self.metric_names += ["contrast_loss", "contrast_acc", "contrast_entropy"]
    if self.has_sup_head:
      self.metric_names += ["supervised_loss", "supervised_acc"]
    if self.distill:
      self.metric_names += ["distill_loss", "teacher_agreement"]
    self.color_jitter_strength = cfg.data.color_jitter_strength if self.pretrain else 0.0
    self.use_blur = cfg.data.use_blur and self.pretrain
    jit = cfg.runtime.jit_compile
    if jit and self.num_replicas > 1 and not isinstance(strategy, tf.distribute.TPUStrategy):
      # XLA cannot compile the cross-replica all-reduce (BN) and all-gather (loss) of the
      # mirrored strategies into the step; TPUStrategy compiles the whole step anyway.
      raise ValueError("--jit_compile needs one replica per process (or a TPU, which always "
                       f"compiles); this run has {self.num_replicas}")
    self._gradients = (tf.function(self.compute_gradients, jit_compile=True) if jit
                       else self.compute_gradients)
    self._loop = tf.function(self._train_loop)

  def input_fn(self, source: datasets.Source, start_step: int):
    """The `distribute_datasets_from_function` argument feeding this step from `start_step`."""
    t, data = self.cfg.train, self.cfg.data

    def fn(ctx: tf.distribute.InputContext):
      return datasets.train_dataset(
          source, global_batch_size=t.train_batch_size,
          per_replica_batch_size=ctx.get_per_replica_batch_size(t.train_batch_size),
          num_input_pipelines=ctx.num_input_pipelines, input_pipeline_id=ctx.input_pipeline_id,
          seed=t.seed, image_size=data.image_size, num_views=num_views(t.train_mode),
          start_step=start_step, color_jitter_strength=self.color_jitter_strength,
          use_blur=self.use_blur, cache=data.cache_dataset,
          augment_on_device=self.cfg.runtime.augment_on_device)
    return fn

  def replica_step(self, batch):
    """One optimisation step on this replica's batch.

    Args:
      batch: {'views': float32 [b, V, H, W, 3], 'label': int64 [b] (-1 when unlabeled), ...};
        with --augment_on_device, 'views' are crops and 'distort' their parameters.
    Returns:
      dict of scalar metrics (this replica's values).
    """
    grads, metrics = self._gradients(batch)
    model = self.state.model
    # Outside XLA: the optimizer's cross-replica update is a merge call.
    self.state.optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return metrics

  def compute_gradients(self, batch):
    """Forward and backward pass of one replica: (gradients, metrics); see `replica_step`."""
    model, optimizer = self.state.model, self.state.optimizer
    images, labels = step_images(batch, self.color_jitter_strength, self.use_blur)
    t = self.cfg.train
    metrics = {}
    if self.distill:
      # Outside the tape: the teacher is a fixed function of the same view, in inference mode.
      teacher_logits = self.state.teacher(images, training=False)["logits_sup"]
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
        if self.distill:
          distill_loss = distill.distillation_loss(teacher_logits, logits, t.distill_temperature)
          w = t.distill_label_weight
          # (1 - w) * distillation on every view + w * cross-entropy on the labelled ones.
          loss += (1.0 - w) * distill_loss + w * sup_loss
          metrics["distill_loss"] = distill_loss
          metrics["teacher_agreement"] = tf.reduce_mean(tf.cast(
              tf.equal(tf.argmax(logits, 1), tf.argmax(teacher_logits, 1)), tf.float32))
        else:
          loss += sup_loss
      # The decay the optimizer does not apply itself (with LARS, the supervised head's).
      weight_decay = optimizers.explicit_weight_decay(model.trainable_variables,
                                                      self.cfg.optim.weight_decay,
                                                      self.cfg.optim.optimizer)
      loss += weight_decay
      scaled_loss = loss / self.num_replicas
      if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scaled_loss = optimizer.scale_loss(scaled_loss)
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    metrics["weight_decay"] = weight_decay
    metrics["total_loss"] = loss
    return grads, metrics

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
  for key in ("contrast_acc", "supervised_acc", "teacher_agreement"):
    if key in metrics:
      parts.append(f"{key} {metrics[key]:.3f}")
  parts.append(f"{images_per_s:.1f} img/s")
  if not math.isnan(eta):
    parts.append(f"ETA {int(eta // 60)}m{int(eta % 60):02d}s")
  return "  ".join(parts)


class NonFiniteError(ValueError):
  """Training produced a NaN or infinite loss or weight; nothing non-finite was saved."""


def all_finite(variables) -> bool:
  """Whether every floating-point value of `variables` is finite: one reduction each."""
  checks = [tf.reduce_all(tf.math.is_finite(v)) for v in variables
            if tf.as_dtype(v.dtype).is_floating]
  return bool(tf.reduce_all(checks)) if checks else True


def _check_finite(state: TrainState, loss: float, step: int) -> None:
  """Raises NonFiniteError before a checkpoint of non-finite values is written."""
  if math.isfinite(loss) and all_finite(state.model.variables + state.optimizer.variables):
    return
  what = "the loss" if not math.isfinite(loss) else "a weight"
  last = state.manager.latest_checkpoint
  raise NonFiniteError(
      f"training diverged: {what} is not finite (NaN or inf) at step {step}, so no checkpoint "
      f"was written for it; the last finite checkpoint is {last or 'none (none was written)'}. "
      "Try a lower --learning_rate or --mixed_precision=none")


class LossWatch:
  """Warns, once, when the loss grows `factor` times above the first: divergence ahead.

  Training lowers the loss from its first value; a loss ten times that is a run blowing up
  (e.g. --learning_rate=100: 2,600 to 190,000 in four steps), before it turns NaN.
  """

  def __init__(self, factor: float = 10.0):
    self.factor = factor
    self.first = None
    self.warned = False

  def update(self, step: int, loss: float) -> str | None:
    """Records the mean loss of the steps up to `step`; returns the warning when it is given."""
    if not math.isfinite(loss):
      return None
    if self.first is None:
      self.first = loss
      return None
    if not self.warned and self.first > 0 and loss > self.factor * self.first:
      self.warned = True
      message = (f"The loss grew from {self.first:.4g} to {loss:.4g} by step {step} "
                 f"(x{loss / self.first:.0f}): training is diverging; a lower --learning_rate "
                 "may help")
      logging.warning("%s", message)
      return message
    return None


# A call of the step loop lasts about this long: long enough that calling costs nothing, short
# enough to stop soon after SIGTERM (schedulers allow ~30 s before they kill).
_CALL_SECONDS = 5.0


def train(cfg: RunConfig, strategy: tf.distribute.Strategy, source: datasets.Source,
          state: TrainState, is_chief: bool = True, view_examples: dict | None = None,
          knn_sources: tuple | None = None) -> int:
  """Trains from the restored step to `state.total_steps`; returns the step reached.

  `knn_sources` (bank, eval split) turn on the kNN monitor (`knn_monitor`) after each
  checkpoint interval that crosses a multiple of `cfg.train.knn_eval_every_n_steps`.

  The input resumes at the restored step: the data order is a function of (seed, step), so a
  restarted run sees exactly the examples and views an uninterrupted one would. Checkpoints and
  summaries come every `state.steps_per_loop` steps (at multiples of it, also after a resume).

  SIGTERM (a scheduler's or a preemption's warning) or SIGINT (Ctrl-C) stops training at the
  next step boundary, on every worker at the same step, with a checkpoint there: the returned
  step is then below `state.total_steps`, and `state.stopped_by` names the signal.
  A loss or weight that is not finite raises NonFiniteError before the checkpoint that would
  hold it; a loss growing tenfold is logged as a warning. To answer promptly, the steps
  between two checkpoints run in calls of about `_CALL_SECONDS` each (the step count inside a
  call does not change the result).
  """
  t = cfg.train
  validate_batch(t.train_batch_size, strategy.num_replicas_in_sync)
  warn_batch_over_split(t.train_batch_size, source)
  trainer = Trainer(cfg, strategy, state)
  step = int(state.optimizer.iterations.numpy())
  sync = distribute.ClusterSync(strategy)
  _agree(sync, step)  # all workers restored the same checkpoint
  if step >= state.total_steps:
    logging.info("Training already complete at step %d / %d", step, state.total_steps)
    return step

  iterator = iter(strategy.distribute_datasets_from_function(trainer.input_fn(source, step)))
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
  call_steps, stop = 1, False  # the first call also traces the step: time the next one
  loss_watch = LossWatch()
  with distribute.StopSignal() as sigterm:
    logging.info("Training from step %d to %d", step, state.total_steps)  # signals handled
    while step < state.total_steps and not stop:
      spl = state.steps_per_loop
      boundary = min(state.total_steps, (step // spl + 1) * spl)
      sums, interval_first, t0 = dict.fromkeys(trainer.metric_names, 0.0), step, time.time()
      while step < boundary and not stop:
        n = min(call_steps, boundary - step)
        c0 = time.time()
        out = {k: float(v) for k, v in trainer.run_loop(iterator, n).items()}
        for k, v in out.items():
          sums[k] += v * n
        wanted = int(_CALL_SECONDS * n / max(time.time() - c0, 1e-3))
        step = int(state.optimizer.iterations.numpy())
        loss_watch.update(step, out["total_loss"])
        stop, call_steps = _agree(sync, step, sigterm.received, min(max(wanted, 1), spl))
      if step == boundary:
        metrics = {k: v / (step - interval_first) for k, v in sums.items()}
        images_per_s = (step - interval_first) * t.train_batch_size / (time.time() - t0)
        metrics_lr = float(state.learning_rate(step))
        with writer.as_default(step=step):
          for k, v in metrics.items():
            tf.summary.scalar(f"train/{k}", v)
          tf.summary.scalar("learning_rate", metrics_lr)
          tf.summary.scalar("examples_per_second", images_per_s)
        writer.flush()
      _check_finite(state, sums["total_loss"], step)
      checkpoints.save(state.manager, step, temporary=not is_chief)
      if step < boundary:
        break
      if progbar is not None:
        progbar.update(step, [(k, v) for k, v in metrics.items()])
      else:
        logging.info("%s", _progress_line(step, state.total_steps, metrics, images_per_s,
                                          started, first_step))
      every = t.knn_eval_every_n_steps
      if knn_sources is not None and every and step // every > interval_first // every:
        knn_monitor(cfg, strategy, state, knn_sources, step, is_chief, writer)
  if step < state.total_steps:
    state.stopped_by = sigterm.name or "SIGTERM"
    logging.warning("%s: stopped at step %d of %d with a checkpoint; the same command "
                    "resumes", state.stopped_by, step, state.total_steps)
  else:
    logging.info("Training complete at step %d", step)
  return step


def _agree(sync: distribute.ClusterSync, step: int, stop: bool = False, call_steps: int = 1):
  """Agrees with the other workers: (anyone stopping, the fewest steps anyone wants per call).

  Raises:
    ValueError: the workers are at different steps (they restored different checkpoints).
  """
  rows = sync(int(stop), step, call_steps)
  steps = sorted(set(rows[:, 1].tolist()))
  if len(steps) > 1:
    raise ValueError(f"the workers are at different steps {steps}: each restored another "
                     "checkpoint. Give every worker the same --model_dir, on storage they share")
  return bool(rows[:, 0].any()), int(rows[:, 2].min())


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
