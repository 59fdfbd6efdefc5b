"""What a run trains: `build_state` creates the model, optimizer, learning-rate schedule and
checkpoint manager under the strategy's scope, and resumes or initialises them (`TrainState`).

run.py calls `build_state` for training and evaluation; `train.train`, `trainer.Trainer`,
`knn.knn_monitor` and the evaluation read the state.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import distill
from tf_simclr import knn
from tf_simclr import model as model_lib
from tf_simclr import model_source
from tf_simclr import optimizers
from tf_simclr import schedules
from tf_simclr.config import RunConfig


@dataclasses.dataclass
class TrainState:
  """What the loop and the evaluation share: built under the strategy's scope."""

  model: model_lib.SimCLRModel
  optimizer: keras.optimizers.Optimizer
  learning_rate: schedules.WarmUpAndCosineDecay
  checkpoint: tf.train.Checkpoint
  manager: tf.train.CheckpointManager
  total_steps: int
  steps_per_loop: int
  # Distillation's teacher (inference only, not in the checkpoint); None otherwise.
  teacher: model_lib.SimCLRModel | None = None
  # The run's kNN monitor (`knn.knn_monitor`), made at its first use; it keeps its last
  # (step, result), so the evaluation at that step need not redo it.
  knn: knn.KnnMonitor | None = None
  # The signal that stopped training early ('SIGTERM', 'SIGINT'), set by `train`.
  stopped_by: str | None = None


def init_weights(model: model_lib.SimCLRModel, path: str, new_head: bool = False) -> None:
  """Initialises `model` from a tf_simclr checkpoint (prefix or directory) or exported SavedModel,
  or a google-research/simclr checkpoint or SavedModel (converted in memory): `model_source`.

  `new_head` (`--zero_init_logits_layer`): a reference model's supervised head is not read, so
  its number of classes may differ.

  Raises:
    ValueError: nothing readable at `path`; checkpoints.CheckpointMismatchError (a ValueError)
      when it holds another model.
  """
  model_source.restore(model, model_source.identify(path, "--checkpoint"), new_head=new_head)


def build_state(
  cfg: RunConfig, strategy: tf.distribute.Strategy, num_examples: int, is_chief: bool = True
) -> TrainState:
  """Creates model, optimizer and checkpoint manager under `strategy.scope()` and restores.

  Resumes from the newest restorable checkpoint in `model_dir`; otherwise initialises from
  `cfg.train.checkpoint` (weights only: a checkpoint or an exported SavedModel) when given.
  Distillation also builds and restores the teacher (`cfg.train.teacher_checkpoint`). With
  `cfg.train.mode == "eval"` nothing is restored: the evaluation loop restores each checkpoint.
  Fails (ValueError) when fine-tuning has nothing to start from, when a checkpoint does not fit
  the model asked for, or when the teacher is unusable or predicts another number of classes.
  """
  t = cfg.train
  total_steps, steps_per_loop = _step_counts(cfg, num_examples)
  with strategy.scope():
    # Initial weights depend on the seed alone: Keras draws initializer seeds from global RNG
    # state, which creating a strategy or a dataset may have advanced by a different amount.
    keras.utils.set_random_seed(t.seed)
    model = model_lib.build_model(cfg.model)
    learning_rate, optimizer = _build_optimizer(cfg, model, num_examples)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    directory = t.model_dir if is_chief else checkpoints.worker_dir(t.model_dir)
    manager = tf.train.CheckpointManager(
      checkpoint, directory=directory, max_to_keep=t.keep_checkpoint_max, checkpoint_name="ckpt"
    )
    _restore_or_initialise(cfg, model, checkpoint, manager)
    teacher = _teacher(cfg)
  return TrainState(
    model,
    optimizer,
    learning_rate,
    checkpoint,
    manager,
    total_steps,
    steps_per_loop,
    teacher,
  )


def _step_counts(cfg: RunConfig, num_examples: int) -> tuple[int, int]:
  """(steps of the run, steps between checkpoints and summaries)."""
  t = cfg.train
  total_steps = schedules.get_train_steps(
    num_examples, t.train_epochs, t.train_batch_size, t.train_steps
  )
  epoch_steps = max(1, int(round(num_examples / t.train_batch_size)))
  steps_per_loop = t.checkpoint_steps or t.checkpoint_epochs * epoch_steps  # as the reference
  return total_steps, max(1, steps_per_loop)


def _build_optimizer(cfg: RunConfig, model: model_lib.SimCLRModel, num_examples: int):
  """(learning-rate schedule, optimizer), the optimizer's slots built for `model`."""
  t = cfg.train
  learning_rate = schedules.WarmUpAndCosineDecay(
    cfg.optim.learning_rate,
    num_examples,
    t.train_batch_size,
    cfg.optim.warmup_epochs,
    t.train_epochs,
    t.train_steps,
    cfg.optim.learning_rate_scaling,
  )
  optimizer = optimizers.build_optimizer(
    cfg.optim.optimizer,
    learning_rate,
    momentum=cfg.optim.momentum,
    weight_decay=cfg.optim.weight_decay,
  )
  if cfg.runtime.mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
  # Slots exist before restoring, so a checkpoint's optimizer state has somewhere to go.
  optimizer.build(model.trainable_variables)
  return learning_rate, optimizer


def _restore_or_initialise(
  cfg: RunConfig,
  model: model_lib.SimCLRModel,
  checkpoint: tf.train.Checkpoint,
  manager: tf.train.CheckpointManager,
) -> None:
  """Resumes from model_dir's newest restorable checkpoint, else initialises from --checkpoint.

  Raises:
    ValueError: fine-tuning has neither; a checkpoint does not fit the model.
  """
  t = cfg.train
  # An eval job beside a training job must not touch (set aside) checkpoints being pruned.
  if t.mode == "eval" or checkpoints.restore_latest(checkpoint, manager, t.model_dir):
    return
  if t.checkpoint:
    init_weights(model, t.checkpoint, new_head=t.zero_init_logits_layer)
    if t.zero_init_logits_layer and model.supervised_head is not None:
      model.zero_init_supervised_head()
  elif cfg.model.train_mode == "finetune":
    raise ValueError(
      "train_mode=finetune needs --checkpoint (a pretrained checkpoint or "
      f"SavedModel) or a checkpoint of its own in model_dir={t.model_dir}"
    )


def _teacher(cfg: RunConfig) -> model_lib.SimCLRModel | None:
  """Distillation's teacher, restored and checked against the student's classes; else None."""
  t = cfg.train
  if cfg.model.train_mode != "distill" or t.mode == "eval":
    return None
  teacher = distill.load_teacher(t.teacher_checkpoint)
  distill.check_classes(teacher.config, cfg.model.num_classes, t.teacher_checkpoint)
  return teacher
