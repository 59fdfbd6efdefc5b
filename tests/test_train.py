"""The real per-replica training step learns: it overfits one fixed batch."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_simclr import config as C
from tf_simclr import train


def test_step_learns_a_fixed_batch(tmp_path):
  # Contrastive accuracy on one repeated batch rises from chance to near 1 only if gradients
  # reach the encoder through the loss, the step applies them, and the pairs line up.
  cfg = C.RunConfig(
      C.DataConfig(dataset="synthetic", image_size=16),
      C.ModelConfig(resnet_depth=18, image_size=16, num_classes=4),
      C.OptimConfig(optimizer="adam", learning_rate=0.008, warmup_epochs=0, weight_decay=0.0),
      C.TrainConfig(model_dir=str(tmp_path), train_batch_size=32, train_steps=30,
                    checkpoint_steps=10, temperature=0.5),
      C.RuntimeConfig())
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  state = train.build_state(cfg, strategy, num_examples=32)
  trainer = train.Trainer(cfg, strategy, state)
  rng = np.random.default_rng(0)
  base = rng.uniform(size=(32, 16, 16, 3)).astype(np.float32)
  # View two keeps half of each image under fresh noise: random features barely pair them.
  other = 0.5 * base + 0.5 * rng.uniform(size=base.shape)
  views = np.stack([base, other.astype(np.float32)], axis=1)
  batch = {"views": tf.constant(views.astype(np.float32)),
           "label": tf.constant(np.arange(32) % 4, tf.int64), "id": tf.range(32, dtype=tf.int64)}
  iterator = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch).repeat()))
  first = {k: float(v) for k, v in trainer.run_loop(iterator, 1).items()}
  for _ in range(2):
    last = {k: float(v) for k, v in trainer.run_loop(iterator, 10).items()}
  assert int(state.optimizer.iterations.numpy()) == 21
  assert first["contrast_acc"] < 0.6
  assert last["contrast_acc"] > 0.9, last
  assert last["contrast_loss"] < first["contrast_loss"] - 1.0
  # The linear head learns the labels from stop-gradient features too.
  assert last["supervised_acc"] > 0.5, last


def _fixed_batch_run(tmp_path, policy, steps, jit_compile=False, strategy=None):
  """Contrastive losses of `steps` steps on one fixed batch under a Keras dtype policy."""
  import keras  # pylint: disable=g-import-not-at-top
  keras.mixed_precision.set_dtype_policy("float32" if policy == "none" else policy)
  try:
    cfg = C.RunConfig(
        C.DataConfig(dataset="synthetic", image_size=16),
        C.ModelConfig(resnet_depth=18, image_size=16, num_classes=4),
        C.OptimConfig(optimizer="adam", learning_rate=0.008, warmup_epochs=0,
                      weight_decay=0.0),
        C.TrainConfig(model_dir=str(tmp_path / policy), train_batch_size=16, train_steps=30,
                      checkpoint_steps=10, temperature=0.5),
        C.RuntimeConfig(mixed_precision=policy, jit_compile=jit_compile))
    strategy = strategy or tf.distribute.OneDeviceStrategy("/cpu:0")
    state = train.build_state(cfg, strategy, num_examples=16)
    trainer = train.Trainer(cfg, strategy, state)
  finally:
    keras.mixed_precision.set_dtype_policy("float32")
  rng = np.random.default_rng(1)
  base = rng.uniform(size=(16, 16, 16, 3)).astype(np.float32)
  other = (0.5 * base + 0.5 * rng.uniform(size=base.shape)).astype(np.float32)
  batch = {"views": tf.constant(np.stack([base, other], axis=1)),
           "label": tf.constant(np.arange(16) % 4, tf.int64), "id": tf.range(16, dtype=tf.int64)}
  iterator = iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors(batch).repeat()))
  losses = [float(trainer.run_loop(iterator, 1)["contrast_loss"]) for _ in range(steps)]
  return np.array(losses), state


def test_mixed_precision_trains_like_float32(tmp_path):
  # bfloat16 (TPU, this CPU) and float16 with loss scaling (GPU) compute the convolutions in
  # 16 bits; BN statistics, variables, the loss and the optimizer stay float32, so the loss
  # curve follows float32's closely (bf16 keeps 8 mantissa bits: ~0.4% per op).
  fp32, _ = _fixed_batch_run(tmp_path, "none", 6)
  bf16, state = _fixed_batch_run(tmp_path, "mixed_bfloat16", 6)
  assert fp32[-1] < fp32[0] - 1.0  # it learns, so the comparison is of two curves
  np.testing.assert_allclose(bf16, fp32, rtol=0.02)
  assert state.model.encoder.stem[0].dtype_policy.compute_dtype == "bfloat16"
  for v in state.model.variables + state.optimizer.variables:
    assert v.dtype not in ("bfloat16", "float16"), v.path
  fp16, state16 = _fixed_batch_run(tmp_path, "mixed_float16", 3)
  assert isinstance(state16.optimizer, keras.optimizers.LossScaleOptimizer)
  np.testing.assert_allclose(fp16, fp32[:3], rtol=0.02)


def test_jit_compile_refuses_mirrored_replicas(tmp_path):
  from conftest import mirrored  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="one replica per process"):
    _fixed_batch_run(tmp_path, "none", 1, jit_compile=True, strategy=mirrored(2))
