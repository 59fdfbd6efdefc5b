"""Optimizer factory and the explicit L2 term of SimCLR.

Same choices as google-research/simclr `tf2/model.py` (`build_optimizer`,
`add_weight_decay`), with the flags turned into arguments.
"""

import keras
import tensorflow as tf

from tf_simclr import config
from tf_simclr import lars

OPTIMIZERS = config.OPTIMIZERS

# Regular expressions searched in variable paths: batch norm, biases and the
# supervised head get no LARS weight decay (and, by LARS' default, no layer
# adaptation). The supervised head's decay is added to the loss instead, see
# `explicit_weight_decay`.
LARS_EXCLUDE_FROM_WEIGHT_DECAY = ("batch_normalization", "bias", "head_supervised")


def build_optimizer(name, learning_rate, momentum=0.9, weight_decay=0.0):
  """Creates the optimizer called `name`.

  Args:
    name: 'momentum' (SGD with Nesterov momentum), 'adam' or 'lars'.
    learning_rate: float or `keras.optimizers.schedules.LearningRateSchedule`.
    momentum: momentum of 'momentum' and 'lars' (unused by 'adam').
    weight_decay: L2 coefficient applied by 'lars' itself; the other
      optimizers get theirs through `explicit_weight_decay` in the loss.

  Returns:
    A `keras.optimizers.Optimizer`.

  Raises:
    ValueError: for an unknown `name`.
  """
  if name == "momentum":
    # keras SGD insists on a float momentum.
    return keras.optimizers.SGD(learning_rate, momentum=float(momentum), nesterov=True)
  if name == "adam":
    return keras.optimizers.Adam(learning_rate)
  if name == "lars":
    return lars.LARS(
      learning_rate,
      momentum=momentum,
      weight_decay=weight_decay,
      exclude_from_weight_decay=list(LARS_EXCLUDE_FROM_WEIGHT_DECAY),
    )
  raise ValueError(f"optimizer name must be one of {OPTIMIZERS}, got {name!r}.")


_path = lars.variable_path  # what the exclusion patterns search, here as in LARS


def explicit_weight_decay(variables, weight_decay, optimizer_name):
  """The weight decay the optimizer does not apply itself, as an L2 term of the loss.

  The reference's `add_weight_decay`. LARS decays the non-BN, non-bias weights
  of encoder and projection head inside its update, so only the supervised
  head's kernel is left for the loss; momentum and Adam decay nothing
  themselves, so every trainable weight but batch norm's (biases included, as
  in the reference) is in the term.

  Args:
    variables: the model's trainable variables.
    weight_decay: float L2 coefficient.
    optimizer_name: the optimizer's name (see `build_optimizer`).

  Returns:
    A float32 scalar tensor, `weight_decay * sum(l2_loss(v))` with
    `l2_loss(v) = sum(v**2) / 2`, over: with LARS, the variables whose path
    contains 'head_supervised' and not 'bias'; otherwise, all trainable
    variables whose path does not contain 'batch_normalization'. 0.0 if no
    variable qualifies.
  """
  if "lars" in optimizer_name:
    chosen = [v for v in variables if "head_supervised" in _path(v) and "bias" not in _path(v)]
  else:
    chosen = [
      v
      for v in variables
      if getattr(v, "trainable", True) and "batch_normalization" not in _path(v)
    ]
  if not chosen:
    return tf.constant(0.0, tf.float32)
  l2 = tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in chosen])
  return tf.cast(weight_decay, tf.float32) * l2
