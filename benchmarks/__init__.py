"""Benchmarks of tf_simclr, kept out of the library: run from the repository root.

  python -m benchmarks.train_step [--flags]        training throughput and FLOPs of real steps
  python -m benchmarks.augment_pipeline [--flags]  host augmentation throughput in tf.data
  python -m benchmarks.make_jpeg_folder OUT        ~500x375 JPEGs from real photographs

`batched_augment` is an alternative, batched form of the augmentation that only the
augmentation benchmark compares against.
"""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
  """argparse with the project's bad-input convention: one `error: ...` line, exit 1."""

  def error(self, message):
    sys.stderr.write(f"error: {message}\n")
    sys.exit(1)
