"""model_source.identify: what model is at a path, for each kind of source tf_simclr accepts.

References: the fixtures written by google-research/simclr's own code (tests/fixtures/reference,
see test_convert.py), whose outputs.npz records the config they were made with. Ours: a tiny
model (ResNet-18 at width 0.125) saved in-process as a checkpoint with a run's flags.json and as
an export. Each answer's config must be the one the source was made with; `restore` must put
the stored values back.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as C
from tf_simclr import export
from tf_simclr import model as model_lib
from tf_simclr import model_source
from tf_simclr.reference_arch import NotReferenceError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "reference")
# (path under a fixture, kind, step, prefix under the fixture)
REFERENCE_SOURCES = [
  ("init", model_source.REFERENCE_CHECKPOINT, 0, "init/ckpt-0"),  # a model_dir: its newest
  ("trained/ckpt-3", model_source.REFERENCE_CHECKPOINT, 3, "trained/ckpt-3"),
  ("trained/ckpt-3.index", model_source.REFERENCE_CHECKPOINT, 3, "trained/ckpt-3"),
  ("saved_model", model_source.REFERENCE_SAVED_MODEL, 0, "saved_model/variables/variables"),
]
# Not the defaults anywhere it could be: a wrong field read would show.
OURS = C.ModelConfig(
  resnet_depth=18,
  width_multiplier=0.125,
  image_size=16,
  se_ratio=0.25,
  proj_out_dim=24,
  num_proj_layers=2,
  ft_proj_selector=1,
  num_classes=3,
  train_mode="finetune",
  global_bn=False,
)


@pytest.mark.parametrize("name", ["r18_w0.125_32px", "r50_sk0.0625_w0.125_64px"])
def test_reference_sources_give_the_config_they_were_made_with(name):
  made = json.loads(str(np.load(os.path.join(FIXTURES, name, "outputs.npz"))["config"]))
  for path, kind, step, prefix in REFERENCE_SOURCES:
    source = model_source.identify(os.path.join(FIXTURES, name, path), "--checkpoint")
    assert (source.kind, source.step, source.is_reference) == (kind, step, True), path
    assert source.prefix == os.path.join(FIXTURES, name, prefix)
    assert source.image_size is None  # the reference records only its stem
    found = source.config
    assert (
      found.resnet_depth,
      found.width_multiplier,
      found.sk_ratio,
      found.se_ratio,
      found.use_cifar_stem,
      found.proj_head_mode,
      found.num_proj_layers,
      found.proj_out_dim,
      found.ft_proj_selector,
      found.num_classes,
    ) == (
      made["resnet_depth"],
      made["width_multiplier"],
      made["sk_ratio"],
      made["se_ratio"],
      made["image_size"] <= 32,
      made["proj_head_mode"],
      made["num_proj_layers"],
      made["proj_out_dim"],
      made["ft_proj_selector"],
      made["num_classes"],
    ), path
    # The converter's call (references only) gives the same answer.
    assert model_source.identify(os.path.join(FIXTURES, name, path)) == source


def _distinct_weights(model, seed):
  for i, v in enumerate(model.weights):  # distinct values everywhere, BN statistics included
    v.assign(tf.random.stateless_uniform(v.shape, [seed, i], 0.1, 0.2, dtype=v.dtype))


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
  """(model, run directory with ckpt-2, ckpt-5 and flags.json, its export of step 5, another
  model of its config to restore into)."""
  run = tmp_path_factory.mktemp("run")
  model = model_lib.build_model(OURS)
  manager = tf.train.CheckpointManager(
    tf.train.Checkpoint(model=model), str(run), 3, checkpoint_name="ckpt"
  )
  manager.save(checkpoint_number=2)
  _distinct_weights(model, 5)
  manager.save(checkpoint_number=5)
  # As run.py writes it: flag values, some of no ModelConfig, and no num_classes.
  flags = {k: v for k, v in dataclasses.asdict(OURS).items() if k != "num_classes"}
  (run / "flags.json").write_text(json.dumps(dict(flags, learning_rate=0.1, dataset="shapes10")))
  export_dir = str(run / "saved_model" / "5")
  export.export_saved_model(model, export_dir)
  return model, str(run), export_dir, model_lib.build_model(OURS)


def _assert_restores(source, ours):
  want, fresh = ours[0], ours[3]
  _distinct_weights(fresh, 9)
  model_source.restore(fresh, source)
  for a, b in zip(want.weights, fresh.weights):
    np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_our_checkpoint_spelt_every_way_gives_its_config(ours):
  run = ours[1]
  prefix = os.path.join(run, "ckpt-5")
  for path in (run, prefix, prefix + ".index", prefix + ".data-00000-of-00001"):
    source = model_source.identify(path, "--checkpoint")
    assert (source.kind, source.prefix, source.step) == ("checkpoint", prefix, 5), path
    assert source.config == OURS and source.image_size == 16 and not source.is_reference
  _assert_restores(source, ours)
  earlier = model_source.identify(os.path.join(run, "ckpt-2"), "--checkpoint")
  assert (earlier.step, earlier.config) == (2, OURS)


def test_our_export_gives_its_config(ours):
  export_dir = ours[2]
  source = model_source.identify(export_dir, "--teacher_checkpoint")
  assert (source.kind, source.step, source.config) == ("export", 5, OURS)
  assert source.prefix == os.path.join(export_dir, "variables", "variables")
  _assert_restores(source, ours)


def test_what_a_checkpoint_does_not_tell_is_said_when_needed(ours, tmp_path):
  run = ours[1]
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in os.listdir(run):  # the checkpoints without flags.json
    if name.startswith(("ckpt-5", "checkpoint")):
      tf.io.gfile.copy(os.path.join(run, name), str(bare / name))
  source = model_source.identify(str(bare), "--teacher_checkpoint")
  assert source.config is None and source.kind == "checkpoint"
  assert source.unknown == (
    f"teacher checkpoint {bare}/ckpt-5 has no flags.json beside it to tell its architecture; "
    "give its exported SavedModel (model_dir/saved_model/<step>)"
  )
  _assert_restores(source, ours)  # --checkpoint needs only the weights
  # A model without a supervised head (`model/supervised_head`): 0 classes.
  headless = tf.Module()
  headless.encoder = tf.Module()
  headless.encoder.kernel = tf.Variable(tf.zeros([3, 3]))
  tf.train.Checkpoint(model=headless).write(str(tmp_path / "headless" / "ckpt-1"))
  flags = dataclasses.asdict(OURS)
  (tmp_path / "headless" / "flags.json").write_text(json.dumps(flags))
  found = model_source.identify(str(tmp_path / "headless" / "ckpt-1"), "--checkpoint").config
  assert found == dataclasses.replace(OURS, num_classes=0)


def test_bad_paths_keep_their_one_line_messages(ours, tmp_path):
  _, run, export_dir, _ = ours
  (tmp_path / "empty").mkdir()
  missing, empty = str(tmp_path / "none"), str(tmp_path / "empty")
  also = "an exported SavedModel, model_dir/saved_model/<step>"
  cases = [
    (
      missing,
      "--checkpoint",
      ValueError,
      f"--checkpoint={missing} does not exist (expected a "
      "checkpoint prefix such as model_dir/ckpt-1000, a directory holding checkpoints)",
    ),
    (
      missing,
      "--teacher_checkpoint",
      ValueError,
      f"--teacher_checkpoint={missing} does not exist "
      f"(expected a checkpoint prefix such as model_dir/ckpt-1000, a directory holding "
      f"checkpoints, or {also})",
    ),
    (
      empty,
      "--checkpoint",
      ValueError,
      f"--checkpoint={empty} is a directory without a checkpoint",
    ),
    (
      empty,
      "--teacher_checkpoint",
      ValueError,
      f"--teacher_checkpoint={empty} is a directory without a checkpoint (nor {also})",
    ),
    (
      missing,
      None,
      NotReferenceError,
      f"{missing} does not exist (expected a reference checkpoint "
      "prefix such as model_dir/ckpt-1000, a model_dir, or a reference SavedModel)",
    ),
    (
      empty,
      None,
      NotReferenceError,
      f"{empty} is a directory with neither a checkpoint nor a SavedModel",
    ),
    (
      run,
      None,
      NotReferenceError,
      f"{run} is not a google-research/simclr checkpoint or "
      "SavedModel (its object graph has no model/resnet_model/block_groups); it is tf_simclr's "
      "own: use it as it is",
    ),
    (export_dir, None, NotReferenceError, "; it is tf_simclr's own: use it as it is"),
  ]
  for path, flag, error, message in cases:
    with pytest.raises(error) as err:
      model_source.identify(path, flag)
    assert type(err.value) is error and message in str(err.value), (path, flag)
    assert "\n" not in str(err.value)
  # A damaged checkpoint: the converter refuses it; a run's --checkpoint says so at restore.
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "ckpt-1.index").write_bytes(b"not an sstable")
  with pytest.raises(NotReferenceError, match=re.escape(f"{broken}/ckpt-1 is unreadable (")):
    model_source.identify(str(broken / "ckpt-1"))
  source = model_source.identify(str(broken / "ckpt-1"), "--checkpoint")
  assert source.kind == "checkpoint" and source.config is None
