"""run.py processes for fault and multi-worker tests: started in their own process groups,
watched through their log files, and always ended.

Not a test module: test_faults.py and test_multiworker.py import it.
"""

import collections
import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

Result = collections.namedtuple("Result", ["returncode", "stdout", "stderr"])


def free_ports(n):
  """`n` distinct TCP ports on 127.0.0.1 that were free a moment ago."""
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def shared_data_dir(tmp_path_factory):
  """One shapes10 data_dir for the session's fault and multi-worker tests, prepared once."""
  path = str(tmp_path_factory.getbasetemp() / "shapes10_data")
  from tf_simclr import datasets  # pylint: disable=g-import-not-at-top

  datasets.load_source("shapes10", "train", path)  # before concurrent runs race to write it
  return path


class Processes:
  """`python run.py` processes that cannot outlive the `with` block.

  Each runs in a new session (its own process group), writing stdout and stderr to files in
  `log_dir`; leaving the block kills every group still running, also when a test fails.
  """

  def __init__(self, log_dir, env):
    self._log_dir = str(log_dir)
    self._env = env
    self._procs = {}

  def __enter__(self):
    return self

  def __exit__(self, *unused_exc_info):
    for proc in self._procs.values():
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

  def start(self, name, args, env=None, prefix=()):
    """Starts `[*prefix, python, run.py, *args]` as `name` (a fresh name per process)."""
    assert name not in self._procs, name
    with open(self._path(name, "out"), "w") as out, open(self._path(name, "err"), "w") as err:
      self._procs[name] = subprocess.Popen(
        [*prefix, sys.executable, os.path.join(REPO, "run.py"), *args],
        cwd=REPO,
        env=dict(self._env, **(env or {})),
        stdout=out,
        stderr=err,
        start_new_session=True,
      )
    return self._procs[name]

  def _path(self, name, stream):
    return os.path.join(self._log_dir, f"{name}.{stream}")

  def output(self, name):
    """(stdout, stderr) so far."""
    with open(self._path(name, "out")) as out, open(self._path(name, "err")) as err:
      return out.read(), err.read()

  def wait_until(self, name, condition, what, timeout=240, interval=0.02):
    """Polls `condition()` while `name` runs; fails if `name` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
      assert self._procs[name].poll() is None, (
        f"{name} ended (status {self._procs[name].returncode}) before {what}:\n"
        + self.output(name)[1][-3000:]
      )
      assert time.monotonic() < deadline, f"{name}: no {what} within {timeout} s"
      time.sleep(interval)

  def wait_for_log(self, name, text, timeout=240):
    """Waits until `name` has logged `text` (on stderr, where absl logs)."""
    self.wait_until(name, lambda: text in self.output(name)[1], repr(text), timeout)

  def pid(self, name):
    return self._procs[name].pid

  def signal(self, name, signum):
    self._procs[name].send_signal(signum)

  def finish(self, name, timeout=300):
    """Waits for `name` to end; returns its Result. Kills it after `timeout` s (and fails)."""
    proc = self._procs[name]
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      raise AssertionError(
        f"{name} did not end within {timeout} s:\n" + self.output(name)[1][-3000:]
      ) from None
    return Result(proc.returncode, *self.output(name))
