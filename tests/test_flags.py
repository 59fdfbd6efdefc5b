"""The flags: every preset in flags/*.cfg parses and builds its config; each setting lives once."""

import collections
import copy
import dataclasses
import glob
import os

import pytest

from flags import definitions
import run
from tf_simclr import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "flags", "*.cfg")))
CONFIGS = (
  config_lib.DataConfig,
  config_lib.ModelConfig,
  config_lib.OptimConfig,
  config_lib.TrainConfig,
  config_lib.RuntimeConfig,
)
# Our flags, not absl's own (logging and the like).
OUR_FLAGS = sorted(f.name for f in definitions.FLAGS.flags_by_module_dict()[definitions.__name__])


def _explicit(path):
  """{flag name: text} of the `--name=value` lines of a flag file."""
  lines = [line.strip() for line in open(path)]
  pairs = [line[2:].partition("=") for line in lines if line.startswith("--")]
  return {name: text for name, _, text in pairs}


def _literal(text):
  """A flag file's value as Python reads the literal: independent of absl and of the flags'
  own types ("False" -> False, "1e-4" -> 0.0001, "0.25" -> 0.25, "10" -> 10)."""
  if text in ("True", "False"):
    return text == "True"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def _config_as_run_py_reads(path, model_dir):
  """The RunConfig `python run.py --flagfile=PATH` runs: absl's app.run parses the command line
  into run.FLAGS, then run.main calls definitions.to_config(FLAGS.flag_values_dict())."""
  flag_values = copy.deepcopy(run.FLAGS)  # run.py's flags, without touching the global ones
  flag_values.unparse_flags()
  assert flag_values(["run.py", f"--flagfile={path}"]) == ["run.py"]
  values = flag_values.flag_values_dict()
  if not values["model_dir"]:  # A preset for a cluster: model_dir comes on the command line.
    values["model_dir"] = model_dir
  return definitions.to_config(values)  # validates too


def _fields(cfg):
  return {
    f.name: getattr(part, f.name)
    for part in (cfg.data, cfg.model, cfg.optim, cfg.train, cfg.runtime)
    for f in dataclasses.fields(part)
  }


def test_presets_exist():
  names = [os.path.basename(p) for p in PRESETS]
  assert {"quickstart.cfg", "finetune.cfg", "linear_eval.cfg", "distill.cfg"} <= set(names)


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_builds_the_config_its_lines_say(path, tmp_path):
  fields = _fields(_config_as_run_py_reads(path, str(tmp_path)))
  explicit = _explicit(path)
  assert explicit, path
  # Every setting the file gives reaches the config, under the flag's name, with the value and
  # the type its text says (a bool flag read as a string would give "False"; a number, 1 for True).
  for name, text in explicit.items():
    want = _literal(text)
    got = fields[name]
    assert got == want and isinstance(got, bool) == isinstance(want, bool), (name, got, want)


def test_quickstart_preset_config():
  # The quick start's settings as README.md and docs/quickstart_design.md give them.
  cfg = _config_as_run_py_reads(os.path.join(ROOT, "flags", "quickstart.cfg"), "unused")
  assert (cfg.data.dataset, cfg.data.use_blur, cfg.model.image_size) == ("deadleaves10", False, 32)
  assert (cfg.model.resnet_depth, cfg.model.width_multiplier) == (10, 0.25)
  assert cfg.model.zero_init_residual is False and cfg.model.train_mode == "pretrain"
  assert (cfg.optim.optimizer, cfg.optim.learning_rate, cfg.train.temperature) == (
    "adam",
    0.02,
    0.1,
  )
  assert (cfg.train.train_batch_size, cfg.train.train_epochs) == (128, 16)
  assert cfg.train.mode == "train_then_eval"
  assert cfg.train.model_dir == "runs/quickstart"


def test_each_setting_lives_once_and_every_flag_has_a_home():
  owners = collections.Counter(f.name for cls in CONFIGS for f in dataclasses.fields(cls))
  assert [name for name, count in owners.items() if count > 1] == []
  # to_config picks fields by flag name: a flag without a field would be dropped silently.
  assert set(OUR_FLAGS) - set(owners) == set()
  assert set(owners) - set(OUR_FLAGS) == {"num_classes"}  # filled in by the run plan


def test_choices_are_the_library_s():
  from tf_simclr import augment  # pylint: disable=g-import-not-at-top
  from tf_simclr import distribute  # pylint: disable=g-import-not-at-top
  from tf_simclr import model as model_lib  # pylint: disable=g-import-not-at-top
  from tf_simclr import optimizers  # pylint: disable=g-import-not-at-top
  from tf_simclr import schedules  # pylint: disable=g-import-not-at-top

  flags = definitions.FLAGS
  for name, choices in [
    ("strategy", distribute.STRATEGIES),
    ("optimizer", optimizers.OPTIMIZERS),
    ("proj_head_mode", model_lib.PROJ_HEAD_MODES),
    ("train_mode", config_lib.TRAIN_MODES),
    ("mode", config_lib.MODES),
    ("learning_rate_scaling", schedules.LEARNING_RATE_SCALINGS),
    ("mixed_precision", config_lib.MIXED_PRECISION_POLICIES),
    ("crop_interpolation", augment.INTERPOLATIONS),
  ]:
    assert tuple(flags[name].parser.enum_values) == choices, name


@pytest.mark.parametrize("train_mode", ["pretrain", "finetune"])
def test_crop_interpolation_reaches_the_training_views(tmp_path, train_mode):
  from tf_simclr import trainer  # pylint: disable=g-import-not-at-top

  flagfile = tmp_path / "f.cfg"
  flagfile.write_text(f"--crop_interpolation=bilinear\n--train_mode={train_mode}\n")
  cfg = _config_as_run_py_reads(str(flagfile), str(tmp_path / "m"))
  assert cfg.data.crop_interpolation == "bilinear"
  assert trainer.augmentation(cfg)["crop_interpolation"] == "bilinear"  # train_dataset's argument


def test_integer_width_is_an_int_however_spelt():
  for width, want in [(2.0, 2), (1, 1), (0.25, 0.25)]:
    got = config_lib.ModelConfig(width_multiplier=width).width_multiplier
    assert got == want and type(got) is type(want), width


def _defaults(**changes):
  values = {name: definitions.FLAGS[name].default for name in definitions.FLAGS}
  values.update(model_dir="/tmp/m", **changes)
  return values


@pytest.mark.parametrize("hidden_norm", [True, False])
def test_temperature_bound_is_where_the_loss_stops_being_exact(hidden_norm):
  import numpy as np  # pylint: disable=g-import-not-at-top

  from tf_simclr import losses  # pylint: disable=g-import-not-at-top

  bound = config_lib.min_temperature(hidden_norm)
  # Without hidden_norm, rows small enough that h.h' / T is of order 1 at the bound.
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(8, 4)).astype(np.float32)
  if not hidden_norm:
    hidden = (np.sign(hidden) * 2e-19).astype(np.float32)
  above = bound * 1.05
  definitions.validate(_defaults(temperature=above, hidden_norm=hidden_norm))
  loss = float(losses.contrastive_loss(hidden, hidden_norm, above)[0])
  # NT-Xent in float64: each anchor against the other 2N - 1 rows, its own similarity left out.
  h = hidden.astype(np.float64)
  if hidden_norm:
    h /= np.linalg.norm(h, axis=1, keepdims=True)
  logits = h @ h.T / np.float64(np.float32(above))
  np.fill_diagonal(logits, -np.inf)
  n = len(h) // 2
  positive = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
  top = logits.max(axis=1)
  lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
  want = 2 * np.mean(lse - logits[np.arange(2 * n), positive])
  assert np.isfinite(loss) and loss == pytest.approx(want, rel=1e-4)
  with pytest.raises(ValueError, match=r"--temperature=.* is below .*hidden_norm"):
    definitions.validate(_defaults(temperature=bound * 0.95, hidden_norm=hidden_norm))
  # Further below, the float32 loss is no longer NT-Xent (the mask or 1/T fails).
  wrong = float(losses.contrastive_loss(hidden, hidden_norm, bound * 1e-3)[0])
  assert not wrong == pytest.approx(want * 1e3, rel=1e-2)


def test_few_negatives_warn_and_other_objectives_take_any_batch(caplog):
  definitions.validate(_defaults(train_batch_size=8))
  assert "only 14 negatives" in caplog.text
  caplog.clear()
  definitions.validate(_defaults(train_batch_size=16))
  definitions.validate(_defaults(train_batch_size=1, train_mode="finetune"))
  definitions.validate(_defaults(image_size=2048, strategy="one_device", cpu_replicas=1))
  assert "negatives" not in caplog.text


def test_flag_errors_do_not_import_tensorflow():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  code = (
    "import sys\n"
    "from flags import definitions\n"
    "v = {n: definitions.FLAGS[n].default for n in definitions.FLAGS}\n"
    "v.update(model_dir='/tmp/m', width_multiplier=0.001)\n"
    "try:\n"
    "  definitions.to_config(v)\n"
    "except ValueError as e:\n"
    "  assert 'round(64 * w) >= 1' in str(e), e\n"
    "v.update(width_multiplier=0.25)\n"
    "definitions.to_config(v)\n"
    "print('tensorflow' in sys.modules)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "False"
