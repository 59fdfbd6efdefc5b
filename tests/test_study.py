"""The study program (benchmarks/study.py): its commands are valid runs, it resumes, it draws."""

import copy
import json
import os

import pytest

from benchmarks import study
from benchmarks import study_plots
from flags import definitions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = [(a, run) for a, make in study.ABLATIONS.items() for run in make()]


def _config(command, model_dir):
  """The RunConfig that run.py would build from `command` (['run.py', flags...])."""
  flag_values = copy.deepcopy(definitions.FLAGS)
  flag_values.unparse_flags()
  args = [a.replace("--flagfile=", f"--flagfile={ROOT}/") for a in command]
  assert flag_values(args) == ["run.py"]
  values = flag_values.flag_values_dict()
  values["model_dir"] = model_dir
  values["checkpoint"] = values["checkpoint"] and model_dir
  return definitions.to_config(values)


def test_run_names_are_unique():
  names = [run.name for _, run in RUNS]
  assert len(names) == len(set(names))


@pytest.mark.parametrize("ablation,run", RUNS, ids=[run.name for _, run in RUNS])
def test_every_command_is_a_valid_run_of_what_it_ablates(ablation, run, tmp_path):
  cfg = _config(study.pretrain_command(run, str(tmp_path), 0), str(tmp_path))
  assert cfg.model.train_mode == "pretrain" and cfg.train.seed == 0
  if ablation == "composition":
    assert cfg.data.dataset == "deadleaves10_color"
  for label, selector in run.evals:
    le = _config(study.linear_eval_command(run, str(tmp_path), 0, label, selector), str(tmp_path))
    # The linear evaluation reads the pretrained model: same data, architecture and head.
    assert le.model.train_mode == "finetune" and le.model.fine_tune_after_block == 4
    assert le.data.dataset == cfg.data.dataset
    for field in ("resnet_depth", "width_multiplier", "proj_head_mode", "num_proj_layers"):
      assert getattr(le.model, field) == getattr(cfg.model, field), field
    assert le.model.ft_proj_selector == selector


def test_grid_runs_monitor_once_per_epoch():
  for b in (32, 128, 256):
    flags = dict(f[2:].split("=") for f in study.grid_flags(batch=b))
    assert int(flags["knn_eval_every_n_steps"]) * b >= study.EXAMPLES
    assert (int(flags["knn_eval_every_n_steps"]) - 1) * b < study.EXAMPLES


def test_recorded_runs_are_not_run_again_unless_their_command_changed(tmp_path):
  work = str(tmp_path)
  runs = study.head_runs()
  recorded = {
    runs[0].name: {"command": "python " + " ".join(study.pretrain_command(runs[0], work, 0))}
  }
  recorded[runs[1].name] = {"command": "python run.py --some_older_flag"}
  pending = [run.name for _, run in study._pending(["head"], recorded, work, 0)]
  assert pending == [run.name for run in runs[1:]]
  data = tmp_path / "runs.jsonl"
  data.write_text(
    json.dumps({"name": "a", "v": 1}) + "\n\n" + json.dumps({"name": "a", "v": 2}) + "\n"
  )
  assert study.read_records(str(data)) == {"a": {"name": "a", "v": 2}}


def _record(name, batch=128, failed=None):
  """A record of the data file's shape, with figures that vary by run."""
  k = sum(map(ord, name)) % 50 / 100
  curve = [(s, 0.2 + k + s / 5000, s / 10) for s in (40, 80, 120)]
  probes = {"h": {"probe": 0.5 + k, "knn": 0.4 + k}, "z": {"probe": 0.3 + k, "knn": 0.2 + k}}
  return {
    "name": name,
    "command": f"python run.py --train_batch_size={batch}",
    "failed": failed,
    "knn_top1": 0.3 + k,
    "knn_curve": curve,
    "contrast_acc": [(120, 0.9 - k, 12.0)],
    "probes": probes,
    "linear_eval": {"h": {"top1": 0.6 + k}},
  }


def test_every_plot_is_drawn_and_small(tmp_path):
  records = {run.name: _record(run.name) for _, run in RUNS}
  records["temperature_0.05_nonorm"] = _record("temperature_0.05_nonorm", failed="error: diverged")
  for b in (32, 64, 256):
    records[f"batch_{b}"] = _record(f"batch_{b}", batch=b)
  paths = study_plots.draw(records, list(study.ABLATIONS), str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == sorted(
    f"{n}.png"
    for n in ("learning_curve", "composition", "head", "temperature", "batch", "colour_histograms")
  )
  for p in paths:
    assert 5_000 < os.path.getsize(p) < 200_000, p
  # Nothing to draw without records.
  assert study_plots.draw({}, ["head", "batch"], str(tmp_path)) == []
