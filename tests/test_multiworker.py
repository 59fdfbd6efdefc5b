"""Multi-worker training: two run.py processes on 127.0.0.1, as two hosts would run them.

Each worker is a MultiWorkerMirroredStrategy task told the cluster by TF_CONFIG, with one CPU
replica. With --deterministic the pair must train the weights of one process with two CPU
replicas at the same global batch: each worker's input pipeline keeps its half of every global
batch. Every process has a deadline and is killed on failure (tests/runs.py), so no test hangs
on a worker waiting for a dead peer.
"""

import json
import os
import signal

import numpy as np
import pytest

import runs
from runs import COMMON
from runs import global_relative
from runs import model_variables

pytestmark = pytest.mark.slow

ARGS = COMMON + ["--train_steps=3", "--checkpoint_steps=3"]


def _start_workers(procs, name, args):
  """Starts workers `<name>0` (the chief) and `<name>1` of a new two-worker cluster."""
  hosts = [f"127.0.0.1:{port}" for port in runs.free_ports(2)]
  for i in range(2):
    tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}
    procs.start(
      f"{name}{i}", args + ["--strategy=multi_worker"], env={"TF_CONFIG": json.dumps(tf_config)}
    )


def _events_pids(model_dir):
  """Process ids in the names of the TensorBoard event files (`...tfevents.<t>.<host>.<pid>...`)."""
  return {int(f.split(".")[-3]) for f in os.listdir(model_dir) if ".tfevents." in f}


# xdist_group: one pytest-xdist worker runs every user of the session fixture `replica_runs`,
# so that its runs are made once (conftest.py).
@pytest.mark.xdist_group("replica_runs")
def test_two_workers_match_two_replicas_through_a_preemption(data_dir, replica_runs, tmp_path):
  """SIGTERM to one worker stops both at one step; resumed, they equal 2 replicas in 1 process."""
  model_dir = str(tmp_path / "workers")
  # The reference: test_run_e2e's 3-step run with --cpu_replicas=2 (same flags, one process).
  ref_dir = replica_runs[2][0]
  args = ARGS + [f"--data_dir={data_dir}", f"--model_dir={model_dir}"]
  with runs.Processes(tmp_path, runs.env()) as procs:
    _start_workers(procs, "first", args + ["--mode=train"])
    procs.wait_for_log("first1", "Training from step 0")
    procs.signal("first1", signal.SIGTERM)  # the non-chief alone, during the first step
    first = {name: procs.finish(name) for name in ("first0", "first1")}
    # The same command resumes, then evaluates: the chief alone writes results and the export.
    _start_workers(procs, "second", args + ["--mode=train_then_eval"])
    second = {name: procs.finish(name) for name in ("second0", "second1")}
    chief_pids = {procs.pid("first0"), procs.pid("second0")}
  for name, (status, out, err) in {**first, **second}.items():
    assert status == 0, (name, err[-3000:])
  for name, (_, out, _) in first.items():
    assert "Preempted: SIGTERM stopped training at step 1 of 3" in out, (name, out)
  assert "SavedModel:" in second["second0"][1] and "top-1" in second["second0"][1]
  assert "SavedModel:" not in second["second1"][1] and "top-1" not in second["second1"][1]

  files = sorted(os.listdir(model_dir))
  assert not [f for f in files if f.startswith("workertemp") or f.endswith("_temp")], files
  assert [f for f in files if f.startswith("ckpt-")] == [
    "ckpt-1.data-00000-of-00001",
    "ckpt-1.index",
    "ckpt-3.data-00000-of-00001",
    "ckpt-3.index",
  ]
  assert _events_pids(model_dir) and _events_pids(model_dir) <= chief_pids
  assert os.path.isdir(os.path.join(model_dir, "saved_model", "3"))
  assert os.path.exists(os.path.join(model_dir, "flags.json"))
  result = json.load(open(os.path.join(model_dir, "result.json")))
  # Each worker evaluates half of the split; the counts are summed over both.
  assert result["global_step"] == 3 and result["eval/num_examples"] == 1000

  ref1, ref3 = (model_variables(os.path.join(ref_dir, f"ckpt-{s}")) for s in (1, 3))
  got1, got3 = (model_variables(os.path.join(model_dir, f"ckpt-{s}")) for s in (1, 3))
  assert len(ref3) > 150 and got3.keys() == ref3.keys()
  # Measured: equal bit for bit. Weights move ~1e-4 of their norm per step, so also compare
  # the updates of steps 2 and 3 (after the preemption's checkpoint) themselves.
  assert global_relative(ref3, got3, ref3) < 1e-5
  ref_update = {k: ref3[k] - ref1[k] for k in ref3}
  got_update = {k: got3[k] - got1[k] for k in ref3}
  assert global_relative(ref_update, got_update, ref3) < 1e-4
  assert max(np.abs(got3[k] - ref3[k]).max() for k in ref3) < 2e-5


def test_a_dead_worker_stops_the_other_with_one_line(data_dir, tmp_path):
  """The chief (which also hosts the coordination service) dies: worker 1 must end, exit 1."""
  args = ARGS + [
    f"--data_dir={data_dir}",
    f"--model_dir={tmp_path / 'm'}",
    "--mode=train",
    "--train_steps=50",
  ]
  with runs.Processes(tmp_path, runs.env()) as procs:
    _start_workers(procs, "w", args)
    procs.wait_for_log("w1", "Strategy CollectiveAllReduceStrategy")  # the cluster is up
    procs.signal("w0", signal.SIGKILL)
    # The deadline only guards against a hang: a dead peer is noticed in seconds (its
    # connections reset here; across hosts, after 10 s without heartbeats).
    status, _, err = procs.finish("w1", timeout=120)
  assert status == 1, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: lost contact with another worker of the cluster"), last
  assert "restart every worker with the same command" in last
