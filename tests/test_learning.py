"""SimCLR learns: a short pretraining on deadleaves10 lifts kNN top-1 well above the untrained
encoder's, as `run.py` subprocesses.

Not a timing test: it fails if the loss, the views, the optimizer or batch norm stop learning.
The baseline is the same command with --learning_rate=0 (the weights never move; batch norm
still collects the data's statistics, which 50 steps at momentum 0.9 settle), so both encoders
are judged the same way.
"""

import json
import os

import pytest

import runs

# One worker runs both users of conftest's deadleaves10 build (this and test_sources's), so it
# is built once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deadleaves")]

STEPS = 150
BASELINE_STEPS = 50
# The quick start's recipe and encoder (flags/quickstart.cfg: ResNet-10 at width 0.25), shortened
# to 150 steps. (ResNet-18 at width 0.25 gained 12.5 points in 150 steps: 0.164 -> 0.289; at width
# 0.125 and batch 64 the gain after 300 steps was only 9.5 points: too noisy to test.)
COMMON = [
  "--mode=train_then_eval",
  "--train_mode=pretrain",
  "--dataset=deadleaves10",
  "--train_split=train",
  "--eval_split=test",
  "--image_size=32",
  "--resnet_depth=10",
  "--width_multiplier=0.25",
  "--zero_init_residual=False",
  "--train_batch_size=128",
  "--warmup_epochs=0.2",
  "--optimizer=adam",
  "--temperature=0.1",
  "--use_blur=False",
  "--color_jitter_strength=0.5",
  "--lineareval_while_pretraining=False",
  "--eval_batch_size=250",
  "--use_tpu=False",
]


def test_short_pretraining_beats_the_untrained_encoder(deadleaves_dir, tmp_path):
  knn = {}
  with runs.Processes(tmp_path, runs.env()) as procs:
    for name, lr, steps in (("untrained", 0, BASELINE_STEPS), ("trained", 0.02, STEPS)):
      procs.start(
        name,
        COMMON
        + [
          f"--data_dir={deadleaves_dir}",
          f"--learning_rate={lr}",
          f"--train_steps={steps}",
          f"--checkpoint_steps={steps}",
          f"--knn_eval_every_n_steps={steps}",
          f"--model_dir={tmp_path / name}",
        ],
      )
    for name in ("untrained", "trained"):
      result = procs.finish(name, timeout=400)
      assert result.returncode == 0, result.stderr[-3000:]
      with open(os.path.join(tmp_path, name, "result.json")) as f:
        knn[name] = json.load(f)["knn/top_1_accuracy"]
  print(f"kNN top-1 after {STEPS} steps: {knn}")
  assert knn["trained"] >= knn["untrained"] + 0.10, knn
