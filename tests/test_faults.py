"""Faults a long run meets, end to end: SIGTERM, SIGKILL at three moments, a damaged newest
checkpoint, a full disk, an unwritable model_dir; Ctrl-C, a second trainer, another run's
model_dir.

One run is interrupted again and again in one model_dir and then finishes; with --deterministic
its final weights must equal, bit for bit, those of an uninterrupted run. Processes run in
their own process groups with deadlines (tests/runs.py).
"""

import os
import signal
import sys

import numpy as np
import pytest
import tensorflow as tf

import runs
from runs import COMMON
from runs import assert_one_line_error
from runs import model_variables

pytestmark = pytest.mark.slow

ARGS = COMMON + ["--train_steps=12", "--checkpoint_steps=4", "--mode=train", "--cpu_replicas=1"]
# The interrupted run is wider than runs.COMMON's 0.125: at width 0.5 its 23 MB checkpoints
# take a while to write, the window in which it is killed mid-write, and exceed the full disk's
# 16 MB. (Width 1's 90 MB cost each process 3-8 CPU s more in writes and start-up.)
WIDE = [a for a in ARGS if not a.startswith("--width_multiplier=")] + ["--width_multiplier=0.5"]
# A file-size limit stands in for a full disk: a checkpoint (23 MB at width 0.5) fails to write
# with EFBIG ("File too large"), the logs and events (kilobytes) do not.
FULL_DISK = [
  sys.executable,
  "-c",
  "import os, resource, sys; "
  "resource.setrlimit(resource.RLIMIT_FSIZE, (2**24, 2**24)); "
  "os.execv(sys.argv[1], sys.argv[1:])",
]
# Ctrl-C reaches a process only if its parent did not ignore SIGINT (a test runner may).
CTRL_C_ABLE = [
  sys.executable,
  "-c",
  "import os, signal, sys; "
  "signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
]


def _newest(model_dir):
  """The step of the newest checkpoint the `checkpoint` index lists (None: no index)."""
  state = tf.train.get_checkpoint_state(model_dir)
  return None if state is None else int(state.model_checkpoint_path.rsplit("-", 1)[1])


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_interrupted_run_resumes_to_the_uninterrupted_weights(data_dir, tmp_path):
  whole, d = str(tmp_path / "whole"), str(tmp_path / "interrupted")
  args = WIDE + [f"--data_dir={data_dir}"]
  with runs.Processes(tmp_path, runs.env()) as procs:
    procs.start("whole", args + [f"--model_dir={whole}"])

    # 1. SIGTERM during the first step: exit 0, a checkpoint at the step reached (between the
    # regular ones at 4, 8, 12), and a line that says so.
    procs.start("sigterm", args + [f"--model_dir={d}"])
    procs.wait_for_log("sigterm", "Training from step 0")
    procs.signal("sigterm", signal.SIGTERM)
    status, out, err = procs.finish("sigterm")
    assert status == 0, err[-3000:]
    assert "Preempted: SIGTERM stopped training at step 1 of 12" in out, out
    assert _newest(d) == 1

    # 2. SIGKILL between checkpoints: resumed from 1, killed once ckpt-4 is in the index.
    procs.start("kill_training", args + [f"--model_dir={d}"])
    procs.wait_until("kill_training", lambda: _newest(d) == 4, "ckpt-4", interval=0.005)
    procs.signal("kill_training", signal.SIGKILL)
    procs.finish("kill_training")

    # 3. SIGKILL while ckpt-8 is being written: the index still names ckpt-4.
    procs.start("kill_writing", args + [f"--model_dir={d}"])
    procs.wait_until(
      "kill_writing",
      lambda: os.path.exists(os.path.join(d, "ckpt-8_temp")),
      "ckpt-8_temp",
      interval=0.001,
    )
    procs.signal("kill_writing", signal.SIGKILL)
    procs.finish("kill_writing")
    assert _newest(d) == 4, "the kill came after the write had completed"

    # 4. SIGKILL at start-up, right after the restore.
    procs.start("kill_starting", args + [f"--model_dir={d}"])
    procs.wait_for_log("kill_starting", "Restored")
    procs.signal("kill_starting", signal.SIGKILL)
    procs.finish("kill_starting")
    assert _newest(d) == 4

    # The newest checkpoint's bytes are lost (as a power cut can leave a file): truncated.
    data4 = os.path.join(d, "ckpt-4.data-00000-of-00001")
    with open(data4, "r+b") as f:
      f.truncate(100)
    kept = {
      f: _read(os.path.join(d, f))
      for f in ("checkpoint", "ckpt-1.index", "ckpt-1.data-00000-of-00001")
    }

    # 5. A full disk: resumes from ckpt-1 (ckpt-4 is set aside), trains to 4, cannot save it.
    procs.start("full_disk", args + [f"--model_dir={d}"], prefix=FULL_DISK)
    full_disk = procs.finish("full_disk")
    assert_one_line_error(
      full_disk,
      ["cannot write checkpoint", "ckpt-4", "File too large", "earlier checkpoints are intact"],
    )
    assert "ckpt-4 is unreadable" in full_disk.stderr
    for f, content in kept.items():
      assert _read(os.path.join(d, f)) == content, f
    assert os.path.exists(data4 + ".corrupt-0")

    # 6. The same command finishes the run.
    procs.start("finish", args + [f"--model_dir={d}"])
    status, _, err = procs.finish("finish")
    assert status == 0, err[-3000:]
    status, _, err = procs.finish("whole")
    assert status == 0, err[-3000:]

  assert _newest(d) == 12
  assert not [f for f in os.listdir(d) if f.endswith("_temp")], os.listdir(d)
  a = model_variables(os.path.join(whole, "ckpt-12"))
  b = model_variables(os.path.join(d, "ckpt-12"))
  assert len(a) > 150 and a.keys() == b.keys()
  for k in a:  # --deterministic: bit for bit
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)


def test_unwritable_model_dir_is_one_line(data_dir, tmp_path):
  # Under a regular file: unwritable for root too (unlike a chmod).
  (tmp_path / "a_file").write_text("")
  with runs.Processes(tmp_path, runs.env()) as procs:
    procs.start(
      "run", ARGS + [f"--data_dir={data_dir}", f"--model_dir={tmp_path / 'a_file' / 'model'}"]
    )
    result = procs.finish("run")
  assert_one_line_error(result, ["a_file", "not a directory"])


# Far more steps than the run makes before its Ctrl-C: at width 0.125 a loaded machine finished
# 1,000 steps (45 s) before the second trainer had been refused.
LONG = 1_000_000


def test_model_dir_is_one_runs_and_ctrl_c_saves_a_checkpoint(data_dir, tmp_path):
  d = str(tmp_path / "m")
  args = COMMON + [
    f"--train_steps={LONG}",
    f"--checkpoint_steps={LONG}",
    "--mode=train",
    "--cpu_replicas=1",
    f"--data_dir={data_dir}",
    f"--model_dir={d}",
  ]
  with runs.Processes(tmp_path, runs.env()) as procs:
    procs.start("first", args, prefix=CTRL_C_ABLE)
    procs.wait_for_log("first", "Training from step 0")
    flags_json = _read(os.path.join(d, "flags.json"))
    # A second trainer on the same model_dir: refused by the lock (an eval job would not be).
    procs.start("second", args)
    second = procs.finish("second")
    assert_one_line_error(
      second, ["in use by another training run", f"pid {procs.pid('first')} on host"]
    )
    # Ctrl-C: a checkpoint at the step reached, one line, exit status 130.
    procs.signal("first", signal.SIGINT)
    status, _, err = procs.finish("first")
    assert status == 130 and "Traceback" not in err, (status, err[-3000:])
    step = _newest(d)
    assert step is not None and 1 <= step < LONG
    assert err.strip().splitlines()[-1] == (
      f"Interrupted: SIGINT stopped training at step {step} of {LONG}, checkpoint saved in {d}. "
      "Run the same command to resume."
    )
    assert not os.path.exists(os.path.join(d, "train.lock"))
    # Fine-tuning in this pretraining run's model_dir: refused, nothing changed.
    before = {f: _read(os.path.join(d, f)) for f in os.listdir(d)}
    procs.start("finetune", args + ["--train_mode=finetune", f"--checkpoint={d}"])
    finetune = procs.finish("finetune")
  assert_one_line_error(finetune, ["--train_mode=pretrain there, finetune here", "new --model_dir"])
  assert {f: _read(os.path.join(d, f)) for f in os.listdir(d)} == before
  assert before["flags.json"] == flags_json
