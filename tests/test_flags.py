"""The flags: every preset in flags/*.cfg parses and builds its config; each setting lives once."""

import collections
import copy
import dataclasses
import glob
import os

import pytest

from flags import definitions
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


def test_presets_exist():
  names = [os.path.basename(p) for p in PRESETS]
  assert {"quickstart.cfg", "finetune.cfg", "linear_eval.cfg", "distill.cfg"} <= set(names)


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_parses_and_builds_its_config(path, tmp_path):
  flag_values = copy.deepcopy(definitions.FLAGS)  # absl's parsing, without touching FLAGS
  flag_values.unparse_flags()
  assert flag_values(["run.py", f"--flagfile={path}"]) == ["run.py"]
  values = flag_values.flag_values_dict()
  if not values["model_dir"]:  # A preset for a cluster: model_dir comes on the command line.
    values["model_dir"] = str(tmp_path)
  cfg = definitions.to_config(values)  # validates too
  # Every setting the file gives reaches the config, under the flag's name.
  fields = {
    f.name: getattr(part, f.name)
    for part in (cfg.data, cfg.model, cfg.optim, cfg.train, cfg.runtime)
    for f in dataclasses.fields(part)
  }
  explicit = _explicit(path)
  assert explicit, path
  for name in explicit:
    assert fields[name] == values[name], name
    assert values[name] == flag_values[name].parser.parse(explicit[name]), name


def test_each_setting_lives_once_and_every_flag_has_a_home():
  owners = collections.Counter(f.name for cls in CONFIGS for f in dataclasses.fields(cls))
  assert [name for name, count in owners.items() if count > 1] == []
  # to_config picks fields by flag name: a flag without a field would be dropped silently.
  assert set(OUR_FLAGS) - set(owners) == set()
  assert set(owners) - set(OUR_FLAGS) == {"num_classes"}  # filled in by the run plan


def test_choices_are_the_library_s():
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
  ]:
    assert tuple(flags[name].parser.enum_values) == choices, name


def test_integer_width_is_an_int_however_spelt():
  for width, want in [(2.0, 2), (1, 1), (0.25, 0.25)]:
    got = config_lib.ModelConfig(width_multiplier=width).width_multiplier
    assert got == want and type(got) is type(want), width
