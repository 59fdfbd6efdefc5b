"""The real per-replica training step learns: it overfits one fixed batch."""
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
