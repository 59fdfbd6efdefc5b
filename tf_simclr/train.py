"""The training loop: per-replica step, multi-step tf.function, checkpoints and summaries.

The step is written for one replica (its share of the global batch); `strategy.run` appears
only in the loop. The loss is divided by the number of replicas because gradients are summed
across replicas when they are applied, so the applied gradient is that of the global mean.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time

from absl import logging
import keras
import tensorflow as tf

from tf_simclr import augment
from tf_simclr import checkpoints
from tf_simclr import convert
from tf_simclr import data_service
from tf_simclr import datasets
from tf_simclr import distill
from tf_simclr import distribute
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


def augmentation(cfg: RunConfig) -> dict:
  """The augmentation of the run's training views (`datasets.train_dataset` arguments).

  Pretraining: two views with colour jitter and blur; fine-tuning and distillation: one view,
  cropped and flipped only (as the reference).
  """
  pretrain = cfg.model.train_mode == "pretrain"
  return dict(
    num_views=num_views(cfg.model.train_mode),
    color_jitter_strength=cfg.data.color_jitter_strength if pretrain else 0.0,
    use_blur=cfg.data.use_blur and pretrain,
    min_scale=cfg.data.min_scale,
    horizontal_flip=cfg.data.horizontal_flip,
  )


def view_examples(cfg: RunConfig, source: datasets.Source, num_examples: int = 4) -> dict:
  """The first examples of the run's first step as it trains on them, to look at (TensorBoard).

  The global stream does not depend on the batch size, so these are exactly step 0's views.

  Returns:
    {'images': float32 [V k, s, s, 3] (example i's views at rows V i .. V i + V - 1; V = 2
     when pretraining, else 1), 'id': int64 [k]}, k = min(num_examples, source.num_examples).
  """
  k, s = min(num_examples, source.num_examples), cfg.model.image_size
  aug = augmentation(cfg)
  batch = next(iter(datasets.train_dataset(source, k, k, 1, 0, cfg.train.seed, s, **aug)))
  return {"images": tf.reshape(batch["views"], [-1, s, s, 3]), "id": batch["id"]}


def warn_batch_over_split(global_batch_size: int, source: datasets.Source) -> str | None:
  """Warns (returns the message) when a batch is larger than the split it draws from."""
  if global_batch_size <= source.num_examples:
    return None
  message = (
    f"--train_batch_size={global_batch_size} is larger than the {source.num_examples} "
    f"examples of {source.name} split {source.split!r}: each batch repeats examples "
    "(pretraining contrasts the copies of an image as negatives of each other)"
  )
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


def _labelled_cross_entropy(logits, labels):
  """(mean cross-entropy, accuracy) over the rows with a label: logits [B, C], labels [B].

  Unlabelled rows carry label -1; they count in neither mean (0 when no row has a label).
  """
  labelled = tf.cast(labels >= 0, tf.float32)
  loss = losses.supervised_loss(tf.maximum(labels, 0), logits, weights=labelled)
  correct = tf.cast(tf.equal(tf.argmax(logits, 1), tf.maximum(labels, 0)), tf.float32)
  accuracy = tf.math.divide_no_nan(tf.reduce_sum(correct * labelled), tf.reduce_sum(labelled))
  return loss, accuracy


def compute_losses(
  outputs: dict,
  labels,
  variables,
  teacher_logits=None,
  *,
  contrastive: bool = True,
  temperature: float = 0.1,
  hidden_norm: bool = True,
  distill_temperature: float = 1.0,
  distill_label_weight: float = 0.0,
  weight_decay: float = 0.0,
  optimizer_name: str = "lars",
):
  """The objective of one replica's batch (Algorithm 1, and SimCLRv2's): (loss, metrics).

    loss = contrastive loss of the projections (pretraining)
         + cross-entropy of the supervised head on the labelled rows, or, when distilling,
           (1 - w) * distillation loss on every row + w * that cross-entropy
         + the weight decay the optimizer does not apply (`optimizers.explicit_weight_decay`).

  A function of tensors (the step calls it inside its tape): no model, no division by the
  number of replicas, no loss scaling.

  Args:
    outputs: the model's endpoints for the replica's V*b views (rows view-major): uses
      'proj_head_output' float [V*b, p] when `contrastive`, 'logits_sup' float [V*b, C] if any.
    labels: int [V*b]; -1 marks an unlabelled row.
    variables: the trainable variables, for the weight-decay term.
    teacher_logits: float [V*b, C], the teacher's on the same views; None: no distillation.
    contrastive: add `losses.contrastive_loss` (with `temperature`, `hidden_norm`).
    distill_temperature, distill_label_weight: tau of `distill.distillation_loss`, and w.
    weight_decay, optimizer_name: of `optimizers.explicit_weight_decay`.
  Returns:
    (loss, metrics): float32 scalars; metrics has 'total_loss' (the loss) and 'weight_decay';
    with `contrastive`, 'contrast_loss', 'contrast_acc', 'contrast_entropy'; with 'logits_sup',
    'supervised_loss' and 'supervised_acc' (over the labelled rows); when distilling,
    'distill_loss' and 'teacher_agreement' (student's argmax = teacher's, over every row).
  """
  metrics = {}
  loss = tf.constant(0.0)
  if contrastive:
    con_loss, logits_ab, labels_con = losses.contrastive_loss(
      outputs["proj_head_output"], hidden_norm=hidden_norm, temperature=temperature
    )
    metrics["contrast_acc"], metrics["contrast_entropy"] = losses.contrastive_metrics(
      logits_ab, labels_con
    )
    metrics["contrast_loss"] = con_loss
    loss += con_loss
  if "logits_sup" in outputs:
    logits = outputs["logits_sup"]
    sup_loss, metrics["supervised_acc"] = _labelled_cross_entropy(logits, labels)
    metrics["supervised_loss"] = sup_loss
    if teacher_logits is not None:
      distill_loss = distill.distillation_loss(teacher_logits, logits, distill_temperature)
      w = distill_label_weight
      loss += (1.0 - w) * distill_loss + w * sup_loss
      metrics["distill_loss"] = distill_loss
      metrics["teacher_agreement"] = tf.reduce_mean(
        tf.cast(tf.equal(tf.argmax(logits, 1), tf.argmax(teacher_logits, 1)), tf.float32)
      )
    else:
      loss += sup_loss
  elif teacher_logits is not None:
    raise ValueError("distillation needs a student with a supervised head ('logits_sup')")
  metrics["weight_decay"] = optimizers.explicit_weight_decay(
    variables, weight_decay, optimizer_name
  )
  loss += metrics["weight_decay"]
  metrics["total_loss"] = loss
  return loss, metrics


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
  # The run's kNN monitor (`knn.knn_monitor`), made at its first use; it keeps its last
  # (step, result), so the evaluation at that step need not redo it.
  knn: knn.KnnMonitor | None = None
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


def build_state(
  cfg: RunConfig, strategy: tf.distribute.Strategy, num_examples: int, is_chief: bool = True
) -> TrainState:
  """Creates model, optimizer and checkpoint manager under `strategy.scope()` and restores.

  Resumes from the newest restorable checkpoint in `model_dir`; otherwise initialises from
  `cfg.train.checkpoint` (weights only: a checkpoint or an exported SavedModel) when given.
  Distillation also builds and restores the teacher (`cfg.train.teacher_checkpoint`). With
  `cfg.train.mode == "eval"` nothing is restored: the evaluation loop restores each checkpoint.
  Fails (ValueError) when fine-tuning has nothing to start from, when a checkpoint does not fit
  the model asked for, or when the teacher is unusable or predicts another number of classes.
  """
  t = cfg.train
  total_steps = schedules.get_train_steps(
    num_examples, t.train_epochs, t.train_batch_size, t.train_steps
  )
  epoch_steps = max(1, int(round(num_examples / t.train_batch_size)))
  steps_per_loop = t.checkpoint_steps or t.checkpoint_epochs * epoch_steps  # as the reference
  with strategy.scope():
    # Initial weights depend on the seed alone: Keras draws initializer seeds from global RNG
    # state, which creating a strategy or a dataset may have advanced by a different amount.
    keras.utils.set_random_seed(t.seed)
    model = model_lib.build_model(cfg.model)
    learning_rate = schedules.WarmUpAndCosineDecay(
      cfg.optim.learning_rate,
      num_examples,
      t.train_batch_size,
      cfg.optim.warmup_epochs,
      t.train_epochs,
      t.train_steps,
      cfg.optim.learning_rate_scaling,
    )
    optimizer = optimizers.build_optimizer(
      cfg.optim.optimizer,
      learning_rate,
      momentum=cfg.optim.momentum,
      weight_decay=cfg.optim.weight_decay,
    )
    if cfg.runtime.mixed_precision == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Slots exist before restoring, so a checkpoint's optimizer state has somewhere to go.
    optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    directory = t.model_dir if is_chief else checkpoints.worker_dir(t.model_dir)
    manager = tf.train.CheckpointManager(
      checkpoint, directory=directory, max_to_keep=t.keep_checkpoint_max, checkpoint_name="ckpt"
    )
    # An eval job beside a training job must not touch (set aside) checkpoints being pruned.
    restored = t.mode == "eval" or checkpoints.restore_latest(checkpoint, manager, t.model_dir)
    if not restored:
      if t.checkpoint:
        init_weights(model, t.checkpoint, new_head=t.zero_init_logits_layer)
        if t.zero_init_logits_layer and model.supervised_head is not None:
          model.zero_init_supervised_head()
      elif cfg.model.train_mode == "finetune":
        raise ValueError(
          "train_mode=finetune needs --checkpoint (a pretrained checkpoint or "
          f"SavedModel) or a checkpoint of its own in model_dir={t.model_dir}"
        )
    teacher = None
    if cfg.model.train_mode == "distill" and t.mode != "eval":
      teacher = distill.load_teacher(t.teacher_checkpoint)
      distill.check_classes(teacher.config, cfg.model.num_classes, t.teacher_checkpoint)
  return TrainState(
    model,
    optimizer,
    learning_rate,
    checkpoint,
    manager,
    total_steps,
    max(1, steps_per_loop),
    teacher,
  )


class Trainer:
  """Runs training steps of one configuration under one strategy."""

  def __init__(self, cfg: RunConfig, strategy: tf.distribute.Strategy, state: TrainState):
    self.cfg = cfg
    self.strategy = strategy
    self.state = state
    self.num_replicas = strategy.num_replicas_in_sync
    self.pretrain = cfg.model.train_mode == "pretrain"
    self.distill = cfg.model.train_mode == "distill"
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
    aug = augmentation(cfg)
    self.color_jitter_strength, self.use_blur = aug["color_jitter_strength"], aug["use_blur"]
    jit = cfg.runtime.jit_compile
    if jit and self.num_replicas > 1 and not isinstance(strategy, tf.distribute.TPUStrategy):
      # XLA cannot compile the cross-replica all-reduce (BN) and all-gather (loss) of the
      # mirrored strategies into the step; TPUStrategy compiles the whole step anyway.
      raise ValueError(
        "--jit_compile needs one replica per process (or a TPU, which always "
        f"compiles); this run has {self.num_replicas}"
      )
    self._gradients = (
      tf.function(self.compute_gradients, jit_compile=True) if jit else self.compute_gradients
    )
    self._loop = tf.function(self._train_loop)

  def input_fn(self, source: datasets.Source, start_step: int):
    """The `distribute_datasets_from_function` argument feeding this step from `start_step`."""
    t, data = self.cfg.train, self.cfg.data
    build = datasets.train_dataset
    if self.cfg.runtime.data_service:  # a tf.data service's workers make the examples
      job = data_service.job_name(t.model_dir, start_step)
      build = functools.partial(
        data_service.train_dataset, service=self.cfg.runtime.data_service, job=job
      )
    make_dataset = functools.partial(
      build,
      source,
      global_batch_size=t.train_batch_size,
      seed=t.seed,
      image_size=self.cfg.model.image_size,
      start_step=start_step,
      cache=data.cache_dataset,
      augment_on_device=self.cfg.runtime.augment_on_device,
      **augmentation(self.cfg),
    )
    return distribute.input_fn(t.train_batch_size, make_dataset)

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
    t, o = self.cfg.train, self.cfg.optim
    images, labels = step_images(batch, self.color_jitter_strength, self.use_blur)
    teacher_logits = None
    if self.distill:
      # Outside the tape: the teacher is a fixed function of the same view, in inference mode.
      teacher_logits = self.state.teacher(images, training=False)["logits_sup"]
    with tf.GradientTape() as tape:
      outputs = model(images, training=True)
      loss, metrics = compute_losses(
        outputs,
        labels,
        model.trainable_variables,
        teacher_logits,
        contrastive=self.pretrain,
        temperature=t.temperature,
        hidden_norm=t.hidden_norm,
        distill_temperature=t.distill_temperature,
        distill_label_weight=t.distill_label_weight,
        weight_decay=o.weight_decay,
        optimizer_name=o.optimizer,
      )
      scaled_loss = loss / self.num_replicas  # the replicas' gradients are summed (docstring)
      if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scaled_loss = optimizer.scale_loss(scaled_loss)
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    return grads, metrics

  def _train_loop(self, iterator, num_steps):
    """`num_steps` steps inside one tf.function; returns the mean of each metric."""
    sums = {k: tf.constant(0.0) for k in self.metric_names}
    for _ in tf.range(num_steps):
      per_replica = self.strategy.run(self.replica_step, args=(next(iterator),))
      sums = {
        k: sums[k] + self.strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica[k], axis=None)
        for k in self.metric_names
      }
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
  checks = [
    tf.reduce_all(tf.math.is_finite(v)) for v in variables if tf.as_dtype(v.dtype).is_floating
  ]
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
    "Try a lower --learning_rate or --mixed_precision=none"
  )


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
      message = (
        f"The loss grew from {self.first:.4g} to {loss:.4g} by step {step} "
        f"(x{loss / self.first:.0f}): training is diverging; a lower --learning_rate "
        "may help"
      )
      logging.warning("%s", message)
      return message
    return None


# A call of the step loop lasts about this long: long enough that calling costs nothing, short
# enough to stop soon after SIGTERM (schedulers allow ~30 s before they kill).
_CALL_SECONDS = 5.0


class _StepCalls:
  """The steps of a checkpoint interval, in calls of the step loop of about `_CALL_SECONDS`.

  After each call the workers agree on the steps of the next (the fewest any wants, from the
  time its last call took) and on whether one of them got a stop signal, so that all run the
  same calls and stop at the same step.
  """

  def __init__(
    self,
    trainer: Trainer,
    iterator,
    sync: distribute.ClusterSync,
    stop_signal: distribute.StopSignal,
  ):
    self.trainer, self.iterator, self.sync, self.stop_signal = trainer, iterator, sync, stop_signal
    self.call_steps = 1  # the first call also traces the step: time the next one
    self.loss_watch = LossWatch()

  def run(self, step: int, boundary: int) -> tuple[int, dict, bool]:
    """Steps from `step` to `boundary`, or fewer when stopping: (step reached, sums, stop).

    `sums` holds each metric's sum over the steps run (a call's mean times its steps).
    """
    state = self.trainer.state
    sums, stop = dict.fromkeys(self.trainer.metric_names, 0.0), False
    while step < boundary and not stop:
      n = min(self.call_steps, boundary - step)
      c0 = time.time()
      out = {k: float(v) for k, v in self.trainer.run_loop(self.iterator, n).items()}
      for k, v in out.items():
        sums[k] += v * n
      wanted = int(_CALL_SECONDS * n / max(time.time() - c0, 1e-3))
      step = int(state.optimizer.iterations.numpy())
      self.loss_watch.update(step, out["total_loss"])
      stop, self.call_steps = _agree(
        self.sync, step, self.stop_signal.received, min(max(wanted, 1), state.steps_per_loop)
      )
    return step, sums, stop


class _IntervalEnd:
  """The work at the end of a checkpoint interval: summaries, checkpoint, progress, kNN."""

  def __init__(
    self,
    cfg: RunConfig,
    strategy: tf.distribute.Strategy,
    state: TrainState,
    metric_names: list,
    step: int,
    is_chief: bool,
    view_examples: dict | None,
    knn_sources: tuple | None,
    after_save=None,
  ):
    self.cfg, self.strategy, self.state = cfg, strategy, state
    self.is_chief, self.knn_sources, self.after_save = is_chief, knn_sources, after_save
    self.writer = (
      tf.summary.create_file_writer(cfg.train.model_dir)
      if is_chief
      else tf.summary.create_noop_writer()
    )
    if is_chief and view_examples is not None and step == 0:
      with self.writer.as_default():
        tf.summary.image("augmented_views", view_examples["images"], step=0, max_outputs=8)
    self.progbar = (
      keras.utils.Progbar(state.total_steps, stateful_metrics=metric_names)
      if sys.stdout.isatty() and is_chief
      else None
    )
    if self.progbar is not None:
      self.progbar.update(step)
    self.started, self.first_step = time.time(), step

  def __call__(self, step: int, boundary: int, first: int, started: float, sums: dict) -> bool:
    """Ends the interval of steps `first` to `step` (begun at time `started`).

    Summaries when it reached `boundary`; the finiteness check and the checkpoint always;
    then, unless it stopped short of `boundary`, the progress line and the kNN monitor.
    Returns whether training goes on (it reached `boundary`).
    """
    if step == boundary:
      metrics = {k: v / (step - first) for k, v in sums.items()}
      images_per_s = (step - first) * self.cfg.train.train_batch_size / (time.time() - started)
      self._summaries(step, metrics, images_per_s)
    _check_finite(self.state, sums["total_loss"], step)
    checkpoints.save(self.state.manager, step, temporary=not self.is_chief)
    if self.after_save is not None:
      self.after_save()
      self.after_save = None
    if step < boundary:
      return False
    if self.progbar is not None:
      self.progbar.update(step, [(k, v) for k, v in metrics.items()])
    else:
      logging.info(
        "%s",
        _progress_line(
          step, self.state.total_steps, metrics, images_per_s, self.started, self.first_step
        ),
      )
    every = self.cfg.train.knn_eval_every_n_steps
    if self.knn_sources is not None and every and step // every > first // every:
      knn.knn_monitor(
        self.cfg, self.strategy, self.state, self.knn_sources, step, self.is_chief, self.writer
      )
    return True

  def _summaries(self, step: int, metrics: dict, images_per_s: float) -> None:
    with self.writer.as_default(step=step):
      for k, v in metrics.items():
        tf.summary.scalar(f"train/{k}", v)
      tf.summary.scalar("learning_rate", float(self.state.learning_rate(step)))
      tf.summary.scalar("examples_per_second", images_per_s)
    self.writer.flush()


def train(
  cfg: RunConfig,
  strategy: tf.distribute.Strategy,
  source: datasets.Source,
  state: TrainState,
  is_chief: bool = True,
  view_examples: dict | None = None,
  knn_sources: tuple | None = None,
  after_save=None,
) -> int:
  """Trains from the restored step to `state.total_steps`; returns the step reached.

  `knn_sources` (bank, eval split) turn on the kNN monitor (`knn.knn_monitor`) after each
  checkpoint interval that crosses a multiple of `cfg.train.knn_eval_every_n_steps`.
  `after_save` () -> None is called once, after the first checkpoint is written (run.py then
  records a resume's changed settings: they have taken effect).

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
  distribute.check_batch(cfg.train.train_batch_size, strategy.num_replicas_in_sync)
  warn_batch_over_split(cfg.train.train_batch_size, source)
  trainer = Trainer(cfg, strategy, state)
  step = int(state.optimizer.iterations.numpy())
  sync = distribute.ClusterSync(strategy)
  _agree(sync, step)  # all workers restored the same checkpoint
  if step >= state.total_steps:
    logging.info("Training already complete at step %d / %d", step, state.total_steps)
    return step

  iterator = iter(strategy.distribute_datasets_from_function(trainer.input_fn(source, step)))
  end_interval = _IntervalEnd(
    cfg,
    strategy,
    state,
    trainer.metric_names,
    step,
    is_chief,
    view_examples,
    knn_sources,
    after_save,
  )
  with distribute.StopSignal() as stop_signal:
    logging.info("Training from step %d to %d", step, state.total_steps)  # signals handled
    calls, stop = _StepCalls(trainer, iterator, sync, stop_signal), False
    while step < state.total_steps and not stop:
      spl = state.steps_per_loop
      boundary = min(state.total_steps, (step // spl + 1) * spl)
      first, started = step, time.time()
      step, sums, stop = calls.run(step, boundary)
      if not end_interval(step, boundary, first, started, sums):
        break
  if step < state.total_steps:
    state.stopped_by = stop_signal.name or "SIGTERM"
    logging.warning(
      "%s: stopped at step %d of %d with a checkpoint; the same command resumes",
      state.stopped_by,
      step,
      state.total_steps,
    )
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
    raise ValueError(
      f"the workers are at different steps {steps}: each restored another "
      "checkpoint. Give every worker the same --model_dir, on storage they share"
    )
  return bool(rows[:, 0].any()), int(rows[:, 2].min())
