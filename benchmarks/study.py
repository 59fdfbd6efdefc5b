"""The paper's findings at the quick start's scale: runs the ablations with run.py, draws the plots.

  pip install matplotlib==3.10.8                 # the plots only; not a tf_simclr dependency
  python -m benchmarks.study                     # every ablation (about 65 minutes on 2 cores)
  python -m benchmarks.study --only=head         # one ablation (or several: --only=head,batch)
  python -m benchmarks.study --plot_only         # redraw the plots from the data file

Each run is `python run.py --flagfile=flags/quickstart.cfg ...` (the real code path) with the
ablation's flags, in `--work/<run name>`; a linear evaluation is `python run.py
--flagfile=flags/linear_eval.cfg --checkpoint=<run> ...`. Every run's command, seed, steps, wall
time and figures (kNN monitor curve, contrastive accuracy, linear evaluation) go to
`--out/runs.jsonl`, one JSON object per line; a run already recorded there with the same command
is not run again, so an interrupted study resumes. The plots are drawn from that file alone
(benchmarks/study_plots.py) into `--out/*.png`; docs/study.md sets each beside the paper's finding.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

from benchmarks import ArgumentParser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN_CFG = "flags/quickstart.cfg"
LINEAR_EVAL_CFG = "flags/linear_eval.cfg"
GRID_EPOCHS = 8  # the grids' runs: half the quick start's 16 epochs, to fit the study in 90 min
EXAMPLES = 5000  # deadleaves10's training split
# What a linear evaluation takes from its pretraining's flags: the data and the model.
CARRIED_TO_LINEAR_EVAL = tuple(
  f"--{name}="
  for name in ("dataset", "proj_head_mode", "num_proj_layers", "width_multiplier", "resnet_depth")
)


@dataclasses.dataclass(frozen=True)
class Run:
  """One pretraining and the linear evaluations read from it.

  Attributes:
    name: the run's folder under --work and its key in runs.jsonl.
    flags: run.py flags added after flags/quickstart.cfg (later flags win).
    evals: (label, ft_proj_selector) of each linear evaluation: 0 reads h (the encoder's
      output), k > 0 the projection head's k-th layer (z: its last).
  """

  name: str
  flags: tuple[str, ...]
  evals: tuple[tuple[str, int], ...] = ()


def grid_flags(batch: int = 128, epochs: int = GRID_EPOCHS) -> tuple[str, ...]:
  """The grids' common flags: `epochs` epochs at `batch`, the kNN monitor once per epoch."""
  per_epoch = -(-EXAMPLES // batch)
  return (
    f"--train_batch_size={batch}",
    f"--train_epochs={epochs}",
    f"--knn_eval_every_n_steps={per_epoch}",
    f"--checkpoint_steps={per_epoch}",
  )


def curve_runs() -> list[Run]:
  """The quick start as it is, and the untrained encoder (learning rate 0) as a baseline."""
  return [
    Run("quickstart", (), (("h", 0),)),
    Run("untrained", ("--learning_rate=0", "--train_steps=100"), (("h", 0),)),
  ]


def composition_runs() -> list[Run]:
  """Figure 5 and 6 on deadleaves10_color (a random palette per image): crop, colour, both,
  both + blur; colour-jitter strengths 0 (crop alone), 0.25, 0.5 and 1 (crop + colour); and
  the quick start's own recipe (crop + jitter 0.5) for its 16 epochs."""
  data = ("--dataset=deadleaves10_color", *grid_flags())
  crop = ("--color_jitter_strength=0", "--use_blur=False")
  colour = ("--min_scale=1", "--horizontal_flip=False", "--color_jitter_strength=1")
  both = ("--color_jitter_strength=1", "--use_blur=False")
  h = (("h", 0),)
  return [
    Run("composition_crop", data + crop, h),
    Run("composition_colour", data + colour, h),
    Run("composition_crop_colour", data + both, h),
    Run("composition_crop_colour_blur", data + ("--color_jitter_strength=1", "--use_blur=True"), h),
    Run("composition_jitter_0.25", data + ("--color_jitter_strength=0.25", "--use_blur=False")),
    Run("composition_jitter_0.5", data + ("--color_jitter_strength=0.5", "--use_blur=False")),
    # The quick start's recipe as it is (16 epochs, jitter 0.5) on the coloured images.
    Run("composition_crop_colour_e16", ("--dataset=deadleaves10_color",), h),
  ]


def head_runs() -> list[Run]:
  """Figure 8: no head, a linear head, the 2-layer (v1) and 3-layer (v2) heads, at the quick
  start's temperature 0.1 and at 0.5; linear evaluation on h and on the head's output z."""
  heads = {
    "none": ("--proj_head_mode=none",),
    "linear": ("--proj_head_mode=linear",),
    "mlp2": ("--proj_head_mode=nonlinear", "--num_proj_layers=2"),
    "mlp3": ("--proj_head_mode=nonlinear", "--num_proj_layers=3"),
  }
  # z is read by the frozen-feature probes only (feature_probes): run.py's linear evaluation
  # of a head layer would also train the head's layers below it.
  runs = [
    Run(f"head_{head}_t{t}", (*grid_flags(), *flags, f"--temperature={t}"), (("h", 0),))
    for t in (0.1, 0.5)
    for head, flags in heads.items()
  ]
  # Training length: the quick start's 16 epochs without a head, against the quick start
  # itself (the 3-layer head; the `curve` ablation's run).
  return runs + [Run("head_none_e16", heads["none"], (("h", 0),))]


def temperature_runs() -> list[Run]:
  """Table 5: temperatures 0.05-1 with L2-normalised embeddings (cosine similarity) and without."""
  return [
    Run(
      f"temperature_{t}_{'norm' if norm else 'nonorm'}",
      (
        *grid_flags(),
        "--proj_head_mode=nonlinear",
        "--num_proj_layers=3",
        f"--temperature={t}",
        f"--hidden_norm={norm}",
      ),
    )
    for norm in (True, False)
    for t in (0.05, 0.1, 0.2, 0.5, 1.0)
  ]


def batch_runs() -> list[Run]:
  """Figure 9: batch sizes 32-256 for the same number of epochs (learning rate scaled linearly,
  as the quick start's --learning_rate is per 256)."""
  return [Run(f"batch_{b}", grid_flags(batch=b)) for b in (32, 64, 128, 256)]


ABLATIONS = {
  "curve": curve_runs,
  "composition": composition_runs,
  "head": head_runs,
  "temperature": temperature_runs,
  "batch": batch_runs,
}


def pretrain_command(run: Run, work: str, seed: int) -> list[str]:
  return [
    "run.py",
    f"--flagfile={PRETRAIN_CFG}",
    *run.flags,
    f"--seed={seed}",
    f"--model_dir={os.path.join(work, run.name)}",
  ]


def linear_eval_command(run: Run, work: str, seed: int, label: str, selector: int) -> list[str]:
  """The linear evaluation of one representation, with the pretraining's data and model."""
  kept = [f for f in run.flags if f.startswith(CARRIED_TO_LINEAR_EVAL)]
  return [
    "run.py",
    f"--flagfile={LINEAR_EVAL_CFG}",
    *kept,
    f"--ft_proj_selector={selector}",
    f"--seed={seed}",
    f"--checkpoint={os.path.join(work, run.name)}",
    f"--model_dir={os.path.join(work, run.name)}_linear_eval_{label}",
  ]


def _run_py(command: list[str], log: str) -> tuple[float, str | None]:
  """Runs `python run.py ...` from the repository root, output to `log`.

  Returns (wall time in s, None), or (wall time, its last line) when it failed: a run that
  diverges (e.g. unnormalised embeddings at a low temperature) is a finding, not a crash.
  """
  started = time.time()
  with open(log, "w") as f:
    proc = subprocess.run([sys.executable, *command], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
  wall = time.time() - started
  if proc.returncode == 0:
    return wall, None
  with open(log) as f:
    lines = [line.strip() for line in f if line.strip()]
  return wall, (lines[-1] if lines else f"exit status {proc.returncode}")


def _json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def train_scalars(model_dir: str, tags: tuple[str, ...]) -> dict[str, list[tuple]]:
  """{tag: [(step, value, seconds)]} of the run's TensorBoard event files, by step; seconds
  from the run's first event (its wall clock, so a curve can be drawn against time)."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out, first = {tag: [] for tag in tags}, None
  for path in sorted(glob.glob(os.path.join(model_dir, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      first = event.wall_time if first is None else min(first, event.wall_time)
      for value in event.summary.value:
        if value.tag in out:
          v = float(tf.make_ndarray(value.tensor))
          out[value.tag].append((int(event.step), v, event.wall_time))
  return {
    tag: [(step, v, round(t - first, 2)) for step, v, t in sorted(points)]
    for tag, points in out.items()
  }


def _dataset(run: Run) -> str:
  named = [f.split("=", 1)[1] for f in run.flags if f.startswith("--dataset=")]
  return named[-1] if named else "deadleaves10"


def feature_probes(export_dir: str, dataset: str) -> dict[str, dict[str, float]]:
  """The same two readings of h (`final_avg_pool`) and z (`proj_head_output`) of an export.

  {h|z: {"probe": softmax-regression top-1, "knn": the monitor's vote (k=200, T=0.07)}}, on the
  built-in dataset's train/test images as evaluation preprocesses them. The product's linear
  evaluation of z would fine-tune the head's layers below z (as the reference's does), so h and
  z are compared here with one frozen-feature protocol instead.
  """
  import importlib  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from benchmarks import probes  # pylint: disable=g-import-not-at-top
  from tf_simclr import augment  # pylint: disable=g-import-not-at-top

  generate = importlib.import_module(f"tf_simclr.{dataset}").generate
  model = tf.saved_model.load(export_dir)
  features = {}
  for split in ("train", "test"):
    images, labels = generate(split)
    batch = tf.stack([augment.preprocess_eval(image, 32, 32) for image in images])
    out = model(batch, training=False)
    features[split] = (out["final_avg_pool"].numpy(), out["proj_head_output"].numpy(), labels)
  (h, z, labels), (h_test, z_test, labels_test) = features["train"], features["test"]
  return {
    name: {
      "probe": probes.linear_probe_top1(a, labels, b, labels_test),
      "knn": probes.knn_top1(a, labels, b, labels_test, k=200, temperature=0.07),
    }
    for name, a, b in (("h", h, h_test), ("z", z, z_test))
  }


def measure(run: Run, ablation: str, work: str, seed: int) -> dict:
  """Pretrains, reads the run's figures, runs its linear evaluations: the run's record."""
  os.makedirs(os.path.join(work, "logs"), exist_ok=True)
  model_dir = os.path.join(work, run.name)
  command = pretrain_command(run, work, seed)
  wall, failed = _run_py(command, os.path.join(work, "logs", f"{run.name}.log"))
  record = {
    "ablation": ablation,
    "name": run.name,
    "seed": seed,
    "command": "python " + " ".join(command),
    "wall_s": round(wall, 1),
    "failed": failed,
  }
  if failed:
    return record
  result = _json(os.path.join(model_dir, "result.json"))
  tags = ("train/contrast_acc", "train/contrast_loss", "knn/top_1_accuracy")
  scalars = train_scalars(model_dir, tags)
  record.update(
    steps=int(result["global_step"]),
    knn_top1=result.get("knn/top_1_accuracy"),
    knn_curve=scalars["knn/top_1_accuracy"],
    contrast_acc=scalars["train/contrast_acc"],
    contrast_loss=scalars["train/contrast_loss"],
    probes=feature_probes(_newest_export(model_dir), _dataset(run)),
    linear_eval={label: linear_eval(run, work, seed, label, sel) for label, sel in run.evals},
  )
  return record


def linear_eval(run: Run, work: str, seed: int, label: str, selector: int) -> dict:
  """Runs flags/linear_eval.cfg on the run's checkpoint: {top1, command, wall_s[, failed]}."""
  command = linear_eval_command(run, work, seed, label, selector)
  name = f"{run.name}_linear_eval_{label}"
  wall, failed = _run_py(command, os.path.join(work, "logs", f"{name}.log"))
  out = {"command": "python " + " ".join(command), "wall_s": round(wall, 1), "failed": failed}
  if not failed:
    out["top1"] = _json(os.path.join(work, name, "result.json"))["eval/label_top_1_accuracy"]
  return out


def _newest_export(model_dir: str) -> str:
  steps = [int(d) for d in os.listdir(os.path.join(model_dir, "saved_model")) if d.isdigit()]
  return os.path.join(model_dir, "saved_model", str(max(steps)))


def read_records(path: str) -> dict[str, dict]:
  """{run name: record} of the data file (the last record of a name wins); {} if absent."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r["name"]: r for r in map(json.loads, filter(str.strip, f))}


def _pending(ablations, records, work, seed):
  """(ablation, run) still to measure: not recorded, or recorded with another command."""
  for ablation in ablations:
    for run in ABLATIONS[ablation]():
      done = records.get(run.name)
      if done is None or done["command"] != "python " + " ".join(pretrain_command(run, work, seed)):
        yield ablation, run


def main(argv=None):
  parser = ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default=",".join(ABLATIONS), help="ablations, comma-separated")
  parser.add_argument("--work", default="runs/study", help="the runs' model_dirs and logs")
  parser.add_argument("--out", default="docs/study", help="runs.jsonl and the plots")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--plot_only", action="store_true", help="draw the plots, run nothing")
  args = parser.parse_args(argv)
  ablations = [a for a in args.only.split(",") if a]
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown:
    parser.error(f"--only: unknown ablation(s) {', '.join(unknown)}; known: {', '.join(ABLATIONS)}")
  os.makedirs(args.out, exist_ok=True)
  data_file = os.path.join(args.out, "runs.jsonl")
  if not args.plot_only:
    records = read_records(data_file)
    for ablation, run in _pending(ablations, records, args.work, args.seed):
      print(f"[{time.strftime('%H:%M:%S')}] {ablation}: {run.name}", flush=True)
      record = measure(run, ablation, args.work, args.seed)
      with open(data_file, "a") as f:
        f.write(json.dumps(record) + "\n")
  from benchmarks import study_plots  # pylint: disable=g-import-not-at-top

  for path in study_plots.draw(read_records(data_file), ablations, args.out):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
