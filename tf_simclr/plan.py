"""What a run does, decided from its configuration and its data before anything is built.

`make_plan(cfg)` opens the data splits (records only, no image decoded) and, when distilling,
reads the teacher's configuration; it decides the supervised head (its classes), the labelled
subset, the evaluation split and the kNN monitor's bank, and refuses what cannot work (one
ValueError line). `run.py` builds, trains and evaluates as the plan says; tests check the
decisions without building a model.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import numpy as np

from tf_simclr import distill
from tf_simclr.config import ModelConfig
from tf_simclr.config import RunConfig
from tf_simclr.data import label_subsets
from tf_simclr.data import sources


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """A run's decisions.

  Attributes:
    cfg: the run's config with `model.num_classes` filled in: the training split's classes
      (the teacher's when distilling), or 0 for no supervised head.
    train_source: what training reads: the training split; with few labels, the labelled
      subset when fine-tuning, and every example, labelled (-1 otherwise) only on the subset,
      when distilling.
    eval_source: the labelled split that the supervised head is scored on and that queries the
      kNN monitor; None: nothing to evaluate.
    knn_sources: (bank, queries) of the kNN monitor, both labelled: the training examples that
      have labels (the subset, with few labels) and `eval_source`. None: the monitor is off.
    label_ids: sorted int64 ids [n] of the labelled subset; None: every label (or none asked).
    teacher: the distillation teacher's ModelConfig (`distill.teacher_source`), else None.
  """

  cfg: RunConfig
  train_source: sources.Source
  eval_source: sources.Source | None = None
  knn_sources: tuple[sources.Source, sources.Source] | None = None
  label_ids: np.ndarray | None = None
  teacher: ModelConfig | None = None


def make_plan(cfg: RunConfig) -> RunPlan:
  """Opens the data of `cfg` and decides what the run trains, evaluates and monitors.

  Raises:
    ValueError (sources.DatasetError included): unknown or unreadable data, labels that the
      run needs and the data lacks (fine-tuning, the kNN monitor, a label fraction, a
      distillation label weight), or a teacher that does not predict the data's classes.
  """
  t, m = cfg.train, cfg.model
  train_source = sources.load_source(cfg.data.dataset, cfg.data.train_split, cfg.data.data_dir)
  split = f"{cfg.data.dataset} split {cfg.data.train_split!r}"
  num_classes, teacher = _classes(cfg, train_source.num_classes, split)
  if t.knn_eval_every_n_steps and train_source.num_classes == 0:
    raise ValueError(f"--knn_eval_every_n_steps needs labels, but {split} is unlabeled")
  if num_classes == 1:
    logging.warning(
      "%s has one class: a supervised head of one class has nothing to tell apart, and "
      "scores 100%% whatever the encoder learnt",
      split,
    )
  cfg = dataclasses.replace(cfg, model=dataclasses.replace(m, num_classes=num_classes))
  eval_source = _eval_source(cfg, train_source)

  # Few labels: fine-tuning trains on the subset; distillation on every image, with labels
  # (for --distill_label_weight) only on the subset. Not needed to evaluate, unless by kNN.
  ids, knn_bank = None, train_source
  if m.train_mode != "pretrain" and (t.mode != "eval" or t.knn_eval_every_n_steps):
    ids = label_subsets.label_subset(
      train_source, cfg.data.train_label_fraction, cfg.data.train_label_file, seed=t.seed
    )
    if ids is not None:
      knn_bank = label_subsets.subset_source(train_source, ids)
      train_source = (
        knn_bank if m.train_mode == "finetune" else distill.labels_only_for(train_source, ids)
      )
  knn_sources = (knn_bank, eval_source) if t.knn_eval_every_n_steps else None
  return RunPlan(cfg, train_source, eval_source, knn_sources, ids, teacher)


def _classes(cfg: RunConfig, data_classes: int, split: str) -> tuple[int, ModelConfig | None]:
  """(classes of the supervised head, 0 for none; the teacher's config when distilling).

  `data_classes`: the training split's, 0 when it is unlabeled (named `split` in messages).
  """
  t, train_mode = cfg.train, cfg.model.train_mode
  if train_mode == "distill":
    # The teacher's classes are the student's; checked before anything is built.
    source = distill.teacher_source(t.teacher_checkpoint)
    distill.check_image_size(source, cfg.model.image_size)
    teacher = source.config
    if data_classes:
      distill.check_classes(teacher, data_classes, t.teacher_checkpoint)
    elif t.distill_label_weight > 0:
      raise ValueError(
        f"--distill_label_weight={t.distill_label_weight} needs labels, but {split} is unlabeled"
      )
    return teacher.num_classes, teacher
  if train_mode == "pretrain" and not t.lineareval_while_pretraining:
    return 0, None
  if data_classes == 0:
    if train_mode == "finetune":
      raise ValueError(f"train_mode=finetune needs labels, but {split} is unlabeled")
    logging.info("Unlabeled data: pretraining without the linear-evaluation head")
  return data_classes, None


def _eval_source(cfg: RunConfig, train_source: sources.Source) -> sources.Source | None:
  """The labelled evaluation split, if the run evaluates a head or monitors by kNN."""
  t = cfg.train
  if not ((cfg.model.num_classes and t.mode != "train") or t.knn_eval_every_n_steps):
    return None
  # Image folders: the training split's classes decide the labels of every split.
  source = sources.load_source(
    cfg.data.dataset,
    cfg.data.eval_split,
    cfg.data.data_dir,
    class_names=train_source.class_names or None,
  )
  if t.knn_eval_every_n_steps and source.num_classes == 0:
    raise ValueError(
      f"--knn_eval_every_n_steps needs labels, but {cfg.data.dataset} split "
      f"{cfg.data.eval_split!r} is unlabeled"
    )
  if source.num_classes == 0:  # e.g. an image folder's split without class folders
    logging.warning(
      "%s split %r is unlabelled: the supervised head is not evaluated (no result.json); give "
      "a labelled --eval_split to score it",
      cfg.data.dataset,
      cfg.data.eval_split,
    )
    return None
  return source
