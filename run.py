"""tf_simclr's entry point: `python run.py --mode=train_then_eval ...` (flags as the reference).

Parses flags into a RunConfig and calls the library. Bad input ends with one line on stderr and
exit status 1; set TF_SIMCLR_TRACEBACK=1 to see the traceback instead.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import os
import re
import sys
import time

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
  distribute.configure_cpu_replicas(cfg.runtime.cpu_replicas)
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
    logging.info("An export for step %d exists at %s; kept as it is", step, target)
    return target
  from tf_simclr import train as train_lib  # pylint: disable=g-import-not-at-top
  if not train_lib.all_finite(model.variables):
    raise ValueError(f"not exporting step {step}: the model has weights that are not finite "
                     "(NaN or inf)")
  export.export_saved_model(model, target, weight_decay=cfg.optim.weight_decay,
                            optimizer_name=cfg.optim.optimizer)
  export.prune_exports(parent, cfg.train.keep_hub_module_max)
  return target


def _claim_model_dir(t, flag_values, is_chief):
  """Training: refuses another run's model_dir, then takes its lock (released at exit).

  Before anything is written. Evaluation (`--mode=eval`) may join a training job: no check.
  """
  from tf_simclr import rundir  # pylint: disable=g-import-not-at-top
  if t.mode == "eval":
    return
  rundir.check_resume(t.model_dir, flag_values)
  if is_chief:  # One training job per model_dir.
    lock = rundir.TrainingLock(t.model_dir)
    lock.acquire()
    atexit.register(lock.release)


def run(cfg, flag_values):
  """Trains and/or evaluates as `cfg.train.mode` says. Returns the final result dict or None."""
  _setup_runtime(cfg)
  from tf_simclr import datasets  # pylint: disable=g-import-not-at-top
  from tf_simclr import distill  # pylint: disable=g-import-not-at-top
  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
  from tf_simclr import evaluate  # pylint: disable=g-import-not-at-top
  from tf_simclr import rundir  # pylint: disable=g-import-not-at-top
  from tf_simclr import train as train_lib  # pylint: disable=g-import-not-at-top

  t = cfg.train
  strategy = distribute.make_strategy(
      cfg.runtime.strategy, cfg.runtime.cpu_replicas, use_tpu=cfg.runtime.use_tpu,
      tpu_name=cfg.runtime.tpu_name, tpu_zone=cfg.runtime.tpu_zone,
      gcp_project=cfg.runtime.gcp_project, master=cfg.runtime.master)
  replicas = strategy.num_replicas_in_sync
  logging.info("Strategy %s with %d replicas", type(strategy).__name__, replicas)
  train_lib.validate_batch(t.train_batch_size, replicas, "train_batch_size")
  train_lib.validate_batch(t.eval_batch_size, replicas, "eval_batch_size")
  is_chief = distribute.is_chief(strategy)
  _claim_model_dir(t, flag_values, is_chief)
  distribute.warn_slow_bfloat16(strategy, cfg.runtime.mixed_precision)

  train_source = datasets.load_source(cfg.data.dataset, cfg.data.train_split, cfg.data.data_dir)
  split = f"{cfg.data.dataset} split {cfg.data.train_split!r}"
  num_classes = train_source.num_classes  # 0: unlabeled
  wants_head = t.train_mode != "pretrain" or t.lineareval_while_pretraining
  if t.train_mode == "distill":
    # The teacher's classes are the student's; checked before anything is built.
    teacher = distill.teacher_config(t.teacher_checkpoint)
    if num_classes:
      distill.check_classes(teacher, num_classes, t.teacher_checkpoint)
    elif t.distill_label_weight > 0:
      raise ValueError(f"--distill_label_weight={t.distill_label_weight} needs labels, but "
                       f"{split} is unlabeled")
    num_classes = teacher.num_classes
  elif wants_head and num_classes == 0:
    if t.train_mode == "finetune":
      raise ValueError(f"train_mode=finetune needs labels, but {split} is unlabeled")
    logging.info("Unlabeled data: pretraining without the linear-evaluation head")
    wants_head = False
  if t.knn_eval_every_n_steps and train_source.num_classes == 0:
    raise ValueError(f"--knn_eval_every_n_steps needs labels, but {split} is unlabeled")
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, num_classes=num_classes if wants_head else 0))
  eval_source = None
  if (wants_head and t.mode != "train") or t.knn_eval_every_n_steps:
    # Image folders: the training split's classes decide the labels of every split.
    eval_source = datasets.load_source(cfg.data.dataset, cfg.data.eval_split, cfg.data.data_dir,
                                       class_names=train_source.class_names or None)
    if t.knn_eval_every_n_steps and eval_source.num_classes == 0:
      raise ValueError(f"--knn_eval_every_n_steps needs labels, but {cfg.data.dataset} split "
                       f"{cfg.data.eval_split!r} is unlabeled")
    if eval_source.num_classes == 0:  # Distilling on unlabeled images: nothing to score.
      logging.info("Unlabeled eval split %r: no evaluation", cfg.data.eval_split)
      eval_source = None

  # Few labels: fine-tuning trains on the subset; distillation on every image, with labels
  # (for --distill_label_weight) only on the subset. Not needed to evaluate, unless by kNN.
  ids, knn_bank = None, train_source
  if t.train_mode != "pretrain" and (t.mode != "eval" or t.knn_eval_every_n_steps):
    ids = datasets.label_subset(train_source, cfg.data.train_label_fraction,
                                cfg.data.train_label_file, seed=t.seed)
    if ids is not None:
      knn_bank = datasets.subset_source(train_source, ids)
      train_source = (knn_bank if t.train_mode == "finetune"
                      else distill.labels_only_for(train_source, ids))

  state = train_lib.build_state(cfg, strategy, train_source.num_examples, is_chief)
  if is_chief and t.mode != "eval":
    if t.train_mode != "pretrain":
      datasets.write_label_subset(t.model_dir, ids)  # Refuses another subset in model_dir.
    rundir.record_flags(t.model_dir, flag_values)  # Keeps a resumed run's flags.json.
  knn_sources = (knn_bank, eval_source) if t.knn_eval_every_n_steps else None

  if t.mode in ("train", "train_then_eval"):
    views = datasets.example_views(train_source, t.seed, cfg.data.image_size,
                                   cfg.data.color_jitter_strength, cfg.data.use_blur)
    step = train_lib.train(cfg, strategy, train_source, state, is_chief, views,
                           knn_sources=knn_sources)
    if step < state.total_steps:
      if state.stopped_by == "SIGINT":
        raise Interrupted(f"Interrupted: SIGINT stopped training at step {step} of "
                          f"{state.total_steps}, checkpoint saved in {t.model_dir}. Run the same "
                          "command to resume.")
      print(f"Preempted: SIGTERM stopped training at step {step} of {state.total_steps}, "
            f"checkpoint saved in {t.model_dir}. Run the same command to resume.")
      return None
    if t.mode == "train":
      print(f"Trained to step {step}. Checkpoints in {t.model_dir}")
      return None
    return _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief, knn_sources)

  # mode=eval, beside a training job: each new checkpoint once, until the last step.
  result = None
  for step, _ in evaluate.restored_checkpoints(
      state.checkpoint, t.model_dir, state.total_steps,
      step_of=lambda: state.optimizer.iterations.numpy(), timeout_secs=t.eval_timeout_s):
    result = _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief, knn_sources)
  return result


def _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief, knn_sources=None):
  """Top-1/top-5 of the supervised head (and the kNN monitor's figure), then the export."""
  from tf_simclr import evaluate  # pylint: disable=g-import-not-at-top
  from tf_simclr import knn  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  result = {}
  if eval_source is not None and state.model.supervised_head is not None:
    result = evaluate.evaluate(state.model, strategy, eval_source, cfg.train.eval_batch_size,
                               cfg.data.image_size, cfg.train.eval_steps,
                               cfg.optim.weight_decay, cfg.optim.optimizer)
  else:
    logging.info("No linear-evaluation head: skipping eval")
  if knn_sources is not None:
    # Computed once per step (the monitor may have run at this step); written below.
    result.update(knn.knn_monitor(cfg, strategy, state, knn_sources, step, is_chief))
  if is_chief and result:
    writer = tf.summary.create_file_writer(cfg.train.model_dir)
    evaluate.write_results(cfg.train.model_dir, result, step, writer)
    figures = [f"{name} {result[key]:.4f}" for name, key in (
        ("top-1", "eval/label_top_1_accuracy"), ("top-5", "eval/label_top_5_accuracy"),
        ("kNN top-1", "knn/top_1_accuracy")) if key in result]
    print(f"Step {step}: {', '.join(figures)} on {eval_source.name}/{eval_source.split}. "
          f"Results: {os.path.join(cfg.train.model_dir, 'result.json')}")
  if is_chief:
    try:
      target = _export(cfg, state.model, step)
    except FileExistsError:  # Written meanwhile by a job beside this one (train / eval).
      target = os.path.join(cfg.train.model_dir, "saved_model", str(step))
    print(f"SavedModel: {target}")
  return result or None


def _first_line(text):
  """The first informative line of a TensorFlow error message (not where the graph failed)."""
  for line in text.splitlines():
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line.strip())
    if line and not line.startswith(("Graph execution error", "Detected at node", "File ")):
      return line
  return ""


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  started = time.time()
  message = None
  try:
    flag_values = FLAGS.flag_values_dict()
    cfg = definitions.to_config(flag_values)
    run(cfg, flag_values)
  except (Interrupted, KeyboardInterrupt) as err:
    # 128 + SIGINT, as shells report a process that Ctrl-C ended.
    print(str(err) or "Interrupted: SIGINT before training began or after it ended; nothing "
          "to save. Run the same command to start again.", file=sys.stderr)
    sys.exit(130)
  except (ValueError, OSError) as err:
    if os.environ.get("TF_SIMCLR_TRACEBACK"):
      raise
    message = f"error: {err}"
  except Exception as err:  # TensorFlow's errors (disk full, permissions) are not ValueErrors.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not isinstance(err, tf.errors.OpError) or os.environ.get("TF_SIMCLR_TRACEBACK"):
      raise
    message = f"error: {type(err).__name__}: {_first_line(err.message)}"
    lost_peer = (tf.errors.UnavailableError, tf.errors.AbortedError,
                 tf.errors.DeadlineExceededError, tf.errors.CancelledError)
    if FLAGS.strategy == "multi_worker" and isinstance(err, lost_peer):
      # What the other workers see when one dies: its connections reset, or the coordination
      # service misses its heartbeats (10 s) and aborts every collective.
      message = (f"error: lost contact with another worker of the cluster ({message[7:]}); "
                 "restart every worker with the same command to resume from the last "
                 "checkpoint")
  if message is not None:
    # Leaving the except block freed the traceback; half-restored checkpoint objects it held
    # log warnings when collected. Let that happen first, so the error is the last line.
    gc.collect()
    print(message, file=sys.stderr)
    sys.exit(1)
  logging.info("Done in %.1f s", time.time() - started)


if __name__ == "__main__":
  app.run(main)
