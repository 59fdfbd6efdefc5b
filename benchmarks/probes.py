"""Readings of frozen features that the benchmarks and the study share: a cosine kNN vote and a
softmax-regression probe, both NumPy, independent of the product's own kNN monitor and linear
evaluation so that they can check them.
"""

import numpy as np


def knn_top1(train, train_labels, test, test_labels, k, temperature=0.1):
  """Top-1 of the kNN monitor's vote (cosine similarity, weights exp(sim / T)): [n, d], [m, d]."""
  train = train / np.maximum(np.linalg.norm(train, axis=1, keepdims=True), 1e-12)
  test = test / np.maximum(np.linalg.norm(test, axis=1, keepdims=True), 1e-12)
  similarity = test @ train.T
  nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
  weights = np.exp(np.take_along_axis(similarity, nearest, 1) / temperature)
  votes = np.zeros((len(test), int(train_labels.max()) + 1))
  np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest]), weights)
  return float(np.mean(votes.argmax(1) == test_labels))


def linear_probe_top1(train, train_labels, test, test_labels, steps=400, lr=0.5, l2=1e-3):
  """Top-1 of a softmax regression on standardised features: train [n, d], test [m, d].

  Full-batch gradient descent on the mean cross-entropy + l2/2 |W|^2, from zero weights.
  """
  mean, std = train.mean(0), train.std(0) + 1e-6
  x, x_test = (train - mean) / std, (test - mean) / std
  classes = int(train_labels.max()) + 1
  onehot = np.eye(classes)[train_labels]
  w, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
  for _ in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    g = (p - onehot) / len(x)  # d(mean cross-entropy) / d(logits)
    w -= lr * (x.T @ g + l2 * w)
    b -= lr * g.sum(0)
  return float(np.mean((x_test @ w + b).argmax(1) == test_labels))
