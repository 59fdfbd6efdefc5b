"""One optimisation step: `Trainer` runs one configuration's per-replica step under a strategy.

It turns a replica's batch into the model's images (`step_images`), runs the forward and
backward pass on the objective (`objective.compute_losses`), applies the gradients, and runs
several steps in one tf.function; `input_fn` feeds it. `train.train` drives it; benchmarks and
tests build one directly. `augmentation` and `view_examples` say how the training views look.

The step is written for one replica (its share of the global batch); `strategy.run` appears
only in the multi-step loop. The loss is divided by the number of replicas because gradients
are summed across replicas when they are applied, so the applied gradient is that of the global
mean.
"""

from __future__ import annotations

import functools

import keras
import tensorflow as tf

from tf_simclr import augment
from tf_simclr import data_service
from tf_simclr import distribute
from tf_simclr import objective
from tf_simclr.config import RunConfig
from tf_simclr.data import pipeline
from tf_simclr.data import sources
from tf_simclr.train_state import TrainState


def num_views(train_mode: str) -> int:
  """Two augmented views per example when pretraining, one when fine-tuning."""
  return 2 if train_mode == "pretrain" else 1


def augmentation(cfg: RunConfig) -> dict:
  """The augmentation of the run's training views (`pipeline.train_dataset` arguments).

  Pretraining: two views with colour jitter and blur; fine-tuning and distillation: one view,
  cropped and flipped only (as the reference).
  """
  pretrain = cfg.model.train_mode == "pretrain"
  return dict(
    num_views=num_views(cfg.model.train_mode),
    color_jitter_strength=cfg.data.color_jitter_strength if pretrain else 0.0,
    use_blur=cfg.data.use_blur and pretrain,
    min_scale=cfg.data.min_scale,
    horizontal_flip=cfg.data.horizontal_flip,
    crop_interpolation=cfg.data.crop_interpolation,
  )


def view_examples(cfg: RunConfig, source: sources.Source, num_examples: int = 4) -> dict:
  """The first examples of the run's first step as it trains on them, to look at (TensorBoard).

  The global stream does not depend on the batch size, so these are exactly step 0's views.

  Returns:
    {'images': float32 [V k, s, s, 3] (example i's views at rows V i .. V i + V - 1; V = 2
     when pretraining, else 1), 'id': int64 [k]}, k = min(num_examples, source.num_examples).
  """
  k, s = min(num_examples, source.num_examples), cfg.model.image_size
  aug = augmentation(cfg)
  batch = next(iter(pipeline.train_dataset(source, k, k, 1, 0, cfg.train.seed, s, **aug)))
  return {"images": tf.reshape(batch["views"], [-1, s, s, 3]), "id": batch["id"]}


def crop_views(batch, image_size: int, interpolation: str = "bicubic") -> dict:
  """With --augment_on_device off a TPU, the step crops: a batch of source images and boxes ->
  the batch as `augment.crop_view` would have made it, for `step_images`.

  Args:
    batch: {'image': uint8 [b, H, W, 3], 'distort': `augment.BOX_SIGNATURE`, each [b, V, ...],
      'label', 'id'}; a batch without 'image' is returned as it is.
    image_size: s, the side of the views.
    interpolation: the crops' resize (`--crop_interpolation`).
  Returns:
    the batch with 'views' float32 [b, V, s, s, 3] (crops, not yet flipped) for 'image'.
  """
  if "image" not in batch:
    return batch
  batch = dict(batch)
  images, params = batch.pop("image"), batch["distort"]
  num_views = params["begin"].shape[1]
  boxes = [{k: params[k][:, v] for k in ("begin", "size")} for v in range(num_views)]
  crops = [augment.crop_batch(images, b, image_size, image_size, interpolation) for b in boxes]
  batch["views"] = tf.stack(crops, axis=1)
  return batch


def step_images(batch, color_jitter_strength: float = 1.0, use_blur: bool = True):
  """A replica's batch as the model takes it: (images [V*b, H, W, 3], labels int64 [V*b]).

  Rows are view-major (0..b-1 view one, b..2b-1 view two), as the contrastive loss expects.
  With --augment_on_device, 'views' are crops and 'distort' their parameters, each [b, V, ...]:
  the flip, colour jitter, grayscale and blur run here, in the step, on the accelerator.
  """
  views = batch["views"]
  v = views.shape[1]

  def view_major(x):  # [b, V, ...] -> [V*b, ...]
    x = tf.convert_to_tensor(x)
    perm = [1, 0] + list(range(2, x.shape.rank))
    return tf.reshape(tf.transpose(x, perm), [-1] + x.shape[2:].as_list())

  images = view_major(views)
  if "distort" in batch:
    params = {k: view_major(p) for k, p in batch["distort"].items()}
    images = augment.distort_batch(images, params, color_jitter_strength, use_blur)
  return images, tf.tile(batch["label"], [v])


class Trainer:
  """Runs training steps of one configuration under one strategy."""

  def __init__(self, cfg: RunConfig, strategy: tf.distribute.Strategy, state: TrainState):
    self.cfg = cfg
    self.strategy = strategy
    self.state = state
    self.num_replicas = strategy.num_replicas_in_sync
    self.pretrain = cfg.model.train_mode == "pretrain"
    self.distill = cfg.model.train_mode == "distill"
    if self.distill and (state.teacher is None or state.model.supervised_head is None):
      raise ValueError("train_mode=distill needs a teacher and a student with a supervised head")
    self.has_sup_head = state.model.supervised_head is not None
    self.metric_names = ["total_loss", "weight_decay"]
    if self.pretrain:
      self.metric_names += ["contrast_loss", "contrast_acc", "contrast_entropy"]
    if self.has_sup_head:
      self.metric_names += ["supervised_loss", "supervised_acc"]
    if self.distill:
      self.metric_names += ["distill_loss", "teacher_agreement"]
    aug = augmentation(cfg)
    self.color_jitter_strength, self.use_blur = aug["color_jitter_strength"], aug["use_blur"]
    jit = cfg.runtime.jit_compile
    if jit and self.num_replicas > 1 and not isinstance(strategy, tf.distribute.TPUStrategy):
      # XLA cannot compile the cross-replica all-reduce (BN) and all-gather (loss) of the
      # mirrored strategies into the step; TPUStrategy compiles the whole step anyway.
      raise ValueError(
        "--jit_compile needs one replica per process (or a TPU, which always "
        f"compiles); this run has {self.num_replicas}"
      )
    self._gradients = (
      tf.function(self.compute_gradients, jit_compile=True, autograph=False)
      if jit
      else self.compute_gradients
    )
    # Traced as written (graph control flow is explicit throughout tf_simclr): AutoGraph's
    # source rewrite of the ~45 functions a run traces cost each process ~2.4 s of start-up.
    self._loop = tf.function(self._train_loop, autograph=False)

  def input_fn(self, source: sources.Source, start_step: int):
    """The `distribute_datasets_from_function` argument feeding this step from `start_step`."""
    t, data = self.cfg.train, self.cfg.data
    build = pipeline.train_dataset
    if self.cfg.runtime.data_service:  # a tf.data service's workers make the examples
      job = data_service.job_name(t.model_dir, start_step)
      build = functools.partial(
        data_service.train_dataset, service=self.cfg.runtime.data_service, job=job
      )
    make_dataset = functools.partial(
      build,
      source,
      global_batch_size=t.train_batch_size,
      seed=t.seed,
      image_size=self.cfg.model.image_size,
      start_step=start_step,
      cache=data.cache_dataset,
      augment_on_device=self.cfg.runtime.augment_on_device,
      # A TPU needs static input shapes; the source images differ in size.
      crop_on_device=not isinstance(self.strategy, tf.distribute.TPUStrategy),
      **augmentation(self.cfg),
    )
    return distribute.input_fn(t.train_batch_size, make_dataset)

  def replica_step(self, batch):
    """One optimisation step on this replica's batch.

    Args:
      batch: {'views': float32 [b, V, H, W, 3], 'label': int64 [b] (-1 when unlabeled), ...};
        with --augment_on_device, 'views' are crops and 'distort' their parameters, or (off a
        TPU) source images and boxes for `crop_views`.
    Returns:
      dict of scalar metrics (this replica's values).
    """
    # Before the (possibly XLA-compiled) gradients: the source images' shapes vary by batch.
    batch = crop_views(batch, self.cfg.model.image_size, self.cfg.data.crop_interpolation)
    grads, metrics = self._gradients(batch)
    model = self.state.model
    # Outside XLA: the optimizer's cross-replica update is a merge call.
    self.state.optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return metrics

  def compute_gradients(self, batch):
    """Forward and backward pass of one replica: (gradients, metrics); see `replica_step`."""
    model, optimizer = self.state.model, self.state.optimizer
    t, o = self.cfg.train, self.cfg.optim
    images, labels = step_images(batch, self.color_jitter_strength, self.use_blur)
    teacher_logits = None
    if self.distill:
      # Outside the tape: the teacher is a fixed function of the same view, in inference mode.
      teacher_logits = self.state.teacher(images, training=False)["logits_sup"]
    with tf.GradientTape() as tape:
      outputs = model(images, training=True)
      loss, metrics = objective.compute_losses(
        outputs,
        labels,
        model.trainable_variables,
        teacher_logits,
        contrastive=self.pretrain,
        temperature=t.temperature,
        hidden_norm=t.hidden_norm,
        distill_temperature=t.distill_temperature,
        distill_label_weight=t.distill_label_weight,
        weight_decay=o.weight_decay,
        optimizer_name=o.optimizer,
      )
      scaled_loss = loss / self.num_replicas  # the replicas' gradients are summed (docstring)
      if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        scaled_loss = optimizer.scale_loss(scaled_loss)
    grads = tape.gradient(scaled_loss, model.trainable_variables)
    return grads, metrics

  def _train_loop(self, iterator, num_steps):
    """`num_steps` steps inside one tf.function; returns the mean of each metric."""

    def step(i, sums):
      per_replica = self.strategy.run(self.replica_step, args=(next(iterator),))
      mean = functools.partial(self.strategy.reduce, tf.distribute.ReduceOp.MEAN, axis=None)
      return i + 1, {k: sums[k] + mean(per_replica[k]) for k in self.metric_names}

    sums = {k: tf.constant(0.0) for k in self.metric_names}
    _, sums = tf.while_loop(lambda i, _: i < num_steps, step, (tf.constant(0), sums))
    return {k: v / tf.cast(num_steps, tf.float32) for k, v in sums.items()}

  def run_loop(self, iterator, num_steps: int):
    return self._loop(iterator, tf.constant(num_steps, tf.int32))
