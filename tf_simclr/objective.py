"""The objective of one replica's batch: the contrastive, supervised and distillation losses,
their weighting and SimCLR's explicit weight decay, with the metrics the loop logs.

`compute_losses` is a pure function of tensors; `trainer.Trainer`'s step calls it inside its
gradient tape (tests call it on hand-made tensors).
"""

from __future__ import annotations

import tensorflow as tf

from tf_simclr import distill
from tf_simclr import losses
from tf_simclr import optimizers


def _labelled_cross_entropy(logits, labels):
  """(mean cross-entropy, accuracy) over the rows with a label: logits [B, C], labels [B].

  Unlabelled rows carry label -1; they count in neither mean (0 when no row has a label).
  """
  labelled = tf.cast(labels >= 0, tf.float32)
  loss = losses.supervised_loss(tf.maximum(labels, 0), logits, weights=labelled)
  correct = tf.cast(tf.equal(tf.argmax(logits, 1), tf.maximum(labels, 0)), tf.float32)
  accuracy = tf.math.divide_no_nan(tf.reduce_sum(correct * labelled), tf.reduce_sum(labelled))
  return loss, accuracy


def compute_losses(
  outputs: dict,
  labels,
  variables,
  teacher_logits=None,
  *,
  contrastive: bool = True,
  temperature: float = 0.1,
  hidden_norm: bool = True,
  distill_temperature: float = 1.0,
  distill_label_weight: float = 0.0,
  weight_decay: float = 0.0,
  optimizer_name: str = "lars",
):
  """The objective of one replica's batch (Algorithm 1, and SimCLRv2's): (loss, metrics).

    loss = contrastive loss of the projections (pretraining)
         + cross-entropy of the supervised head on the labelled rows, or, when distilling,
           (1 - w) * distillation loss on every row + w * that cross-entropy
         + the weight decay the optimizer does not apply (`optimizers.explicit_weight_decay`).

  A function of tensors (the step calls it inside its tape): no model, no division by the
  number of replicas, no loss scaling.

  Args:
    outputs: the model's endpoints for the replica's V*b views (rows view-major): uses
      'proj_head_output' float [V*b, p] when `contrastive`, 'logits_sup' float [V*b, C] if any.
    labels: int [V*b]; -1 marks an unlabelled row.
    variables: the trainable variables, for the weight-decay term.
    teacher_logits: float [V*b, C], the teacher's on the same views; None: no distillation.
    contrastive: add `losses.contrastive_loss` (with `temperature`, `hidden_norm`).
    distill_temperature, distill_label_weight: tau of `distill.distillation_loss`, and w.
    weight_decay, optimizer_name: of `optimizers.explicit_weight_decay`.
  Returns:
    (loss, metrics): float32 scalars; metrics has 'total_loss' (the loss) and 'weight_decay';
    with `contrastive`, 'contrast_loss', 'contrast_acc', 'contrast_entropy'; with 'logits_sup',
    'supervised_loss' and 'supervised_acc' (over the labelled rows); when distilling,
    'distill_loss' and 'teacher_agreement' (student's argmax = teacher's, over every row).
  """
  metrics = {}
  loss = tf.constant(0.0)
  if contrastive:
    con_loss, logits_ab, labels_con = losses.contrastive_loss(
      outputs["proj_head_output"], hidden_norm=hidden_norm, temperature=temperature
    )
    metrics["contrast_acc"], metrics["contrast_entropy"] = losses.contrastive_metrics(
      logits_ab, labels_con
    )
    metrics["contrast_loss"] = con_loss
    loss += con_loss
  if "logits_sup" in outputs:
    logits = outputs["logits_sup"]
    sup_loss, metrics["supervised_acc"] = _labelled_cross_entropy(logits, labels)
    metrics["supervised_loss"] = sup_loss
    if teacher_logits is not None:
      distill_loss = distill.distillation_loss(teacher_logits, logits, distill_temperature)
      w = distill_label_weight
      loss += (1.0 - w) * distill_loss + w * sup_loss
      metrics["distill_loss"] = distill_loss
      metrics["teacher_agreement"] = tf.reduce_mean(
        tf.cast(tf.equal(tf.argmax(logits, 1), tf.argmax(teacher_logits, 1)), tf.float32)
      )
    else:
      loss += sup_loss
  elif teacher_logits is not None:
    raise ValueError("distillation needs a student with a supervised head ('logits_sup')")
  metrics["weight_decay"] = optimizers.explicit_weight_decay(
    variables, weight_decay, optimizer_name
  )
  loss += metrics["weight_decay"]
  metrics["total_loss"] = loss
  return loss, metrics
