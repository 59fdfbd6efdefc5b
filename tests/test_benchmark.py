"""benchmarks/: the timed steps really train, the FLOP count is exact, bad flags are refused."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import augment_pipeline
from benchmarks import train_step
import runs
from runs import assert_one_line_error as _assert_one_line_error
from runs import env as _env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(pixels, k, c_in, c_out):
  return 2 * pixels * k * k * c_in * c_out


def resnet18_cifar_forward_conv_flops(size):
  """Forward convolution FLOPs of one view, from the architecture (SimCLR's ResNet-18).

  CIFAR stem (3x3, 64, stride 1, no max-pool); four groups of two basic blocks of widths
  64..512, the first block of every group with a 1x1 projection shortcut (the reference's
  layout, group 1 included), strides 1, 2, 2, 2.
  """
  flops = _conv(size * size, 3, 3, 64)
  c_in = 64
  for group, c_out in enumerate((64, 128, 256, 512)):
    pixels = (size >> group) ** 2
    flops += _conv(pixels, 3, c_in, c_out) + _conv(pixels, 1, c_in, c_out)
    flops += 3 * _conv(pixels, 3, c_out, c_out)
    c_in = c_out
  return flops


def test_timed_steps_train_and_the_flop_count_is_the_hand_count(tmp_path):
  batch, size, classes, proj, steps, warmup = 8, 16, 10, 128, 2, 1
  args = train_step.parse(
    [
      f"--image_size={size}",
      f"--train_batch_size={batch}",
      f"--steps={steps}",
      f"--warmup={warmup}",
      "--optimizer=adam",
      "--augment_on_device",
      "--strategy=one_device",
    ]
  )
  bench = train_step.build(args, str(tmp_path))
  state = bench.trainer.state
  variables = state.model.trainable_variables
  before = [v.numpy() for v in variables]
  first, times = train_step.time_steps(bench.trainer, bench.iterator(), args.steps, args.warmup)
  assert len(times) == steps and all(0 < t < first for t in times)  # the first step traces
  # Each call is one optimizer step (the first, the untimed warm-up ones, the timed ones), and
  # every trainable variable moved: the step timed is training, not a forward pass or a step
  # whose update was lost.
  assert int(state.optimizer.iterations) == 1 + warmup + steps
  unchanged = [v.path for v, b in zip(variables, before) if np.array_equal(v.numpy(), b)]
  assert not unchanged, unchanged

  flops = train_step.step_flops(bench.trainer, bench.per_replica_batch())
  views = 2 * batch
  # Training = forward + gradient w.r.t. the input + gradient w.r.t. the weights, each as
  # many FLOPs as the forward op. TF skips only the supervised head's input gradient (its
  # input is stop-gradient). Heads: 512 -> 512 -> 512 -> 128 projection, 512 -> 10 linear.
  conv = 3 * views * resnet18_cifar_forward_conv_flops(size)
  projection = 2 * (512 * 512 + 512 * 512 + 512 * proj)
  supervised = 2 * 512 * classes
  dense = views * (3 * projection + 2 * supervised)
  # Four [b, d] x [d, b] logit matmuls (aa, bb, ab, ba), forward and two gradients each.
  contrastive = 3 * 4 * 2 * batch * batch * proj
  assert flops == conv + dense + contrastive


def test_train_step_row_is_consistent(capsys):
  # In-process and narrow (width 0.125): the row's figures, not the step's speed, are checked.
  batch, steps = 8, 2
  row = train_step.main(
    [
      "--image_size=16",
      "--width_multiplier=0.125",
      f"--train_batch_size={batch}",
      f"--steps={steps}",
      "--warmup=1",
      "--optimizer=adam",
      "--strategy=one_device",
    ]
  )
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
  numbers = {
    k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
  }
  assert all(np.isfinite(v) and v > 0 for v in numbers.values()), numbers
  assert (row["views"], row["warmup_steps"], row["timed_steps"]) == (2 * batch, 1, steps)
  assert (row["replicas"], row["stem"]) == (1, "cifar")  # 16 px: the 3x3 stem
  # Rounded to 3 decimals: the step's seconds lie within 0.0005 of what is printed.
  step_s, half = row["step_s"], 0.0005
  assert row["step_s_min"] <= step_s <= row["step_s_max"]
  assert batch / (step_s + half) - 0.01 <= row["img_per_s"] <= batch / (step_s - half) + 0.01
  gflop = row["flop_per_step"] / 1e9
  assert row["gflop_per_step"] == round(gflop, 1)
  assert (
    gflop / (step_s + half) - 0.05 <= row["achieved_gflop_per_s"] <= gflop / (step_s - half) + 0.05
  )
  # The whole run holds the build, the first step and the timed ones.
  spent = row["build_s"] + row["first_step_s"] + steps * row["step_s_min"]
  assert row["total_s"] >= spent - 0.1


def _benchmark(module, flags, timeout=300):
  return subprocess.run(
    [sys.executable, "-m", module] + flags,
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


# The whole command, in a subprocess: TensorFlow loads, then one line and exit status 1. One
# case refused by each benchmark's flag parser, one once the strategy exists (3 examples do not
# split over 2 replicas: TF's logical devices cannot be set up again in this process).
@pytest.mark.parametrize(
  "module,flags,words",
  [
    ("benchmarks.train_step", ["--steps=0"], ["--steps=0 must be positive"]),
    ("benchmarks.augment_pipeline", ["--batch_size=0"], ["--batch_size=0 must be >= 1"]),
    (
      "benchmarks.train_step",
      ["--strategy=mirrored", "--cpu_replicas=2", "--train_batch_size=3"],
      ["train_batch_size=3 must be a positive multiple of the number of replicas (2)"],
    ),
  ],
)
def test_bad_flags_are_refused_in_one_line(module, flags, words):
  _assert_one_line_error(_benchmark(module, flags), words)


# The other flag refusals, through the same parsers in this process.
@pytest.mark.parametrize(
  "module,flags,words",
  [
    (train_step, ["--source_size=-1"], ["--source_size=-1 must be >= 0"]),
    (train_step, ["--warmup=-1"], ["--warmup=-1 must be >= 0"]),
    (train_step, ["--optimizer=sgd"], ["--optimizer", "invalid choice: 'sgd'"]),
    (train_step, ["--image_size=big"], ["--image_size", "invalid int value"]),
    (augment_pipeline, ["--sizes=32,x"], ["--sizes=32,x must be positive"]),
    (augment_pipeline, ["--intra_op_threads=-1"], ["--intra_op_threads=-1 must be >= 0"]),
  ],
)
def test_bad_flags_are_refused_by_the_parsers(module, flags, words, capsys):
  with pytest.raises(SystemExit) as exited:
    module.parse(flags)
  assert exited.value.code == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err


def test_augment_pipeline_times_every_form():
  batch, steps = 4, 1
  out = _benchmark(
    "benchmarks.augment_pipeline",
    ["--sizes=16", f"--batch_size={batch}", f"--steps={steps}", "--warmup=1"],
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [(r["form"], r["use_blur"]) for r in rows] == [
    ("reference-like per-image map", False),
    ("tf.data per-image map", True),
    ("tf.data per-image map", False),
    ("tf.data batched map", True),
    ("tf.function batched", True),
  ]
  for r in rows:
    assert (r["size"], r["source"], r["batch_size"], r["timed_batches"]) == (
      16,
      "16x16 uint8",
      batch,
      steps,
    )
    for key in ("images_per_s", "images_per_cpu_s_x_cores", "vs_reference_like"):
      assert np.isfinite(r[key]) and r[key] > 0, (r["form"], key, r[key])
    assert r["intra_op_threads"] == 1  # the default: a host that only feeds accelerators
  # Each ratio is its row's images/s over the reference-like row's (both printed rounded to
  # 0.1 image/s, the ratio to 0.01).
  base = rows[0]["images_per_s"]
  assert rows[0]["vs_reference_like"] == 1.0
  for r in rows[1:]:
    slack = 0.005 + 0.05 * (r["images_per_s"] + base) / base**2
    assert abs(r["vs_reference_like"] - r["images_per_s"] / base) <= slack, r


def test_augment_pipeline_on_jpegs_times_every_configuration_interleaved(tmp_path, capsys):
  # In process (TF is loaded already): six small JPEGs of two sizes, encoded here (the real
  # photographs of make_jpeg_folder need scikit-image, which the project does not install).
  for i in range(6):
    folder = tmp_path / "jpegs" / "train" / f"c{i % 2}"
    folder.mkdir(parents=True, exist_ok=True)
    image = runs.random_image((40 + 8 * (i % 2), 56, 3), seed=i)
    (folder / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image, quality=90).numpy())
  batch, steps, rounds = 2, 1, 2
  augment_pipeline.main(
    [f"--data_dir={tmp_path / 'jpegs'}", "--image_size=16", f"--batch_size={batch}"]
    + [f"--steps={steps}", "--warmup=1", f"--rounds={rounds}", "--intra_op_threads=0"]
  )
  rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
  assert [r["form"] for r in rows] == [
    "reference host pipeline (decode + 2 views, no blur)",
    "tf_simclr host path (no blur)",
    "tf_simclr host path (no blur, --crop_interpolation=bilinear)",
    "tf_simclr --augment_on_device host share",
    "tf_simclr --augment_on_device host share, TPU (the host crops)",
  ]
  base = rows[0]["images_per_s"]
  for r in rows:
    assert r["source"].endswith(": 6 encoded images") and r["batch_size"] == batch
    assert len(r["images_per_s_by_round"]) == rounds
    assert np.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
    slack = 0.005 + 0.05 * (r["images_per_s"] + base) / base**2
    assert abs(r["vs_reference"] - r["images_per_s"] / base) <= slack, r


@pytest.mark.parametrize(
  "flags,words",
  [
    (["--data_dir=/nonexistent/folder"], ["--data_dir=/nonexistent/folder is not a folder"]),
    (["--data_dir=.", "--tfds=mnist"], ["give --data_dir or --tfds, not both"]),
    (["--rounds=0"], ["--rounds=0 must be >= 1"]),
  ],
)
def test_augment_pipeline_refuses_bad_jpeg_flags_in_one_line(flags, words, capsys):
  with pytest.raises(SystemExit) as exit_:
    augment_pipeline.parse(flags)
  err = capsys.readouterr().err
  assert exit_.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ")
  assert all(w in err for w in words), err
