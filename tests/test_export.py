"""The reusable SavedModel: outputs, variables, fine-tuning without tf_simclr, strategies, dirs."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import export
from tf_simclr import model as model_lib
from tf_simclr.config import ModelConfig

# global_bn=True (the default) so that every export goes through the synchronized -> plain BN
# twin; train_mode="pretrain" so that the stop-gradient in front of the head is exercised too.
# A fractional width, which the manifest must record as it is to rebuild the model.
CONFIG = ModelConfig(resnet_depth=18, width_multiplier=0.25, image_size=16, num_classes=10)
WEIGHT_DECAY = 1e-4
TOL = dict(rtol=1e-5, atol=1e-5)


def _images(batch=4, seed=0):
  return tf.random.stateless_uniform([batch, 16, 16, 3], seed=[seed, 1])


def _perturb_batch_norm(model, seed):
  """Gives every BN non-trivial statistics and affine parameters.

  Fresh BN is the identity in inference (mean 0, variance 1) and the last BN of each residual
  branch has gamma = 0, which would hide weights that were not copied into the export.
  """
  rng = np.random.default_rng(seed)
  for v in model.weights:
    name = v.path.rsplit("/", 1)[-1]
    if name in ("gamma", "moving_variance"):
      v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
    elif name in ("beta", "moving_mean"):
      v.assign(rng.normal(0.0, 0.2, v.shape).astype(np.float32))


def _size(variables):
  return sum(int(np.prod(v.shape)) for v in variables)


def _numpy(outputs):
  return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  tf.keras.utils.set_random_seed(0)
  model = model_lib.build_model(CONFIG)
  _perturb_batch_norm(model, seed=0)
  images = _images()
  expected = _numpy(model(images, training=False))
  parent = tmp_path_factory.mktemp("export") / "saved_model"
  export_dir = export.export_saved_model(
    model, str(parent / "100"), weight_decay=WEIGHT_DECAY, optimizer_name="lars"
  )
  return types.SimpleNamespace(
    model=model,
    images=images,
    expected=expected,
    dir=export_dir,
    parent=str(parent),
    loaded=tf.saved_model.load(export_dir),
  )


def test_outputs_match_model(exported):
  assert os.listdir(exported.parent) == ["100"]  # no temporary directory left behind.
  # The manifest records the architecture, fractional width included, for rebuilding it.
  manifest = export.read_manifest(exported.dir)
  assert manifest["model_config"]["width_multiplier"] == exported.model.config.width_multiplier
  assert exported.model.config.width_multiplier == 0.25
  assert export.manifest_model_config(manifest) == dataclasses.replace(
    exported.model.config, global_bn=False, train_mode="finetune"
  )  # the twin's
  assert exported.loaded(exported.images)["final_avg_pool"].shape == (4, 128)  # 512 * 0.25
  default = _numpy(exported.loaded(exported.images))
  explicit = _numpy(exported.loaded(exported.images, training=False))
  assert set(default) == set(explicit) == set(model_lib.OUTPUTS)
  for name in model_lib.OUTPUTS:
    np.testing.assert_allclose(default[name], exported.expected[name], **TOL, err_msg=name)
    np.testing.assert_allclose(explicit[name], exported.expected[name], **TOL, err_msg=name)
  # Any batch and image size.
  other = tf.random.stateless_uniform([3, 24, 20, 3], seed=[5, 6])
  np.testing.assert_allclose(
    exported.loaded(other)["logits_sup"].numpy(),
    exported.model(other, training=False)["logits_sup"].numpy(),
    **TOL,
  )


def test_serving_signature(exported):
  serving = exported.loaded.signatures["serving_default"]
  assert list(serving.structured_input_signature[1]) == ["images"]
  out = serving(images=exported.images)
  assert set(out) == set(model_lib.OUTPUTS)
  np.testing.assert_allclose(
    out["final_avg_pool"].numpy(), exported.expected["final_avg_pool"], **TOL
  )


def test_variables_and_regularization(exported):
  model, loaded = exported.model, exported.loaded
  assert len(loaded.variables) == len(model.weights) == 121
  assert _size(loaded.variables) == _size(model.weights)
  assert len(loaded.trainable_variables) == len(model.trainable_weights) > 0
  assert _size(loaded.trainable_variables) == _size(model.trainable_weights)
  assert all(v.trainable for v in loaded.trainable_variables)
  assert sum(not v.trainable for v in loaded.variables) == len(model.non_trainable_weights)
  # LARS decays everything else itself: only the supervised head's kernel is in the loss.
  (l2_term,) = loaded.regularization_losses
  kernel = model.supervised_head.dense.kernel.numpy()
  np.testing.assert_allclose(l2_term().numpy(), WEIGHT_DECAY * np.sum(kernel**2) / 2, rtol=1e-5)


_FINE_TUNE_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    result = {}
    try:
      import tf_simclr  # noqa: F401
      result["tf_simclr_importable"] = True
    except ImportError:
      result["tf_simclr_importable"] = False

    data = np.load(sys.argv[2])
    obj = tf.saved_model.load(sys.argv[1])
    images, labels = tf.constant(data["images"]), tf.constant(data["labels"])
    out = obj(images, training=False)
    result["max_abs_diff"] = {k: float(np.max(np.abs(out[k].numpy() - data[k]))) for k in out}

    def loss_fn():
      out = obj(images, training=True)
      ce = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels,
                                                                         out["logits_sup"]))
      # logits_sup does not depend on the projection head g(.) past its selected layer; a
      # small term on its output gives those variables a gradient too.
      return ce + 1e-3 * tf.reduce_mean(tf.square(out["proj_head_output"]))

    # Which variables the cross-entropy alone trains. (A restored function's gradient is 0,
    # not None, for the variables an output does not depend on.)
    with tf.GradientTape() as tape:
      ce = tf.nn.sparse_softmax_cross_entropy_with_logits(
          labels, obj(images, training=True)["logits_sup"])
    result["ce_grads"] = sum(g is not None and float(tf.norm(g)) > 0
                             for g in tape.gradient(ce, obj.trainable_variables))

    moving = [v for v in obj.variables if not v.trainable]
    before = [v.numpy() for v in moving]
    losses = []
    for step in range(4):
      with tf.GradientTape() as tape:
        loss = loss_fn()
      grads = tape.gradient(loss, obj.trainable_variables)
      if step == 0:
        result["num_vars"] = len(grads)
        result["none_grads"] = sum(g is None for g in grads)
        result["nonfinite_grads"] = sum(
            not bool(tf.reduce_all(tf.math.is_finite(g))) for g in grads if g is not None)
        result["zero_grads"] = sum(float(tf.norm(g)) == 0.0 for g in grads if g is not None)
        result["stats_changed"] = sum(
            not np.array_equal(b, v.numpy()) for b, v in zip(before, moving))
        result["num_stats"] = len(moving)
      for g, v in zip(grads, obj.trainable_variables):
        v.assign_sub(0.1 * g)
      losses.append(float(loss))
    result["losses"] = losses
    print(json.dumps(result))
    """)


def test_fine_tune_without_tf_simclr(exported, tmp_path):
  labels = np.arange(4, dtype=np.int32)
  np.savez(
    tmp_path / "data.npz", images=exported.images.numpy(), labels=labels, **exported.expected
  )
  (tmp_path / "fine_tune.py").write_text(_FINE_TUNE_SCRIPT)
  # A clean environment, run from a directory where the repository is not on sys.path.
  env = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": str(tmp_path),
    "TF_CPP_MIN_LOG_LEVEL": "2",
  }
  proc = subprocess.run(
    [sys.executable, "fine_tune.py", os.path.abspath(exported.dir), "data.npz"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["tf_simclr_importable"] is False
  assert set(result["max_abs_diff"]) == set(model_lib.OUTPUTS)
  assert max(result["max_abs_diff"].values()) < 1e-4, result["max_abs_diff"]
  assert result["num_vars"] == len(exported.model.trainable_weights)
  assert result["none_grads"] == 0
  assert result["nonfinite_grads"] == 0
  assert result["zero_grads"] == 0
  # The pretraining stop-gradient in front of the head is not exported: logits_sup alone
  # trains the encoder and the head, everything but the projection head.
  model = exported.model
  assert (
    result["ce_grads"]
    == (len(model.trainable_weights) - len(model.projection_head.trainable_weights))
    == 65
  )
  # training=True updates every moving mean and variance.
  assert result["stats_changed"] == result["num_stats"] == len(model.non_trainable_weights)
  losses = result["losses"]
  assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_export_strategy_model_with_global_bn(strategies, tmp_path):
  strategy = strategies[2]
  with strategy.scope():
    tf.keras.utils.set_random_seed(1)
    # An integer width spelt as a float, as --width_multiplier gives it.
    model = model_lib.build_model(dataclasses.replace(CONFIG, width_multiplier=1.0))
    _perturb_batch_norm(model, seed=1)
  assert isinstance(model.weights[0].value, tf.distribute.DistributedValues)
  images = _images(seed=2)
  per_replica = strategy.run(lambda x: model(x, training=False), args=(images,))
  replicas = [_numpy(out) for out in strategy.experimental_local_results(per_replica)]
  assert len(replicas) == 2

  with strategy.scope(), pytest.raises(ValueError, match="outside"):
    export.export_saved_model(model, str(tmp_path / "inside"))
  assert not (tmp_path / "inside").exists()

  loaded = tf.saved_model.load(export.export_saved_model(model, str(tmp_path / "7")))
  # An integer width stays an integer, as the reference's configs have it.
  width = export.read_manifest(str(tmp_path / "7"))["model_config"]["width_multiplier"]
  assert width == 1 and isinstance(width, int)
  assert loaded.regularization_losses == []
  out = _numpy(loaded(images, training=False))
  for expected in replicas:
    for name in model_lib.OUTPUTS:
      np.testing.assert_allclose(out[name], expected[name], **TOL, err_msg=name)


def test_existing_dir_is_left_untouched(exported, tmp_path):
  target = tmp_path / "100"
  target.mkdir()
  (target / "keep.txt").write_text("previous export")
  with pytest.raises(FileExistsError, match="already exists"):
    export.export_saved_model(exported.model, str(target))
  assert os.listdir(tmp_path) == ["100"]
  assert os.listdir(target) == ["keep.txt"]
  assert (target / "keep.txt").read_text() == "previous export"


def test_prune_exports(tmp_path):
  for name in ("5", "10", "100", "20", "0050", "foo", "30.tmp-abc"):
    (tmp_path / name).mkdir()
  (tmp_path / "7").write_text("a file, not an export")
  assert export.prune_exports(str(tmp_path), 0) == []
  assert export.prune_exports(str(tmp_path / "missing"), 2) == []
  deleted = export.prune_exports(str(tmp_path), 2)
  assert [os.path.basename(p) for p in deleted] == ["5", "10", "20"]
  assert sorted(os.listdir(tmp_path)) == ["0050", "100", "30.tmp-abc", "7", "foo"]
  assert export.prune_exports(str(tmp_path), 2) == []
