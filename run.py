"""tf_simclr's entry point: `python run.py --mode=train_then_eval ...` (flags as the reference).

Parses flags into a RunConfig and calls the library. Bad input ends with one line on stderr and
exit status 1 (set TF_SIMCLR_TRACEBACK=1 to see the traceback instead); an internal error (a bug)
keeps its traceback, ends with a line asking for a report, and exits with status 70.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import logging  # noqa: E402

from flags import definitions  # noqa: E402  (defines the flags)

FLAGS = definitions.FLAGS


class Interrupted(Exception):
  """Ctrl-C (SIGINT) stopped the run; the message is its one line. Exit status 130."""


def _setup_runtime(cfg):
  """Process-wide settings that must precede any TensorFlow op."""
  import keras  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
  from tf_simclr.data import pipeline  # pylint: disable=g-import-not-at-top

  distribute.configure_cpu_replicas(cfg.runtime.cpu_replicas)
  rt = cfg.runtime
  if distribute.steps_on_accelerator(
    rt.strategy, rt.cpu_replicas, rt.use_tpu, rt.tpu_name, rt.master
  ):
    pipeline.feed_only_threads()
  keras.utils.set_random_seed(cfg.train.seed)
  if cfg.train.deterministic:
    tf.config.experimental.enable_op_determinism()
  if cfg.runtime.mixed_precision != "none":
    keras.mixed_precision.set_dtype_policy(cfg.runtime.mixed_precision)


def _export(cfg, model, step):
  from tf_simclr import export  # pylint: disable=g-import-not-at-top

  parent = os.path.join(cfg.train.model_dir, "saved_model")
  target = os.path.join(parent, str(step))
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if tf.io.gfile.exists(target):
    differences = export.manifest_differences(target, cfg.model)
    if differences:
      # Not replaced: an export is never deleted by a run; the user decides.
      logging.warning(
        "The export %s is of another model than this run's (%s); kept as it is. Delete it "
        "and rerun to export this run's",
        target,
        "; ".join(differences),
      )
    else:
      logging.info("An export for step %d exists at %s; kept as it is", step, target)
    return target
  from tf_simclr import train as train_lib  # pylint: disable=g-import-not-at-top

  if not train_lib.all_finite(model.variables):
    raise ValueError(
      f"not exporting step {step}: the model has weights that are not finite (NaN or inf)"
    )
  export.export_saved_model(
    model, target, weight_decay=cfg.optim.weight_decay, optimizer_name=cfg.optim.optimizer
  )
  export.prune_exports(parent, cfg.train.keep_hub_module_max)
  return target


def _claim_model_dir(t, flag_values, is_chief):
  """Refuses another run's model_dir; training then takes its lock (released at exit).

  Before anything is written. Evaluation (`--mode=eval`) may join a training job: it takes no
  lock, but must evaluate the checkpoints as the model they are (`rundir.check_eval`).
  """
  from tf_simclr import rundir  # pylint: disable=g-import-not-at-top

  if t.mode == "eval":
    rundir.check_eval(t.model_dir, flag_values)
    return
  rundir.check_resume(t.model_dir, flag_values)
  if is_chief:  # One training job per model_dir.
    lock = rundir.TrainingLock(t.model_dir)
    lock.acquire()
    atexit.register(lock.release)


def run(cfg, flag_values):
  """Trains and/or evaluates as `cfg.train.mode` says. Returns the final result dict or None."""
  _setup_runtime(cfg)
  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
  from tf_simclr import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr import train_state  # pylint: disable=g-import-not-at-top

  t = cfg.train
  if cfg.runtime.data_service and t.mode != "eval":  # before model_dir is touched
    from tf_simclr import data_service  # pylint: disable=g-import-not-at-top

    data_service.check_dispatcher(cfg.runtime.data_service)
  strategy = distribute.make_strategy(
    cfg.runtime.strategy,
    cfg.runtime.cpu_replicas,
    use_tpu=cfg.runtime.use_tpu,
    tpu_name=cfg.runtime.tpu_name,
    tpu_zone=cfg.runtime.tpu_zone,
    gcp_project=cfg.runtime.gcp_project,
    master=cfg.runtime.master,
  )
  replicas = strategy.num_replicas_in_sync
  logging.info("Strategy %s with %d replicas", type(strategy).__name__, replicas)
  distribute.check_batch(t.train_batch_size, replicas, "train_batch_size")
  distribute.check_batch(t.eval_batch_size, replicas, "eval_batch_size")
  is_chief = distribute.is_chief(strategy)
  _claim_model_dir(t, flag_values, is_chief)
  distribute.warn_slow_bfloat16(strategy, cfg.runtime.mixed_precision)

  plan = plan_lib.make_plan(cfg)
  state = train_state.build_state(plan.cfg, strategy, plan.train_source.num_examples, is_chief)
  record_resume = None
  if is_chief and t.mode != "eval":
    record_resume = _record_run(plan, flag_values)
  if t.mode in ("train", "train_then_eval"):
    return _train(plan, strategy, state, is_chief, record_resume)
  return _evaluate_checkpoints(plan, strategy, state, is_chief, flag_values)


def _record_run(plan, flag_values):
  """Writes a new run's flags.json and label subset into model_dir (a resumed run's are kept).

  A training job holds the model_dir's lock: no export of ours is in progress, so the
  temporary directories of killed exports are removed (with a log line).
  Returns, for a resume, what records its changed settings (`rundir.record_flags`): to call
  once they have taken effect (its first checkpoint), so a resume that fails at once (a full
  disk) leaves no record of settings that never ran. None for a new run.
  """
  from tf_simclr import export  # pylint: disable=g-import-not-at-top
  from tf_simclr import rundir  # pylint: disable=g-import-not-at-top
  from tf_simclr.data import label_subsets  # pylint: disable=g-import-not-at-top

  model_dir = plan.cfg.train.model_dir
  if plan.cfg.model.train_mode != "pretrain":
    label_subsets.write_label_subset(model_dir, plan.label_ids)  # Refuses another subset.
  export.remove_leftovers(os.path.join(model_dir, "saved_model"))
  if rundir.check_resume(model_dir, flag_values):
    return functools.partial(rundir.record_flags, model_dir, flag_values)
  rundir.record_flags(model_dir, flag_values)
  return None


def _train(plan, strategy, state, is_chief, record_resume=None):
  """Trains to the last step; with mode=train_then_eval, then evaluates and exports.

  `record_resume`: see `_record_run`; called after the first checkpoint, or before the
  evaluation when there was nothing left to train.
  """
  from tf_simclr import train as train_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr import trainer  # pylint: disable=g-import-not-at-top

  cfg, t = plan.cfg, plan.cfg.train
  pending = [record_resume] if record_resume is not None else []

  def after_save():
    while pending:
      pending.pop()()

  step = train_lib.train(
    cfg,
    strategy,
    plan.train_source,
    state,
    is_chief,
    trainer.view_examples(cfg, plan.train_source),
    knn_sources=plan.knn_sources,
    after_save=after_save,
  )
  if step < state.total_steps:
    if state.stopped_by == "SIGINT":
      raise Interrupted(
        f"Interrupted: SIGINT stopped training at step {step} of "
        f"{state.total_steps}, checkpoint saved in {t.model_dir}. Run the same "
        "command to resume."
      )
    print(
      f"Preempted: SIGTERM stopped training at step {step} of {state.total_steps}, "
      f"checkpoint saved in {t.model_dir}. Run the same command to resume."
    )
    return None
  if t.mode == "train":
    print(f"Trained to step {step}. Checkpoints in {t.model_dir}")
    return None
  after_save()  # Already trained to the end: the changed settings act on the evaluation.
  return _evaluate_and_export(
    cfg, strategy, state, plan.eval_source, step, is_chief, plan.knn_sources
  )


def _evaluate_checkpoints(plan, strategy, state, is_chief, flag_values):
  """mode=eval, beside a training job: each new checkpoint once, until the last step.

  Each checkpoint must hold every variable of the model (a partial restore is an error); the
  optimizer's are not read, as they do not change what the model computes. The step is the
  checkpoint's number (training saves `ckpt-<step>`).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr import evaluate  # pylint: disable=g-import-not-at-top
  from tf_simclr import rundir  # pylint: disable=g-import-not-at-top

  t = plan.cfg.train
  result = None
  for step, _ in evaluate.restored_checkpoints(
    tf.train.Checkpoint(model=state.model),
    t.model_dir,
    state.total_steps,
    timeout_secs=t.eval_timeout_s,
    check=functools.partial(rundir.check_eval, t.model_dir, flag_values),
  ):
    result = _evaluate_and_export(
      plan.cfg, strategy, state, plan.eval_source, step, is_chief, plan.knn_sources
    )
  return result


def _summary_keys(train_mode):
  """(name, result key) of the figures the closing line prints, the headline first.

  After pretraining the kNN vote leads: it reads the encoder on un-augmented images without
  training anything, while the linear head trained alongside learnt from the pretraining views
  with the encoder's decaying learning rate, and moves by several points with the seed
  (README, "What the quick start shows").
  """
  top1, top5, knn = "eval/label_top_1_accuracy", "eval/label_top_5_accuracy", "knn/top_1_accuracy"
  if train_mode == "pretrain":
    return (("kNN top-1", knn), ("linear head top-1", top1), ("top-5", top5))
  return (("top-1", top1), ("top-5", top5), ("kNN top-1", knn))


def _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief, knn_sources=None):
  """Top-1/top-5 of the supervised head (and the kNN monitor's figure), then the export."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr import evaluate  # pylint: disable=g-import-not-at-top
  from tf_simclr import knn  # pylint: disable=g-import-not-at-top

  result = {}
  if eval_source is not None and state.model.supervised_head is not None:
    result = evaluate.evaluate(
      state.model,
      strategy,
      eval_source,
      cfg.train.eval_batch_size,
      cfg.model.image_size,
      cfg.train.eval_steps,
      cfg.optim.weight_decay,
      cfg.optim.optimizer,
      step=step,
    )
  else:  # The plan warned of an unlabelled eval split.
    why = "no linear-evaluation head" if state.model.supervised_head is None else "no labels"
    logging.info("Skipping eval: %s", why)
  if knn_sources is not None:
    # Computed once per step (the monitor may have run at this step); written below.
    result.update(knn.knn_monitor(cfg, strategy, state, knn_sources, step, is_chief))
  if is_chief and result:
    writer = tf.summary.create_file_writer(cfg.train.model_dir)
    evaluate.write_results(cfg.train.model_dir, result, step, writer)
    figures = [
      f"{name} {result[key]:.4f}"
      for name, key in _summary_keys(cfg.model.train_mode)
      if key in result
    ]
    print(
      f"Step {step}: {', '.join(figures)} on {eval_source.name}/{eval_source.split}. "
      f"Results: {os.path.join(cfg.train.model_dir, 'result.json')}"
    )
  if is_chief:
    try:
      target = _export(cfg, state.model, step)
    except FileExistsError:  # Written meanwhile by a job beside this one (train / eval).
      target = os.path.join(cfg.train.model_dir, "saved_model", str(step))
    print(f"SavedModel: {target}")
  return result or None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  started = time.time()
  try:
    flag_values = FLAGS.flag_values_dict()
    cfg = definitions.to_config(flag_values)
    run(cfg, flag_values)
  except (Interrupted, KeyboardInterrupt) as err:
    # 128 + SIGINT, as shells report a process that Ctrl-C ended.
    print(
      str(err)
      or "Interrupted: SIGINT before training began or after it ended; nothing "
      "to save. Run the same command to start again.",
      file=sys.stderr,
    )
    sys.exit(130)
  except Exception as err:  # pylint: disable=broad-except
    from tf_simclr import errors  # pylint: disable=g-import-not-at-top

    if os.environ.get("TF_SIMCLR_TRACEBACK"):
      raise
    if not errors.is_input_error(err):
      # Not the user's input: our bug, or TensorFlow's. The traceback is what a report needs.
      traceback.print_exc()
      print(
        f"internal error ({type(err).__name__}): this is a bug in tf_simclr, not a problem "
        "with your input; please report it with the traceback above",
        file=sys.stderr,
      )
      sys.exit(errors.EX_SOFTWARE)
    message = _one_line_message(err)
  else:
    logging.info("Done in %.1f s", time.time() - started)
    return
  # Leaving the except block freed the traceback; half-restored checkpoint objects it held
  # log warnings when collected. Let that happen first, so the error is the last line.
  gc.collect()
  print(message, file=sys.stderr)
  sys.exit(1)


def _one_line_message(err):
  """The `error: ...` line of an input error (`errors.is_input_error`)."""
  from tf_simclr import errors  # pylint: disable=g-import-not-at-top

  if isinstance(err, (ValueError, OSError)):
    return f"error: {err}"
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (err is one of its errors)

  message = f"error: {type(err).__name__}: {errors.first_line(err)}"
  lost_peer = (
    tf.errors.UnavailableError,
    tf.errors.AbortedError,
    tf.errors.DeadlineExceededError,
    tf.errors.CancelledError,
  )
  if FLAGS["strategy"].value == "multi_worker" and isinstance(err, lost_peer):
    # What the other workers see when one dies: its connections reset, or the coordination
    # service misses its heartbeats (10 s) and aborts every collective.
    message = (
      f"error: lost contact with another worker of the cluster ({message[7:]}); "
      "restart every worker with the same command to resume from the last "
      "checkpoint"
    )
  return message


if __name__ == "__main__":
  app.run(main)
