"""tf_simclr's entry point: `python run.py --mode=train_then_eval ...` (flags as the reference).

Parses flags into a RunConfig and calls the library. Bad input ends with one line on stderr and
exit status 1; set TF_SIMCLR_TRACEBACK=1 to see the traceback instead.
"""
from __future__ import annotations

import dataclasses
import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402
from absl import logging  # noqa: E402

from flags import definitions  # noqa: E402  (defines the flags)

FLAGS = definitions.FLAGS


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
  export.export_saved_model(model, target, weight_decay=cfg.optim.weight_decay,
                            optimizer_name=cfg.optim.optimizer)
  export.prune_exports(parent, cfg.train.keep_hub_module_max)
  return target


def run(cfg, flag_values):
  """Trains and/or evaluates as `cfg.train.mode` says. Returns the final result dict or None."""
  _setup_runtime(cfg)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tf_simclr import datasets  # pylint: disable=g-import-not-at-top
  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
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
  is_chief = _is_chief(strategy)

  train_source = datasets.load_source(cfg.data.dataset, cfg.data.train_split, cfg.data.data_dir)
  wants_head = t.train_mode == "finetune" or t.lineareval_while_pretraining
  if wants_head and train_source.num_classes == 0:
    if t.train_mode == "finetune":
      raise ValueError(f"train_mode=finetune needs labels, but {cfg.data.dataset} split "
                       f"{cfg.data.train_split!r} is unlabeled")
    logging.info("Unlabeled data: pretraining without the linear-evaluation head")
    wants_head = False
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(
      cfg.model, num_classes=train_source.num_classes if wants_head else 0))
  eval_source = (datasets.load_source(cfg.data.dataset, cfg.data.eval_split, cfg.data.data_dir)
                 if wants_head and t.mode != "train" else None)

  state = train_lib.build_state(cfg, strategy, train_source.num_examples, is_chief)
  if is_chief:
    train_lib.write_flags_json(t.model_dir, flag_values)

  if t.mode in ("train", "train_then_eval"):
    views = datasets.example_views(train_source, t.seed, cfg.data.image_size,
                                   cfg.data.color_jitter_strength, cfg.data.use_blur)
    step = train_lib.train(cfg, strategy, train_source, state, is_chief, views)
    if t.mode == "train":
      print(f"Trained to step {step}. Checkpoints in {t.model_dir}")
      return None
    return _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief)

  # mode=eval: evaluate each new checkpoint until the last step.
  result = None
  for path in tf.train.checkpoints_iterator(t.model_dir, min_interval_secs=5, timeout=None):
    state.checkpoint.restore(path).expect_partial()
    step = int(state.optimizer.iterations.numpy())
    result = _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief)
    if step >= state.total_steps:
      break
  return result


def _is_chief(strategy):
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "task_type", None):
    return True
  return resolver.task_type == "chief" or (resolver.task_type == "worker"
                                           and resolver.task_id == 0)


def _evaluate_and_export(cfg, strategy, state, eval_source, step, is_chief):
  from tf_simclr import evaluate  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  result = None
  if eval_source is not None:
    result = evaluate.evaluate(state.model, strategy, eval_source, cfg.train.eval_batch_size,
                               cfg.data.image_size, cfg.train.eval_steps,
                               cfg.optim.weight_decay, cfg.optim.optimizer)
    if is_chief:
      writer = tf.summary.create_file_writer(cfg.train.model_dir)
      evaluate.write_results(cfg.train.model_dir, result, step, writer)
      print(f"Step {step}: top-1 {result['eval/label_top_1_accuracy']:.4f}, top-5 "
            f"{result['eval/label_top_5_accuracy']:.4f} on {eval_source.name}/"
            f"{eval_source.split} ({int(result['eval/num_examples'])} examples). Results: "
            f"{os.path.join(cfg.train.model_dir, 'result.json')}")
  else:
    logging.info("No linear-evaluation head: skipping eval")
  if is_chief:
    target = _export(cfg, state.model, step)
    print(f"SavedModel: {target}")
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Too many command-line arguments: {argv[1:]}")
  started = time.time()
  message = None
  try:
    flag_values = FLAGS.flag_values_dict()
    cfg = definitions.to_config(flag_values)
    run(cfg, flag_values)
  except (ValueError, OSError) as err:
    if os.environ.get("TF_SIMCLR_TRACEBACK"):
      raise
    message = f"error: {err}"
  except Exception as err:  # TensorFlow's errors (disk full, permissions) are not ValueErrors.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    if not isinstance(err, tf.errors.OpError) or os.environ.get("TF_SIMCLR_TRACEBACK"):
      raise
    message = f"error: {type(err).__name__}: {err.message.splitlines()[0]}"
  if message is not None:
    # Leaving the except block freed the traceback; half-restored checkpoint objects it held
    # log warnings when collected. Let that happen first, so the error is the last line.
    gc.collect()
    print(message, file=sys.stderr)
    sys.exit(1)
  logging.info("Done in %.1f s", time.time() - started)


if __name__ == "__main__":
  app.run(main)
