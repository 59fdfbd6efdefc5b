"""End-to-end runs of run.py in subprocesses: replica invariance, export, errors.

Each configuration of logical devices needs its own process (TensorFlow fixes them at start-up),
so every run here is a `python run.py ...` subprocess on the built-in shapes10 dataset at 16 px.
Interrupted and resumed runs are in test_faults.py, multi-worker runs in test_multiworker.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# xdist_group: one pytest-xdist worker runs every user of the session fixture `replica_runs`,
# so that its runs are made once (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("replica_runs")]

COMMON = [
  "--dataset=shapes10",
  "--train_split=train",
  "--eval_split=test",
  "--image_size=16",
  "--resnet_depth=18",
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


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("TF_SIMCLR_TRACEBACK", None)
  return env


def run_py(args, timeout=600):
  return subprocess.run(
    [sys.executable, os.path.join(REPO, "run.py")] + args,
    cwd=REPO,
    env=_env(),
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
      env=_env(),
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


def model_variables(prefix):
  """{key: array} of every variable in checkpoint `prefix`: model weights and optimizer state.

  (A trainable weight is keyed by its shortest path in the object graph, which is often through
  the optimizer, e.g. `optimizer/_trainable_variables/7/...`.)
  """
  reader = tf.train.load_checkpoint(prefix)
  return {
    k: reader.get_tensor(k)
    for k in reader.get_variable_to_shape_map()
    if k.endswith("VARIABLE_VALUE") and not k.startswith("save_counter")
  }


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return runs.shared_data_dir(tmp_path_factory)


def make_replica_runs(tmp_path_factory):
  """Three-step runs with 1, 2 and 4 CPU replicas at global batch 8; 1 replica also evals.

  Run once per session by conftest.py's `replica_runs` fixture: test_multiworker.py compares
  two workers with the 2-replica run.
  """
  data_dir = runs.shared_data_dir(tmp_path_factory)
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


def _global_relative(a, b, keys):
  """||b - a|| / ||a|| over all listed variables together."""
  num = sum(float(((b[k] - a[k]) ** 2).sum()) for k in keys)
  den = sum(float((a[k] ** 2).sum()) for k in keys)
  return (num / den) ** 0.5


def test_replicas_give_the_same_weights(replica_runs):
  ref_dir = replica_runs[1][0]
  ref1, ref3 = (model_variables(os.path.join(ref_dir, f"ckpt-{s}")) for s in (1, 3))
  assert len(ref3) > 150  # weights, BN statistics and the optimizer's momentum buffers
  ref_update = {k: ref3[k] - ref1[k] for k in ref3}
  moved = [k for k in ref3 if np.abs(ref_update[k]).max() > 1e-7]
  assert len(moved) > 0.9 * len(ref3)
  for replicas in (2, 4):
    d = replica_runs[replicas][0]
    got1, got3 = (model_variables(os.path.join(d, f"ckpt-{s}")) for s in (1, 3))
    assert got3.keys() == ref3.keys()
    # Weights (and optimizer state) after 3 steps: the same up to float rounding. Measured:
    # ~1e-7 relative overall, ~2e-6 at worst for any single value.
    assert _global_relative(ref3, got3, ref3) < 1e-5
    for k in ref3:
      assert np.abs(got3[k] - ref3[k]).max() < 2e-5, (replicas, k)
    # LARS moves weights by ~1e-4 of their norm per step, so also compare the updates of steps
    # 2 and 3 themselves: local-only negatives or unsynchronized BN change them at O(1).
    got_update = {k: got3[k] - got1[k] for k in ref3}
    assert _global_relative(ref_update, got_update, ref3) < 1e-4, replicas


def _numpy_accuracies(model_dir, step):
  """Top-1 and top-5 of the export `saved_model/<step>` on the run's eval split, in NumPy."""
  from tf_simclr import datasets  # pylint: disable=g-import-not-at-top

  flags_json = json.load(open(os.path.join(model_dir, "flags.json")))
  source = datasets.load_source(
    flags_json["dataset"], flags_json["eval_split"], flags_json["data_dir"]
  )
  batch = next(
    iter(datasets.eval_dataset(source, source.num_examples, 1, 0, flags_json["image_size"]))
  )
  real = batch["mask"].numpy() == 1
  exported = tf.saved_model.load(os.path.join(model_dir, "saved_model", step))
  logits = exported(batch["image"], training=False)["logits_sup"].numpy()[real]
  labels = batch["label"].numpy()[real]
  assert len(labels) == source.num_examples
  top5 = np.argsort(-logits, axis=1)[:, :5]
  return np.mean(top5[:, 0] == labels), np.mean((top5 == labels[:, None]).any(axis=1))


def test_train_then_eval_writes_results_and_export(replica_runs):
  d, res = replica_runs[1]
  result = json.load(open(os.path.join(d, "result.json")))
  assert result["global_step"] == 3
  assert result["eval/num_examples"] == 1000
  top1, top5 = _numpy_accuracies(d, "3")
  assert result["eval/label_top_1_accuracy"] == pytest.approx(top1, abs=1e-9)
  assert result["eval/label_top_5_accuracy"] == pytest.approx(top5, abs=1e-9)
  assert os.path.exists(os.path.join(d, "result_3.json"))
  flags_json = json.load(open(os.path.join(d, "flags.json")))
  assert flags_json["resnet_depth"] == 18 and flags_json["temperature"] == 0.5
  assert os.path.isdir(os.path.join(d, "saved_model", "3"))
  assert "SavedModel:" in res.stdout and "top-1" in res.stdout
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(d))


def test_export_loads_without_tf_simclr_and_fine_tunes(replica_runs, tmp_path):
  from tf_simclr import checkpoints
  from tf_simclr import model as model_lib
  from tf_simclr.config import ModelConfig

  d = replica_runs[1][0]
  images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  np.save(tmp_path / "images.npy", images)
  script = textwrap.dedent(f"""
      import numpy as np, tensorflow as tf
      try:
        import tf_simclr
        raise SystemExit("tf_simclr importable")
      except ImportError:
        pass
      m = tf.saved_model.load({os.path.join(d, "saved_model", "3")!r})
      x = tf.constant(np.load("images.npy"))
      out = m(x, training=False)
      np.savez("out.npz", **{{k: v.numpy() for k, v in out.items()}})
      with tf.GradientTape() as tape:
        logits = m(x, training=True)["logits_sup"]
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
            tf.constant([0, 1, 2, 3]), logits))
      grads = tape.gradient(loss, m.trainable_variables)
      missing = sum(g is None for g in grads)
      print("GRADS", len(grads), missing)
      """)
  env = {"PATH": os.environ.get("PATH", ""), "TF_CPP_MIN_LOG_LEVEL": "3"}
  res = subprocess.run(
    [sys.executable, "-c", script],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert res.returncode == 0, res.stderr[-3000:]
  n_grads, missing = map(int, res.stdout.split("GRADS")[1].split())
  assert n_grads > 50 and missing == 0
  loaded = np.load(tmp_path / "out.npz")
  model = model_lib.build_model(ModelConfig(resnet_depth=18, image_size=16, num_classes=10))
  checkpoints.restore_weights(model, os.path.join(d, "ckpt-3"))
  want = model(images, training=False)
  for k in ("final_avg_pool", "proj_head_output", "logits_sup", "block_group2"):
    np.testing.assert_allclose(loaded[k], want[k].numpy(), rtol=1e-4, atol=1e-5)


def _assert_one_line_error(res, words):
  assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
  assert "Traceback" not in res.stderr, res.stderr[-2000:]
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and all(w in last for w in words), last


def _two_class_folder(root):
  """root/{train,test}/{a,b}/*.png: a 2-class image folder."""
  for split in ("train", "test"):
    for c, cls in enumerate("ab"):
      os.makedirs(root / split / cls)
      for i in range(2):
        png = tf.io.encode_png(tf.fill([8, 8, 3], tf.constant(60 * (c + i), tf.uint8)))
        (root / split / cls / f"{i}.png").write_bytes(png.numpy())


@pytest.mark.parametrize(
  "extra,words",
  [
    (["--temperature=0"], ["temperature"]),
    (["--dataset=shapes11"], ["shapes11", "shapes10"]),
    (["--dataset=image_folder", "--data_dir=/nonexistent/folder"], ["/nonexistent/folder"]),
    (["--cpu_replicas=2", "--train_batch_size=7"], ["train_batch_size=7", "2"]),
    # After pretraining ({pre}: a pretraining model_dir, {tmp}: this test's directory).
    (["--train_mode=finetune", "--checkpoint={tmp}/none"], ["--checkpoint", "does not exist"]),
    (["--train_mode=finetune", "--train_label_fraction=0"], ["--train_label_fraction", "(0, 1]"]),
    (
      ["--train_mode=finetune", "--train_label_file={tmp}/ids.txt"],
      ["label file", "ids.txt", "99999"],
    ),
    (["--train_mode=distill"], ["--teacher_checkpoint"]),
    (["--train_mode=distill", "--teacher_checkpoint={tmp}/none"], ["{tmp}/none", "not exist"]),
    (
      [
        "--train_mode=distill",
        "--teacher_checkpoint={pre}",
        "--dataset=image_folder",
        "--data_dir={tmp}/images",
      ],
      ["predicts 10 classes", "have 2"],
    ),
  ],
)
def test_bad_input_is_one_line(extra, words, tmp_path, data_dir, request):
  fill = {"tmp": str(tmp_path)}
  if any("{pre}" in a for a in extra):
    fill["pre"] = request.getfixturevalue("replica_runs")[1][0]
  (tmp_path / "ids.txt").write_text("3\n99999\n")
  if any("{tmp}/images" in a for a in extra):
    _two_class_folder(tmp_path / "images")
  model_dir = tmp_path / "m"
  model_dir.mkdir()
  (model_dir / "keep.txt").write_text("a user's file")
  args = (
    COMMON
    + [f"--data_dir={data_dir}", f"--model_dir={model_dir}", "--train_steps=1"]
    + [a.format(**fill) for a in extra]
  )
  _assert_one_line_error(run_py(args), [w.format(**fill) for w in words])
  # Nothing written into (or over) the model_dir.
  assert os.listdir(model_dir) == ["keep.txt"]
  assert (model_dir / "keep.txt").read_text() == "a user's file"


def test_bad_checkpoints_are_refused_and_kept(replica_runs, data_dir, tmp_path):
  d = replica_runs[2][0]
  before = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
  # Another model in this model_dir: refused (its flags.json says so), nothing written.
  res = run_py(
    COMMON
    + [
      f"--data_dir={data_dir}",
      f"--model_dir={d}",
      "--train_steps=6",
      "--resnet_depth=34",
      "--mode=train",
    ]
  )
  _assert_one_line_error(res, ["--resnet_depth=18 there, 34 here", "new --model_dir"])
  # Fine-tuning with nothing to start from.
  res = run_py(
    COMMON
    + [
      f"--data_dir={data_dir}",
      f"--model_dir={tmp_path / 'ft'}",
      "--train_steps=2",
      "--train_mode=finetune",
      "--mode=train",
    ]
  )
  _assert_one_line_error(res, ["--checkpoint"])
  after = {f: os.path.getmtime(os.path.join(d, f)) for f in os.listdir(d)}
  assert after == before
