"""Helpers that test modules share (test modules never import each other; fixtures are in
conftest.py): `python run.py` subprocesses and their common flags, the one-line error check,
checkpoint readers, small data on disk, what data sources and pipelines hold, and NumPy
references.

`run_py` and `run_py_concurrently` run commands to completion; `Processes` starts them in their
own process groups, watched through their log files and always ended (fault and multi-worker
tests).
"""

import collections
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The end-to-end runs' flags: shapes10 at 16 px on a ResNet-18 at width 0.125, which has the
# variables and batch norms of width 1 at ~1/64 of its convolution cost (1.6 MB checkpoints).
COMMON = [
  "--dataset=shapes10",
  "--train_split=train",
  "--eval_split=test",
  "--image_size=16",
  "--resnet_depth=18",
  "--width_multiplier=0.125",
  "--train_batch_size=8",
  "--eval_batch_size=200",
  "--learning_rate=1.0",
  "--warmup_epochs=0",
  "--weight_decay=1e-4",
  "--temperature=0.5",
  "--use_tpu=False",
  "--deterministic",
  "--seed=3",
]

Result = collections.namedtuple("Result", ["returncode", "stdout", "stderr"])


def env():
  """The environment of a run.py subprocess: quiet TensorFlow, one-line errors."""
  e = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  e.pop("TF_SIMCLR_TRACEBACK", None)
  return e


def run_py(args, timeout=600):
  """Runs `python run.py *args` to completion: a subprocess.CompletedProcess (text)."""
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "run.py")] + args,
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def run_py_concurrently(arg_lists, timeout=900):
  """Runs several run.py commands at once (graph tracing is mostly one core each)."""
  procs = [
    subprocess.Popen(
      [sys.executable, os.path.join(REPO, "run.py")] + args,
      cwd=REPO,
      env=env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for args in arg_lists
  ]
  results = []
  try:
    for args, proc in zip(arg_lists, procs):
      out, err = proc.communicate(timeout=timeout)
      results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
  finally:
    for proc in procs:  # no process outlives a failed test
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return results


def assert_one_line_error(res, words):
  """Bad input: exit status 1, no traceback, a last stderr line `error: ...` with `words`."""
  assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
  assert "Traceback" not in res.stderr, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and all(w in last for w in words), last


def model_variables(prefix):
  """{key: array} of every variable in checkpoint `prefix`: model weights and optimizer state.

  (A trainable weight is keyed by its shortest path in the object graph, which is often through
  the optimizer, e.g. `optimizer/_trainable_variables/7/...`.)
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  reader = tf.train.load_checkpoint(prefix)
  return {
    k: reader.get_tensor(k)
    for k in reader.get_variable_to_shape_map()
    if k.endswith("VARIABLE_VALUE") and not k.startswith("save_counter")
  }


def global_relative(a, b, keys):
  """||b - a|| / ||a|| over all listed variables together."""
  num = sum(float(((b[k] - a[k]) ** 2).sum()) for k in keys)
  den = sum(float((a[k] ** 2).sum()) for k in keys)
  return (num / den) ** 0.5


def checkpoint_values(prefix, root):
  """{object path under `root` (e.g. 'model/encoder'): array} of a training checkpoint."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tf_simclr import checkpoints  # pylint: disable=g-import-not-at-top

  reader = tf.train.load_checkpoint(prefix)
  graph = checkpoints.object_graph(reader)
  node_ids = [0]
  for name in root.split("/"):
    node_ids = [c.node_id for c in graph.nodes[node_ids[0]].children if c.local_name == name]
    assert node_ids, (prefix, root)
  values, stack = {}, [(root, node_ids[0])]
  while stack:
    path, node_id = stack.pop()
    node = graph.nodes[node_id]
    for attr in node.attributes:
      if attr.name == "VARIABLE_VALUE":
        values[path] = reader.get_tensor(attr.checkpoint_key)
    stack += [(f"{path}/{c.local_name}", c.node_id) for c in node.children]
  return values


def two_class_folder(root):
  """root/{train,test}/{a,b}/*.png (a pathlib.Path): a 2-class image folder of 8x8 PNGs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for split in ("train", "test"):
    for c, cls in enumerate("ab"):
      os.makedirs(root / split / cls)
      for i in range(2):
        png = tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(60 * (c + i), tf.uint8)))
        (root / split / cls / f"{i}.png").write_bytes(png.numpy())


def numpy_nt_xent(hidden, hidden_norm=True, temperature=1.0):
  """Algorithm 1 of the paper, one anchor at a time, in float64, times 2 (the reference's scale).

  hidden: [2N, d], the two views' rows stacked. Returns (loss, sim / temperature) where sim is
  the [2N, 2N] similarity matrix.
  """
  h = np.asarray(hidden, np.float64)
  if hidden_norm:
    h = h / np.linalg.norm(h, axis=1, keepdims=True)
  two_n = h.shape[0]
  n = two_n // 2
  sim = h @ h.T / temperature
  total = 0.0
  for i in range(two_n):
    j = (i + n) % two_n
    denom = sum(np.exp(sim[i, k]) for k in range(two_n) if k != i)
    total += -np.log(np.exp(sim[i, j]) / denom)
  return 2.0 * total / two_n, sim


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


def shared_data_dir(tmp_path_factory, dataset="shapes10"):
  """The data_dir of built-in `dataset`, prepared once per test process (conftest.py's
  `data_dir` and `deadleaves_dir`) before concurrent runs race to write it."""
  path = str(tmp_path_factory.getbasetemp() / f"{dataset}_data")
  from tf_simclr.data import sources  # pylint: disable=g-import-not-at-top

  sources.load_source(dataset, "train", path)
  return path


def make_replica_runs(tmp_path_factory):
  """Three-step runs with 1, 2 and 4 CPU replicas at global batch 8; 1 replica also evals.

  {replicas: (model_dir, CompletedProcess)}; made once per session by conftest.py's
  `replica_runs` fixture.
  """
  data_dir = shared_data_dir(tmp_path_factory)
  dirs, commands = {}, []
  for replicas in (1, 2, 4):
    d = str(tmp_path_factory.mktemp(f"r{replicas}"))
    mode = "train_then_eval" if replicas == 1 else "train"
    dirs[replicas] = d
    commands.append(
      COMMON
      + [
        f"--data_dir={data_dir}",
        f"--model_dir={d}",
        "--train_steps=3",
        "--checkpoint_steps=1",
        f"--cpu_replicas={replicas}",
        f"--mode={mode}",
      ]
    )
  results = run_py_concurrently(commands)
  for res in results:
    assert res.returncode == 0, res.stderr[-3000:]
  return {r: (dirs[r], res) for r, res in zip((1, 2, 4), results)}


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


def numpy_knn(query, bank, bank_labels, num_classes, k, temperature, bank_valid=None):
  """Wu et al.'s weighted kNN, written out: int [b]."""
  query = query / np.linalg.norm(query, axis=1, keepdims=True)
  bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
  if bank_valid is not None:
    bank, bank_labels = bank[bank_valid], bank_labels[bank_valid]
  k = min(k, len(bank))
  predictions = []
  for q in query.astype(np.float64):
    sims = bank.astype(np.float64) @ q
    nearest = np.argsort(-sims)[:k]
    votes = np.zeros(num_classes)
    for j in nearest:
      votes[bank_labels[j]] += np.exp(sims[j] / temperature)
    predictions.append(np.argmax(votes))
  return np.array(predictions)


def seed_rows(n, stream=7, dtype=None):
  """[n, 2] distinct stateless seeds (i, stream), int64 unless `dtype` says otherwise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.constant(np.stack([np.arange(n), np.full(n, stream)], 1), dtype or tf.int64)


def map_over(fn, seeds, batch=250):
  """fn(seed) for every row of seeds through a parallel tf.data map, stacked as NumPy."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  ds = tf.data.Dataset.from_tensor_slices(seeds)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(batch)
  return tf.nest.map_structure(
    lambda *x: np.concatenate(x), *[tf.nest.map_structure(np.asarray, b) for b in ds]
  )


def random_image(shape, seed=0, dtype=np.uint8):
  """A random image of `shape`: uint8 in [0, 255], or float in [0, 1)."""
  rng = np.random.default_rng(seed)
  if dtype == np.uint8:
    return rng.integers(0, 256, shape, np.uint8)
  return rng.random(shape).astype(dtype)


# Data: the tests of tf_simclr.data (test_sources, test_label_subsets, test_pipeline).


def write(path, data):
  """Writes bytes `data` to `path`, making its folders."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def png(seed, path):
  """Writes `random_image((6, 5, 3), seed)` as a PNG file at `path`; returns the image."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  image = random_image((6, 5, 3), seed)
  write(path, tf.io.encode_png(image).numpy())
  return image


def records_numpy(source):
  """All records of a source as {'label': [N], 'id': [N], 'image': list of bytes}."""
  out = {"label": [], "id": [], "image": []}
  for batch in source.records.batch(1000):
    out["label"].append(batch["label"].numpy())
    out["id"].append(batch["id"].numpy())
    out["image"] += list(batch["image"].numpy())
  return {
    "label": np.concatenate(out["label"]),
    "id": np.concatenate(out["id"]),
    "image": out["image"],
  }


def decoded(source):
  """The source's decoded examples, in order: {'image': uint8 [H, W, 3], 'label', 'id'}."""
  from tf_simclr.data import pipeline  # pylint: disable=g-import-not-at-top

  return pipeline.decode_records(source, source.records)


def images_numpy(source, limit=None):
  """(images uint8 [n, H, W, 3], labels [n], ids [n]) of the first `limit` decoded examples."""
  ds = decoded(source) if limit is None else decoded(source).take(limit)
  batch = next(iter(ds.batch(100_000)))
  return batch["image"].numpy(), batch["label"].numpy(), batch["id"].numpy()


def take(ds, n):
  """The first `n` elements of `ds` as NumPy structures."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return [tf.nest.map_structure(lambda v: v.numpy(), b) for b in ds.take(n)]


def global_batches(source, steps, global_batch, pipelines, per_replica, image_size=16, **kwargs):
  """Global batches as tf.distribute assembles them from P pipelines of R replicas each.

  Pipeline p serves replicas p*R .. p*R + R - 1 with its consecutive per-replica batches, so
  step k is the concatenation over p, then r, of pipeline p's batch k*R + r. Small views (16
  px) keep the tests fast; the determinism contract does not depend on them.
  """
  from tf_simclr.data import pipeline  # pylint: disable=g-import-not-at-top

  replicas = global_batch // pipelines // per_replica
  per_pipeline = [
    take(
      pipeline.train_dataset(
        source, global_batch, per_replica, pipelines, p, image_size=image_size, **kwargs
      ),
      steps * replicas,
    )
    for p in range(pipelines)
  ]
  out = []
  for k in range(steps):
    parts = [per_pipeline[p][k * replicas + r] for p in range(pipelines) for r in range(replicas)]
    out.append({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})
  return out


def assert_batches_equal(a, b):
  """Two lists of training batches hold the same ids, labels and views, bit for bit."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["id"], y["id"])
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_array_equal(x["views"], y["views"])  # Bit for bit.
