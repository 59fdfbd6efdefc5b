"""Top-1/top-5 evaluation of the supervised head over a whole split, and result files.

Eval batches are padded to a static shape with mask-0 examples (`pipeline.eval_dataset`), so
every replica runs the same number of steps and the counts are exact on any strategy.
`restored_checkpoints` drives continuous evaluation beside a training job.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time

from absl import logging
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import distribute
from tf_simclr import errors
from tf_simclr import optimizers
from tf_simclr.data import pipeline
from tf_simclr.data import sources


class NonFiniteOutputError(ValueError):
  """The model's forward pass gives NaN or inf on the evaluated data (its figures mean nothing)."""


def check_finite_outputs(what: str, bad: float, count: float, split: str, step=None) -> None:
  """Raises NonFiniteOutputError when `bad` of the `count` examples of `split` gave non-finite
  `what` (e.g. "logits"); `step` is the checkpoint's, named in the message."""
  if bad == 0:
    return
  at = f" at step {step}" if step is not None else ""
  raise NonFiniteOutputError(
    f"the model's {what} are not finite (NaN or inf){at} on {int(bad)} of {int(count)} "
    f"examples of {split}, although its weights are: its forward pass overflows, so "
    "evaluation stopped (no result, no export). Train with a lower --learning_rate"
  )


def evaluate(
  model,
  strategy: tf.distribute.Strategy,
  source: sources.Source,
  eval_batch_size: int,
  image_size: int,
  eval_steps: int = 0,
  weight_decay: float = 0.0,
  optimizer_name: str = "lars",
  step: int | None = None,
) -> dict:
  """Runs the supervised head over `source`; returns the reference's metric names.

  Args:
    model: a built SimCLRModel with a supervised head.
    eval_batch_size: global batch size (a multiple of the number of replicas).
    eval_steps: stop after this many global batches (0: the whole split).
    step: the evaluated checkpoint's step, for messages.
  Returns:
    {'eval/label_top_1_accuracy', 'eval/label_top_5_accuracy', 'eval/regularization_loss',
     'eval/num_examples'}: Python floats.
  Raises:
    NonFiniteOutputError: logits [b, C] not finite on an example (argmax and top-k of NaN
      give figures that mean nothing).
  """
  num_classes = model.config.num_classes
  top_k = min(5, num_classes)

  make_dataset = functools.partial(
    pipeline.eval_dataset, source, image_size=image_size, global_batch_size=eval_batch_size
  )
  dist = distribute.distribute_input(strategy, eval_batch_size, make_dataset, "eval_batch_size")

  def replica_step(batch):
    logits = model(batch["image"], training=False)["logits_sup"]
    labels = tf.cast(batch["label"], tf.int32)
    mask = batch["mask"]
    top1 = tf.cast(tf.equal(tf.argmax(logits, 1, output_type=tf.int32), labels), tf.float32)
    top5 = tf.cast(tf.nn.in_top_k(labels, logits, top_k), tf.float32)
    finite = tf.reduce_all(tf.math.is_finite(tf.cast(logits, tf.float32)), axis=1)
    bad = (1.0 - tf.cast(finite, tf.float32)) * mask
    return tf.stack(
      [tf.reduce_sum(top1 * mask), tf.reduce_sum(top5 * mask), tf.reduce_sum(mask)]
      + [tf.reduce_sum(bad)]
    )

  @tf.function(autograph=False)
  def eval_step(batch):
    return strategy.reduce(
      tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(batch,)), axis=None
    )

  totals = tf.zeros([4])
  for i, batch in enumerate(dist):
    if eval_steps and i >= eval_steps:
      break
    totals += eval_step(batch)
  top1, top5, count, bad = (float(v) for v in totals.numpy())
  check_finite_outputs("logits", bad, count, f"{source.name}/{source.split}", step)
  reg = float(
    optimizers.explicit_weight_decay(model.trainable_variables, weight_decay, optimizer_name)
  )
  if count == 0:
    raise ValueError(f"the eval split {source.split!r} of {source.name} has no examples")
  return {
    "eval/label_top_1_accuracy": top1 / count,
    "eval/label_top_5_accuracy": top5 / count,
    "eval/regularization_loss": reg,
    "eval/num_examples": count,
  }


def write_results(model_dir: str, result: dict, step: int, writer=None, merge: bool = False) -> str:
  """Writes `result.json` and `result_<step>.json` (and summaries); returns the first path.

  With `merge`, a file's entries of the same step are kept and `result`'s added or updated
  (the kNN monitor and the evaluation of one step share the files); entries of another step
  are replaced.
  """
  # Strict JSON: a figure that is not finite (a diverged model) is written as null.
  payload = {k: float(v) if math.isfinite(float(v)) else None for k, v in result.items()}
  payload["global_step"] = int(step)
  tf.io.gfile.makedirs(model_dir)
  paths = [
    os.path.join(model_dir, "result.json"),
    os.path.join(model_dir, f"result_{int(step)}.json"),
  ]
  for path in paths:
    content = dict(payload)
    if merge and tf.io.gfile.exists(path):
      with tf.io.gfile.GFile(path) as f:
        existing = json.load(f)
      if existing.get("global_step") == int(step):
        content = dict(existing, **payload)
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
      json.dump(content, f, indent=1, sort_keys=True, allow_nan=False)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  if writer is not None:
    with writer.as_default(step=int(step)):
      for k, v in result.items():
        tf.summary.scalar(k, v)
    writer.flush()
  logging.info("Eval at step %d: %s", step, json.dumps(payload, sort_keys=True))
  return paths[0]


_CKPT_NUMBER = re.compile(r"-([0-9]+)$")


def restored_checkpoints(
  checkpoint: tf.train.Checkpoint,
  model_dir: str,
  last_step: int,
  step_of=None,
  poll_secs: float = 5.0,
  timeout_secs: float = 0.0,
  check=None,
):
  """Restores each new checkpoint of `model_dir` into `checkpoint` and yields its step.

  For evaluating beside a training job: every checkpoint the `checkpoint` index lists, oldest
  first, each once (never one older than the last yielded), waiting `poll_secs` between looks
  for new ones. A checkpoint that cannot be restored when its turn comes is skipped with a log
  line if a newer one is listed (pruned by the training job's `keep_checkpoint_max` between
  listing and restore); the newest listed is looked at again a poll later, up to
  `_RESTORE_TRIES` times (it may be being written). Every object of `checkpoint` must be
  restored (values of the file it lacks, e.g. optimizer slots, are ignored). Stops after
  yielding a step >= `last_step`.

  Args:
    checkpoint: the tf.train.Checkpoint to restore into (e.g. `Checkpoint(model=model)`).
    model_dir: the training job's directory.
    last_step: the training job's final step.
    step_of: () -> int, the restored step (default: the number in the checkpoint's name).
    poll_secs: seconds between looks at the index.
    timeout_secs: stop when no new checkpoint came for this long (0: wait without limit, as
      the reference does); the wait is logged.
    check: () -> None, called before each restore; raises to stop (e.g. `rundir.check_eval`:
      the training job may have written its flags.json after the evaluation began).

  Yields:
    (step, path) after each successful restore.

  Raises:
    ValueError: no checkpoint at all came within `timeout_secs`, or the run's last checkpoint
      (`last_step`) could not be restored.
    checkpoints.CheckpointMismatchError: a checkpoint lacks an object of `checkpoint`, or
      holds one of another shape (another model).
  """
  last_number, waiting_since, yielded, failures = -1, None, False, 0
  while True:
    fresh = [(n, p) for n, p in _listed(model_dir) if n > last_number]
    retry = False
    for number, path in fresh:
      if check is not None:
        check()
      try:
        checkpoints.restore_all(checkpoint, path)
      except checkpoints.READ_ERRORS as err:
        # Still the newest listed: being written or replaced (look again), unless it keeps
        # failing. Older ones are skipped: the training job's keep_checkpoint_max prunes them.
        newest = number == max(n for n, _ in _listed(model_dir) or [(number, path)])
        failures += 1
        if newest and failures <= _RESTORE_TRIES:
          logging.info(
            "Checkpoint %s not restorable yet (%s): looking again", path, errors.first_line(err)
          )
          retry = True
          break
        _skip(path, err, number, last_step)
        last_number, failures = number, 0
        continue
      last_number, failures = number, 0
      step = int(step_of()) if step_of is not None else number
      logging.info("Evaluating checkpoint %s (step %d)", path, step)
      yield step, path
      yielded, waiting_since = True, None
      if step >= last_step:
        return
    if fresh and not retry:
      continue  # The restores took time: look again before waiting.
    waiting_since = _waiting(model_dir, last_step, timeout_secs, waiting_since, yielded)
    if waiting_since is None:
      return
    time.sleep(poll_secs)


# Looks at a checkpoint that fails to restore while it is the newest listed, a poll apart.
_RESTORE_TRIES = 3


def _listed(model_dir):
  """[(number, path)] of the checkpoints the `checkpoint` index of `model_dir` lists, oldest
  first."""
  state = tf.train.get_checkpoint_state(model_dir)
  listed = list(state.all_model_checkpoint_paths) if state is not None else []
  return sorted((int(m.group(1)), p) for p in listed if (m := _CKPT_NUMBER.search(p)) is not None)


def _skip(path, err, number, last_step):
  """Logs a checkpoint that could not be restored; the run's last one ends the evaluation."""
  if number >= last_step:  # no newer checkpoint will come: waiting would never end
    raise ValueError(
      f"the run's last checkpoint {path} could not be restored ({type(err).__name__}: "
      f"{errors.first_line(err)[:200]})"
    )
  logging.warning(
    "Skipping checkpoint %s: it could not be restored (%s: %s; pruned by the training job?)",
    path,
    type(err).__name__,
    errors.first_line(err)[:200],
  )


def _waiting(model_dir, last_step, timeout_secs, since, yielded):
  """Logs the start of a wait for a checkpoint; returns its start, or None when it timed out."""
  now = time.monotonic()
  if since is None:
    limit = f"up to {timeout_secs:g} s" if timeout_secs else "without a time limit"
    logging.info(
      "Waiting for %s checkpoint in %s (%s; --eval_timeout_s), until step %d",
      "a new" if yielded else "a",
      model_dir,
      limit,
      last_step,
    )
    return now
  if timeout_secs and now - since >= timeout_secs:
    if not yielded:
      raise ValueError(
        f"no checkpoint appeared in {model_dir} within --eval_timeout_s="
        f"{timeout_secs:g} s; is it the training job's --model_dir?"
      )
    logging.warning(
      "No new checkpoint in %s for %g s (--eval_timeout_s): evaluation ends before step %d",
      model_dir,
      timeout_secs,
      last_step,
    )
    return None
  return since
