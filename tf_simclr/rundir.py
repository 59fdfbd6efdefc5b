"""A model_dir belongs to one run: its settings (`flags.json`) and its training lock.

* `check_resume`: a model_dir that holds checkpoints is resumed only by a run with the same
  run-defining settings (`RUN_DEFINING`): another train mode, model, dataset or optimisation
  would reuse (and prune) checkpoints that mean something else. Refused with one line.
* `check_eval`: an evaluation (`--mode=eval`) must give the run's `EVAL_DEFINING` settings,
  those that decide what its checkpoints compute (and what an export's manifest says).
* `record_flags`: `flags.json` is written once, by the run that starts the model_dir; a resume
  that changed other settings (`--train_steps` to extend, an eval batch size) writes what
  changed beside it, in `flags_resumed_<time>.json` (run.py: once the resumed run has written
  its first checkpoint, so a resume that failed at once leaves no record).
* `TrainingLock`: one training job per model_dir. `model_dir/train.lock` records host and pid;
  it is an advisory `flock` on local disks (and NFS), which the kernel releases when the process
  ends however it ends, so a crashed run's lock is taken over by the next. Object stores (gs://)
  have no locks: there the model_dir is not protected. Evaluation (`--mode=eval`) takes no lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket

from absl import logging
import tensorflow as tf

from tf_simclr import config

FLAGS_FILE = "flags.json"
LOCK_FILE = "train.lock"

# Settings that decide what the checkpoints of a model_dir are: resuming with another value
# would continue another run's weights and optimizer state as if they were this run's.
# Every other setting may change on resume (train_steps / train_epochs to extend, batch sizes of
# evaluation, checkpoint frequency and retention, data_dir, devices, mixed precision, kNN
# monitor, eval split).
RUN_DEFINING = (
  "train_mode",
  "dataset",
  "train_split",
  "image_size",
  "resnet_depth",
  "width_multiplier",
  "sk_ratio",
  "se_ratio",
  "batch_norm_decay",
  "global_bn",
  "proj_head_mode",
  "proj_out_dim",
  "num_proj_layers",
  "ft_proj_selector",
  "lineareval_while_pretraining",
  "fine_tune_after_block",
  "zero_init_logits_layer",
  "checkpoint",
  "teacher_checkpoint",
  "optimizer",
  "learning_rate",
  "learning_rate_scaling",
  "warmup_epochs",
  "weight_decay",
  "momentum",
  "temperature",
  "hidden_norm",
  "train_batch_size",
  "seed",
  "color_jitter_strength",
  "use_blur",
  "min_scale",
  "horizontal_flip",
  "crop_interpolation",
  "train_label_fraction",
  "train_label_file",
  "distill_temperature",
  "distill_label_weight",
)
# Needed only to start a run: leaving it out when resuming is not a change.
_START_ONLY = ("checkpoint",)
# The run-defining settings that decide what a checkpoint computes, and what its export's
# manifest records: an evaluation (`--mode=eval`) must give the run's values. The others
# (optimisation, training data and augmentation, initialisation, global_bn and
# fine_tune_after_block, which the export twin resets) only shape how the weights were found.
EVAL_DEFINING = ("train_mode", "dataset", *config.MODEL_DEFINING, "lineareval_while_pretraining")


class ModelDirError(ValueError):
  """The model_dir belongs to another run, or is in use; the message is one line."""


def _json_values(values: dict) -> dict:
  """The JSON-serialisable entries of `values`, as they read back from JSON."""
  out = {}
  for key, value in values.items():
    try:
      out[key] = json.loads(json.dumps(value))
    except (TypeError, ValueError):
      continue
  return out


def _has_checkpoint(model_dir: str) -> bool:
  return tf.train.get_checkpoint_state(model_dir) is not None or bool(
    tf.io.gfile.glob(os.path.join(model_dir, "ckpt-*.index"))
  )


def _read_flags(model_dir: str) -> dict | None:
  path = os.path.join(model_dir, FLAGS_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      flags = json.load(f)
  except (ValueError, UnicodeDecodeError):
    raise ModelDirError(f"{path} is not valid JSON; restore it, or use a new --model_dir") from None
  return flags if isinstance(flags, dict) else None


def run_differences(
  before: dict, now: dict, keys: tuple = RUN_DEFINING
) -> list[tuple[str, object, object]]:
  """[(setting, value in `before`, value in `now`)] of the settings `keys` that differ.

  Settings missing from either (older flags.json) are not compared.
  """
  now = _json_values(now)
  out = []
  for key in keys:
    if key not in before or key not in now:
      continue
    if key in _START_ONLY and now[key] is None:
      continue
    if before[key] != now[key]:
      out.append((key, before[key], now[key]))
  return out


def check_resume(model_dir: str, values: dict) -> bool:
  """Refuses to resume a model_dir whose checkpoints belong to a run with other settings.

  Reads only. Returns whether model_dir holds a checkpoint (a resume).

  Raises:
    ModelDirError: model_dir holds checkpoints and a flags.json whose run-defining settings
      differ from `values`; the message names the differences.
  """
  if not tf.io.gfile.isdir(model_dir) or not _has_checkpoint(model_dir):
    return False
  before = _read_flags(model_dir)
  if before is None:
    return True
  diffs = run_differences(before, values)
  if diffs:
    raise ModelDirError(
      f"{_another_run(model_dir, diffs)}: a model_dir belongs to one run. Use a new "
      f"--model_dir (e.g. with --checkpoint={model_dir} to start from it), or that run's "
      f"settings ({os.path.join(model_dir, FLAGS_FILE)}) to resume it"
    )
  return True


def _another_run(model_dir: str, diffs: list) -> str:
  shown = "; ".join(f"--{k}={a} there, {b} here" for k, a, b in diffs[:4])
  more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
  return f"{model_dir} holds the checkpoints of another run ({shown}{more})"


def check_eval(model_dir: str, values: dict) -> None:
  """Refuses to evaluate the checkpoints of `model_dir` as another model than the run's.

  Reads only; nothing to compare (no flags.json yet: the training job has not started) passes,
  and is checked again before each checkpoint is restored (`evaluate.restored_checkpoints`).

  Raises:
    ModelDirError: flags.json's `EVAL_DEFINING` settings differ from `values`; the message
      names the differences, as `check_resume`'s does.
  """
  before = _read_flags(model_dir) if tf.io.gfile.isdir(model_dir) else None
  diffs = run_differences(before, values, EVAL_DEFINING) if before is not None else []
  if diffs:
    raise ModelDirError(
      f"{_another_run(model_dir, diffs)}: --mode=eval evaluates them as the run that wrote "
      f"them. Give that run's settings ({os.path.join(model_dir, FLAGS_FILE)})"
    )


def record_flags(model_dir: str, values: dict) -> str | None:
  """Writes `flags.json` for a new run; for a resume, what changed beside it. Returns the path.

  A model_dir without checkpoints is a new run (a flags.json of a run that stopped before its
  first checkpoint is replaced). A resume keeps flags.json as it is and writes the settings
  that differ, `{setting: {"before": value, "now": value}}`, to `flags_resumed_<UTC time>.json`
  (nothing when none differ).
  """
  now = _json_values(values)
  tf.io.gfile.makedirs(model_dir)
  before = _read_flags(model_dir) if _has_checkpoint(model_dir) else None
  if before is None:
    path = os.path.join(model_dir, FLAGS_FILE)
    content = now
  else:
    changed = {
      k: {"before": before.get(k), "now": now.get(k)}
      for k in sorted(set(before) | set(now))
      if before.get(k) != now.get(k)
    }
    if not changed:
      return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(model_dir, f"flags_resumed_{stamp}.json")
    content = changed
    logging.info("Resuming with changed settings %s (recorded in %s)", sorted(changed), path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with tf.io.gfile.GFile(tmp, "w") as f:
    json.dump(content, f, indent=1, sort_keys=True)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def _is_local(path: str) -> bool:
  return "://" not in path


class TrainingLock:
  """`model_dir/train.lock`: held by one training process at a time (see the module docstring).

  `acquire` raises ModelDirError, naming the holder's host and pid, when another process holds
  it; `release` (also on leaving the `with` block) removes the file, and the model_dir itself
  when `acquire` created it and it is still empty.
  """

  def __init__(self, model_dir: str):
    self.model_dir = model_dir
    self.path = os.path.join(model_dir, LOCK_FILE)
    self._fd = None
    self._created_dir = False

  def __enter__(self) -> "TrainingLock":
    self.acquire()
    return self

  def __exit__(self, *unused_exc_info):
    self.release()

  def _holder(self, fd) -> str:
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
      info = {}
    if not info:
      return "another process"
    return f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('started')}"

  def acquire(self) -> None:
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)

    if not _is_local(self.model_dir):
      logging.warning(
        "%s is not on a local disk: no lock keeps a second training job out of it", self.model_dir
      )
      return
    try:
      self._created_dir = not os.path.isdir(self.model_dir)
      os.makedirs(self.model_dir, exist_ok=True)
    except OSError as err:
      reason = os.strerror(err.errno).lower() if err.errno else str(err)
      raise OSError(f"cannot use --model_dir={self.model_dir}: {reason}") from None
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as err:
        holder = self._holder(fd)
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
          raise
        raise ModelDirError(
          f"{self.model_dir} is in use by another training run ({holder}; lock file "
          f"{self.path}): wait for it to end or stop it, or use another --model_dir "
          "(--mode=eval beside it is fine)"
        ) from None
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)  # Removed by its holder between our open and lock: lock the new file.
    previous = os.pread(fd, 4096, 0)
    if previous:
      logging.warning("Taking over %s from a run that is gone (%s)", self.path, self._holder(fd))
    info = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)  # While still locked: a waiting process then re-checks the inode.
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None
    if self._created_dir:
      try:
        os.rmdir(self.model_dir)  # Only when empty: this run wrote nothing else.
      except OSError:
        pass
