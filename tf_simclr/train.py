"""The training loop: `train` runs the steps in checkpoint intervals, writes checkpoints and
summaries, watches the loss, and stops on SIGTERM at the same step on every worker.

run.py calls `train` with the state of `train_state.build_state`; each interval's steps run in
calls of `trainer.Trainer`'s multi-step tf.function (`_StepCalls`), and `_IntervalEnd` does the
work at its end (summaries, the finiteness check, the checkpoint, progress, the kNN monitor).
"""

from __future__ import annotations

import math
import sys
import time

from absl import logging
import keras
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import distribute
from tf_simclr import knn
from tf_simclr.config import RunConfig
from tf_simclr.data import sources
from tf_simclr.train_state import TrainState
from tf_simclr.trainer import Trainer


def warn_batch_over_split(global_batch_size: int, source: sources.Source) -> str | None:
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
  source: sources.Source,
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
