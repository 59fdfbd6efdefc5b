"""LARS: layer-wise adaptive rate scaling (You, Gitman and Ginsburg, 2017).

A Keras 3 optimizer with the update rule of the SimCLR reference optimizer
(google-research/simclr `tf2/lars_optimizer.py`). For a variable `w` with
gradient `g`, momentum buffer `v`, learning rate `lr`:

  g <- g + weight_decay * w                      (unless excluded from decay)
  trust(x) = eeta * ||w|| / ||x||  if ||w|| > 0 and ||x|| > 0, else 1
                                                 (1 if excluded from adaptation)
  classic momentum (default):
    v <- momentum * v + lr * trust(g) * g
    w <- w - (momentum * v + lr * trust(g) * g   if nesterov else v)
  "popular" momentum (classic_momentum=False):
    v <- momentum * v + g
    u  = momentum * v + g                        if nesterov else v
    w <- w - lr * trust(u) * u

The weight decay is an L2 term coupled into the gradient (it is then scaled
by the trust ratio and momentum), not Keras' decoupled `weight_decay`.
"""

from __future__ import annotations

from collections.abc import Sequence
import re

import keras
import tensorflow as tf

EETA_DEFAULT = 0.001


def variable_path(variable):
  """The name that exclusion patterns are searched in: the Keras path.

  Keras 3 variables have `path`, e.g. "model/dense/kernel"; a raw
  `tf.Variable` only has `name`.
  """
  return getattr(variable, "path", None) or variable.name


@keras.saving.register_keras_serializable(package="tf_simclr")
class LARS(keras.optimizers.Optimizer):
  """Layer-wise Adaptive Rate Scaling, as in SimCLR.

  Works eagerly, inside `tf.function`, under `tf.distribute` strategies
  (gradients are summed across replicas by Keras' `apply_gradients` before
  `update_step`, so the trust ratio sees the global gradient) and wrapped by
  `keras.optimizers.LossScaleOptimizer`.
  """

  def __init__(
    self,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    momentum: float = 0.9,
    use_nesterov: bool = False,
    weight_decay: float = 0.0,
    exclude_from_weight_decay: Sequence[str] | None = None,
    exclude_from_layer_adaptation: Sequence[str] | None = None,
    classic_momentum: bool = True,
    eeta: float = EETA_DEFAULT,
    name: str = "LARS",
    **kwargs,
  ) -> None:
    """Creates the optimizer.

    Args:
      learning_rate: a float, or a
        `keras.optimizers.schedules.LearningRateSchedule` called with the
        optimizer's `iterations`.
      momentum: float momentum coefficient.
      use_nesterov: whether to use Nesterov momentum.
      weight_decay: float coefficient of the L2 term added to the gradient
        (`g + weight_decay * w`); 0 disables it.
      exclude_from_weight_decay: list of regular expressions; a variable whose
        full path (`variable.path`, e.g. "model/dense/bias") matches any of
        them (`re.search`) gets no weight decay. None: no exclusion.
      exclude_from_layer_adaptation: the same for the trust ratio (excluded
        variables use ratio 1). None means the same list as
        `exclude_from_weight_decay`, as in the reference.
      classic_momentum: True applies the (trust-scaled) learning rate inside
        the momentum update; False ("popular" momentum) accumulates raw
        gradients and scales the update afterwards.
      eeta: trust coefficient of the ratio `eeta * ||w|| / ||g||`.
      name: optimizer name.
      **kwargs: other `keras.optimizers.Optimizer` arguments (clipnorm,
        use_ema, loss_scale_factor, gradient_accumulation_steps, ...), except
        Keras' decoupled `weight_decay`, which this class replaces.
    """
    super().__init__(learning_rate=learning_rate, name=name, **kwargs)
    # The base class reads `weight_decay` as decoupled (AdamW-style) decay in
    # `_apply_weight_decay`; ours is the coupled L2 term, so that hook is
    # overridden to do nothing.
    self.weight_decay = weight_decay
    self.momentum = momentum
    self.use_nesterov = use_nesterov
    self.classic_momentum = classic_momentum
    self.eeta = eeta
    # Stored under private names: `exclude_from_weight_decay` is a method of
    # the Keras base class.
    self._wd_exclude = list(exclude_from_weight_decay or [])
    self._adapt_exclude_arg = exclude_from_layer_adaptation
    # Falsy (None or empty), like the reference: same list as weight decay.
    self._adapt_exclude = list(exclude_from_layer_adaptation or self._wd_exclude)

  def build(self, var_list: list[keras.Variable]) -> None:
    """Creates one momentum buffer per variable and resolves the exclusions.

    Exclusions are resolved here, once, because `update_step` receives the
    backend `tf.Variable` (per-replica component under a strategy), which has
    no Keras `path`.

    Args:
      var_list: the trainable (Keras) variables.
    """
    if self.built:
      return
    super().build(var_list)
    self.momentums = self.add_optimizer_variables(var_list, "momentum")
    self._decay_flags = []
    self._adapt_flags = []
    for variable in var_list:
      path = variable_path(variable)
      self._decay_flags.append(
        bool(self.weight_decay)
        and not any(re.search(r, path) for r in self._wd_exclude)
        # Also honour Keras' `optimizer.exclude_from_weight_decay(...)`.
        and super()._use_weight_decay(variable)
      )
      self._adapt_flags.append(not any(re.search(r, path) for r in self._adapt_exclude))

  def _apply_weight_decay(self, variables):
    # Decay is folded into the gradient in `update_step`; see __init__.
    del variables

  def _trust_ratio(self, w_norm, x_norm):
    """eeta * ||w|| / ||x||, or 1 when either norm is 0."""
    one = tf.ones_like(w_norm)
    # The division may give inf/nan in the branch that is not selected.
    return tf.where(w_norm > 0, tf.where(x_norm > 0, self.eeta * w_norm / x_norm, one), one)

  def update_step(
    self, gradient: tf.Tensor, variable: tf.Variable, learning_rate: tf.Tensor
  ) -> None:
    """Applies one LARS update to `variable` (called per variable/replica)."""
    index = self._get_variable_index(variable)
    dtype = variable.dtype
    # Sparse (IndexedSlices) gradients are densified: the norms need them all.
    grad = tf.cast(tf.convert_to_tensor(gradient), dtype)
    lr = tf.cast(learning_rate, dtype)
    momentum = tf.cast(self.momentum, dtype)
    v_var = self.momentums[index]
    v = tf.convert_to_tensor(v_var)
    w = tf.convert_to_tensor(variable)
    adapt = self._adapt_flags[index]

    if self._decay_flags[index]:
      grad = grad + tf.cast(self.weight_decay, dtype) * w

    if self.classic_momentum:
      if adapt:
        trust = self._trust_ratio(tf.norm(w), tf.norm(grad))
        scaled_lr = lr * trust
      else:
        scaled_lr = lr
      next_v = momentum * v + scaled_lr * grad
      if self.use_nesterov:
        update = momentum * next_v + scaled_lr * grad
      else:
        update = next_v
    else:
      next_v = momentum * v + grad
      if self.use_nesterov:
        update = momentum * next_v + grad
      else:
        update = next_v
      if adapt:
        trust = self._trust_ratio(tf.norm(w), tf.norm(update))
        update = lr * trust * update
      else:
        update = lr * update

    self.assign(v_var, next_v)
    self.assign_sub(variable, update)

  def get_config(self) -> dict:
    config = super().get_config()
    config.update(
      {
        "momentum": self.momentum,
        "use_nesterov": self.use_nesterov,
        "weight_decay": self.weight_decay,
        "exclude_from_weight_decay": list(self._wd_exclude) or None,
        "exclude_from_layer_adaptation": (
          list(self._adapt_exclude_arg) if self._adapt_exclude_arg else None
        ),
        "classic_momentum": self.classic_momentum,
        "eeta": self.eeta,
      }
    )
    return config
