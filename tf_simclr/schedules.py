"""Training length and learning-rate schedule of SimCLR.

Semantics follow google-research/simclr `tf2/model.py` (`get_train_steps`,
`WarmUpAndCosineDecay`), with the flags turned into explicit arguments.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from tf_simclr import config

LEARNING_RATE_SCALINGS = config.LEARNING_RATE_SCALINGS


def get_train_steps(
  num_examples: int, train_epochs: float, train_batch_size: int, train_steps: int = 0
) -> int:
  """Number of optimizer steps of a run.

  Args:
    num_examples: examples in one epoch of the training split.
    train_epochs: number of epochs; used when `train_steps` is 0.
    train_batch_size: global batch size (examples per step).
    train_steps: if non-zero, the answer.

  Returns:
    An int: `train_steps`, or `num_examples * train_epochs // batch + 1` (the
    reference's count, one more than the whole batches in the epochs).
  """
  return int(train_steps or num_examples * train_epochs // train_batch_size + 1)


def scaled_learning_rate(base_learning_rate: float, batch_size: int, scaling: str) -> float:
  """The peak learning rate for a global batch size.

  Args:
    base_learning_rate: float; per 256 examples for 'linear' scaling.
    batch_size: global batch size B.
    scaling: 'linear' (`base * B / 256`, Goyal et al.) or 'sqrt'
      (`base * sqrt(B)`, the paper's choice for LARS with small batches).

  Returns:
    A Python float.

  Raises:
    ValueError: for another `scaling`.
  """
  if scaling == "linear":
    return base_learning_rate * batch_size / 256.0
  if scaling == "sqrt":
    return base_learning_rate * math.sqrt(batch_size)
  raise ValueError(
    f"learning_rate_scaling must be one of {LEARNING_RATE_SCALINGS}, got {scaling!r}."
  )


@keras.saving.register_keras_serializable(package="tf_simclr")
class WarmUpAndCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
  """Linear warm-up from 0 to the scaled learning rate, then cosine to 0.

  With `peak = scaled_learning_rate(base, B, scaling)`,
  `W = warmup_steps` and `T = total_steps`:

    lr(s) = peak * s / W                                   for s < W
    lr(s) = peak * 0.5 * (1 + cos(pi * min(s - W, T - W) / (T - W)))  otherwise

  so lr(0) = 0, lr(W) = peak and lr(T) = 0. With W = 0 there is no warm-up;
  with T <= W the rate after warm-up is 0.
  """

  def __init__(
    self,
    base_learning_rate: float,
    num_examples: int,
    train_batch_size: int,
    warmup_epochs: float,
    train_epochs: float,
    train_steps: int = 0,
    learning_rate_scaling: str = "linear",
    name: str | None = None,
  ) -> None:
    """Creates the schedule.

    Args:
      base_learning_rate: learning rate before batch-size scaling.
      num_examples: training examples per epoch.
      train_batch_size: global batch size.
      warmup_epochs: epochs of linear warm-up (may be fractional).
      train_epochs: epochs of training; ignored if `train_steps` is set.
      train_steps: total steps, overriding `train_epochs` when non-zero.
      learning_rate_scaling: 'linear' or 'sqrt', see `scaled_learning_rate`.
      name: optional name scope.
    """
    super().__init__()
    self.base_learning_rate = base_learning_rate
    self.num_examples = num_examples
    self.train_batch_size = train_batch_size
    self.warmup_epochs = warmup_epochs
    self.train_epochs = train_epochs
    self.train_steps = train_steps
    self.learning_rate_scaling = learning_rate_scaling
    self.name = name
    # Validated here so that a bad value fails at construction.
    self.peak_learning_rate = scaled_learning_rate(
      base_learning_rate, train_batch_size, learning_rate_scaling
    )
    # The reference's exact expression (floor division, then round).
    self.warmup_steps = int(round(warmup_epochs * num_examples // train_batch_size))
    self.total_steps = get_train_steps(num_examples, train_epochs, train_batch_size, train_steps)

  def __call__(self, step: tf.types.experimental.TensorLike) -> tf.Tensor:
    """The learning rate at `step` (any int or float scalar), float32 scalar."""
    with tf.name_scope(self.name or "WarmUpAndCosineDecay"):
      step = tf.cast(step, tf.float32)
      peak = tf.constant(self.peak_learning_rate, tf.float32)
      warmup_steps = float(self.warmup_steps)
      decay_steps = float(self.total_steps - self.warmup_steps)
      if self.warmup_steps:
        warmup_lr = peak * step / warmup_steps
      else:
        warmup_lr = peak
      if decay_steps > 0:
        # Keras CosineDecay(peak, decay_steps, alpha=0) at s = step - W:
        # peak * 0.5 * (1 + cos(pi * min(s, decay_steps) / decay_steps)).
        progress = tf.minimum(step - warmup_steps, decay_steps) / decay_steps
        decay_lr = peak * 0.5 * (1.0 + tf.cos(math.pi * progress))
      else:
        # No room for decay (T <= W): the reference would divide by 0.
        decay_lr = tf.zeros_like(peak)
      return tf.where(step < warmup_steps, warmup_lr, decay_lr)

  def get_config(self) -> dict:
    return {
      "base_learning_rate": self.base_learning_rate,
      "num_examples": self.num_examples,
      "train_batch_size": self.train_batch_size,
      "warmup_epochs": self.warmup_epochs,
      "train_epochs": self.train_epochs,
      "train_steps": self.train_steps,
      "learning_rate_scaling": self.learning_rate_scaling,
      "name": self.name,
    }
