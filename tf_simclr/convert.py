"""`python -m tf_simclr.convert SRC DST`: google-research/simclr (tf2/) models -> tf_simclr's.

SRC is a reference training checkpoint (a `ckpt-N` prefix, one of its files, or a model_dir: its
newest) or a reference SavedModel (the released SimCLRv1/v2 TF2 weights). Its architecture is
inferred from its variables (`model_source.identify`, `reference_arch`), the values assigned by
object path (`reference_weights`), and DST/ckpt-<step> (a tf_simclr checkpoint, with flags.json
beside it) and DST/saved_model/<step>/ (our export) are written. `run.py --checkpoint` and
`--teacher_checkpoint` take the same sources directly (`model_source.restore`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys

import tensorflow as tf

from tf_simclr import checkpoints
from tf_simclr import config as config_lib
from tf_simclr import errors
from tf_simclr import export
from tf_simclr import model as model_lib
from tf_simclr import model_source
from tf_simclr import reference_weights
from tf_simclr.config import ModelConfig
from tf_simclr.reference_arch import NotReferenceError
from tf_simclr.reference_arch import describe

__all__ = ["NotReferenceError", "convert", "main"]


def _write(model: model_lib.SimCLRModel, step: int, dst: str) -> None:
  """Writes DST/ckpt-<step>, DST/flags.json and DST/saved_model/<step>/ at once.

  Everything goes to a temporary directory beside `dst`, renamed to `dst` when complete, so a
  failure leaves no half-written `dst`.
  """
  tmp = export.temporary_name(dst)
  try:
    manager = tf.train.CheckpointManager(
      tf.train.Checkpoint(model=model), tmp, max_to_keep=1, checkpoint_name="ckpt"
    )
    checkpoints.save(manager, step)
    # The architecture, as run.py's flags.json gives it (distillation teachers read it).
    with tf.io.gfile.GFile(os.path.join(tmp, "flags.json"), "w") as f:
      json.dump(dataclasses.asdict(model.config), f, indent=1, sort_keys=True)
    optim = config_lib.OptimConfig()  # the L2 term of a default fine-tuning run
    export.export_saved_model(
      model,
      os.path.join(tmp, "saved_model", str(step)),
      weight_decay=optim.weight_decay,
      optimizer_name=optim.optimizer,
    )
    if tf.io.gfile.exists(dst):  # empty (convert checked), e.g. made by the user
      tf.io.gfile.rmtree(dst)
    tf.io.gfile.rename(tmp, dst)
  finally:
    if tf.io.gfile.exists(tmp):
      tf.io.gfile.rmtree(tmp)


def _remove_leftovers(dst: str) -> None:
  """Deletes `DST.tmp-<hex>` directories that a killed conversion to `dst` left (`_write`)."""
  parent, name = os.path.split(dst)
  export.remove_leftovers(parent or ".", re.compile(re.escape(name) + r"\.tmp-[0-9a-f]{32}"))


def convert(src: str, dst: str, ft_proj_selector: int | None = None) -> tuple[ModelConfig, int]:
  """Converts the reference artifact `src` into a tf_simclr checkpoint and export in `dst`.

  Args:
    src: a reference checkpoint prefix, model_dir (its newest checkpoint) or SavedModel.
    dst: a directory that does not exist yet (or is empty): gets `ckpt-<step>`, `flags.json`,
      `saved_model/<step>/`.
    ft_proj_selector: the projection layer that fed the supervised head, when the variables
      cannot tell (see `reference_arch._head_fields`).

  Returns:
    (the architecture found, the step).

  Raises:
    NotReferenceError: `src` is not a reference artifact tf_simclr can build.
    FileExistsError: `dst` holds files.
  """
  dst = os.fspath(dst).rstrip("/")
  if tf.io.gfile.exists(dst) and (not tf.io.gfile.isdir(dst) or tf.io.gfile.listdir(dst)):
    raise FileExistsError(f"{dst} exists and is not an empty directory; not writing into it")
  source = model_source.identify(src)
  _remove_leftovers(dst)
  config = source.config
  if ft_proj_selector is not None:
    config = dataclasses.replace(config, ft_proj_selector=ft_proj_selector)
  # Variable shapes do not depend on the image size: build small.
  model = model_lib.build_model(config, image_size=32)
  reference_weights.assign_all(model, src, source.prefix, with_head=config.num_classes > 0)
  _write(model, source.step, dst)
  return config, source.step


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m tf_simclr.convert",
    description="Convert a google-research/simclr (tf2/) checkpoint or SavedModel into a "
    "tf_simclr checkpoint and SavedModel.",
  )
  parser.add_argument("src", help="reference ckpt-N prefix, model_dir or SavedModel directory")
  parser.add_argument("dst", help="new directory for ckpt-<step>, flags.json, saved_model/<step>")
  parser.add_argument(
    "--ft_proj_selector",
    type=int,
    default=None,
    help="projection layer feeding the supervised head (default: inferred "
    "when the head's input width tells, else 0)",
  )
  args = parser.parse_args(argv)
  try:
    config, step = convert(args.src, args.dst, args.ft_proj_selector)
  except (ValueError, OSError) as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  except tf.errors.OpError as err:  # e.g. DST on storage that refuses the write
    print(f"error: {type(err).__name__}: {errors.first_line(err)}", file=sys.stderr)
    return 1
  print(f"Found {describe(config)}")
  print(
    f"Wrote {os.path.join(args.dst, f'ckpt-{step}')} and "
    f"{os.path.join(args.dst, 'saved_model', str(step))}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
