"""google-research/simclr (tf2/) checkpoints and SavedModels -> tf_simclr models.

`python -m tf_simclr.convert SRC DST` reads a reference training checkpoint (a `ckpt-N` prefix,
or a model_dir: its newest) or a reference SavedModel (the released SimCLRv1/v2 TF2 weights),
infers the architecture from its variables, and writes DST/ckpt-<step> (a tf_simclr checkpoint,
with flags.json beside it) and DST/saved_model/<step>/ (our export). `run.py --checkpoint` and
`--teacher_checkpoint` take the same sources through `restore_reference`.

The reference's values are addressed by object path in the checkpoint's object graph, which a
training checkpoint and a SavedModel's `variables/` both store (`checkpoints.variable_key`):

  model/resnet_model/initial_conv_relu_max_pool/<i>         stem: convs and BNs by list index
  model/resnet_model/block_groups/<g>/layers/<b>/
      shortcut_layers/<i> (basic) or projection_layers/<i> (bottleneck)
      conv2d_bn_layers/<i> (basic) or conv_relu_dropblock_layers/<i> (bottleneck)
      se_layer (basic; a list item in a bottleneck)
  model/_projection_head/linear_layers/<j>/{dense, bn_relu/bn}
  model/supervised_head/linear_layer/dense

A list item is a conv (`conv2d/kernel`), a batch norm (`bn/{gamma,beta,moving_*}`), a selective
kernel (`conv2d_fixed_padding`, `batch_norm_relu`, `conv2d_0`, `batch_norm_relu_1`, `conv2d_1`),
a squeeze-excitation (`se_reduce`, `se_expand`) or a layer without variables (padding, pooling,
drop-block, identity), skipped. Our layers hold the same values in the same order.
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
from tf_simclr import resnet
from tf_simclr.config import ModelConfig

_RESNET = ("model", "resnet_model")
_STEM = _RESNET + ("initial_conv_relu_max_pool",)
_PROJ = ("model", "_projection_head", "linear_layers")
_SUP = ("model", "supervised_head", "linear_layer", "dense")
# Branch and shortcut lists of a block, by block kind.
_BRANCH = {"basic": "conv2d_bn_layers", "bottleneck": "conv_relu_dropblock_layers"}
_SHORTCUT = {"basic": "shortcut_layers", "bottleneck": "projection_layers"}
_SK_RATIO = 0.0625  # SimCLRv2's; any ratio giving the same reduce widths builds the same net
_SE_RATIO = 0.25


class NotReferenceError(ValueError):
  """SRC is not a reference artifact, or one of an architecture tf_simclr cannot build."""


class _Graph:
  """A TF2 checkpoint's values addressed by object path (tuples of attribute names)."""

  def __init__(self, prefix: str):
    self.reader = tf.train.load_checkpoint(prefix)
    self.graph = checkpoints.object_graph(self.reader)
    self.shapes = self.reader.get_variable_to_shape_map()

  def node(self, names):
    try:
      return checkpoints.object_node(self.graph, list(names))
    except KeyError:
      return None

  def children(self, names) -> list[str]:
    node = self.node(names)
    return [] if node is None else [c.local_name for c in node.children]

  def items(self, names) -> list[int]:
    """Indices of the list at `names` whose items hold variables, in order."""
    found = [int(n) for n in self.children(names) if n.isdigit()]
    return sorted(
      i for i in found if checkpoints.variable_keys_under(self.graph, list(names) + [str(i)])
    )

  def shape(self, names) -> tuple | None:
    """Shape of the variable at `names`; None when there is none."""
    try:
      return tuple(self.shapes[checkpoints.variable_key(self.graph, list(names))])
    except KeyError:
      return None

  def value(self, names):
    return self.reader.get_tensor(checkpoints.variable_key(self.graph, list(names)))


def _kind(graph: _Graph, names) -> str:
  """What the reference list item at `names` is: conv, bn, sk, se (NotReferenceError: other)."""
  children = set(graph.children(names))
  for kind, child in (
    ("conv", "conv2d"),
    ("bn", "bn"),
    ("sk", "conv2d_fixed_padding"),
    ("se", "se_reduce"),
  ):
    if child in children:
      return kind
  raise NotReferenceError(f"unknown layer at {'/'.join(names)} (children {sorted(children)})")


def _typed_items(graph, names) -> list[tuple[str, tuple]]:
  """[(kind, path)] of the variable-holding items of the list at `names`."""
  return [
    (_kind(graph, tuple(names) + (str(i),)), tuple(names) + (str(i),)) for i in graph.items(names)
  ]


def _block(g: int, b: int) -> tuple:
  return _RESNET + ("block_groups", str(g), "layers", str(b))


def _block_kind(graph: _Graph) -> str:
  children = graph.children(_block(0, 0))
  for kind, name in _BRANCH.items():
    if name in children:
      return kind
  raise NotReferenceError(f"its first residual block has neither {' nor '.join(_BRANCH.values())}")


def _depth(graph: _Graph, kind: str) -> int:
  """The depth whose blocks per group (`resnet.DEPTHS`) the reference's block groups have."""
  groups = [n for n in graph.children(_RESNET + ("block_groups",)) if n.isdigit()]
  blocks = tuple(
    len([n for n in graph.children(_RESNET + ("block_groups", str(g), "layers")) if n.isdigit()])
    for g in range(len(groups))
  )
  for depth, layout in resnet.DEPTHS.items():
    if layout == (kind, blocks):
      return depth
  raise NotReferenceError(
    f"a ResNet of {kind} blocks {list(blocks)} per group is not one of the "
    f"depths tf_simclr builds ({sorted(resnet.DEPTHS)})"
  )


def _group_filters(graph: _Graph, kind: str) -> list[int]:
  """Base channel count of each block group: its first block's first convolution's output."""
  filters = []
  for g in range(4):
    first = _typed_items(graph, _block(g, 0) + (_BRANCH[kind],))[0][1]
    filters.append(graph.shape(first + ("conv2d", "kernel"))[-1])
  return filters


def _width(filters: list[int]) -> float:
  """The width multiplier w with `resnet.channels(64 * 2**g, w) == filters[g]` for each group."""
  for w in (filters[0] / 64, filters[3] / 512):
    if all(resnet.channels(64 * 2**g, w) == f for g, f in enumerate(filters)):
      return w  # ModelConfig keeps an integral width as an int
  raise NotReferenceError(f"block groups of {filters} channels are no width multiplier's")


def _ratio(pairs, default: float, floor: int) -> float:
  """The ratio r with `max(int(f * r), floor) == d` for every (filters f, reduced width d)."""
  for r in [default] + [d / f for f, d in pairs]:
    if all(max(int(f * r), floor) == d for f, d in pairs):
      return r
  raise NotReferenceError(f"reduced widths {pairs} (filters, width) fit no single ratio")


def _blocks(depth: int) -> list[tuple[int, tuple]]:
  """(group index g, object path) of every residual block of a ResNet of `depth`."""
  return [(g, _block(g, b)) for g, n in enumerate(resnet.DEPTHS[depth][1]) for b in range(n)]


def _sk_ratio(graph: _Graph, kind: str, depth: int, filters: list[int]) -> float:
  """Selective kernels (bottleneck branches) or, in basic blocks, the ResNet-D shortcut alone."""
  mids = []
  for g, path in _blocks(depth):
    for item_kind, item in _typed_items(graph, path + (_BRANCH[kind],)):
      if item_kind == "sk":
        mids.append((filters[g], graph.shape(item + ("conv2d_0", "kernel"))[-1]))
  if mids:
    return _ratio(mids, _SK_RATIO, floor=32)
  # ResNet-D's shortcut pools (a layer without variables) before its convolution.
  shortcut = graph.items(_block(0, 0) + (_SHORTCUT[kind],))
  return _SK_RATIO if shortcut and shortcut[0] > 0 else 0.0


def _se_ratio(graph: _Graph, kind: str, depth: int, filters: list[int]) -> float:
  reduced = []
  for g, path in _blocks(depth):
    items = _typed_items(graph, path + (_BRANCH[kind],))
    se = [item for k, item in items if k == "se"]
    if "se_layer" in graph.children(path):
      se.append(path + ("se_layer",))
    reduced += [(filters[g], graph.shape(s + ("se_reduce", "kernel"))[-1]) for s in se]
  return _ratio(reduced, _SE_RATIO, floor=1) if reduced else 0.0


def _cifar_stem(graph: _Graph) -> bool:
  """The CIFAR stem is one 3x3 convolution; ImageNet's a 7x7 or (ResNet-D) three 3x3."""
  convs = [p for k, p in _typed_items(graph, _STEM) if k == "conv"]
  if not convs:
    raise NotReferenceError("its stem has no convolution")
  return len(convs) == 1 and graph.shape(convs[0] + ("conv2d", "kernel"))[0] == 3


def _encoder_fields(graph: _Graph) -> dict:
  """ModelConfig fields of the reference's ResNet."""
  kind = _block_kind(graph)
  depth = _depth(graph, kind)
  filters = _group_filters(graph, kind)
  return dict(
    resnet_depth=depth,
    width_multiplier=_width(filters),
    sk_ratio=_sk_ratio(graph, kind, depth, filters),
    se_ratio=_se_ratio(graph, kind, depth, filters),
    # image_size only chooses the stem (ModelConfig.use_cifar_stem).
    image_size=32 if _cifar_stem(graph) else 224,
  )


def _head_fields(graph: _Graph, output_dim: int, ft_proj_selector: int | None) -> dict:
  """ModelConfig fields of the projection head and the supervised head.

  The reference's `linear` mode cannot run (its head returns None), so one layer is `nonlinear`
  with `num_proj_layers=1`, which is the same function. Which projection layer fed the
  supervised head (`ft_proj_selector`) is in no variable: the head's input width tells it only
  when it is `proj_out_dim`; otherwise 0 unless given.
  """
  layers = graph.items(_PROJ)
  fields = dict(proj_head_mode="nonlinear" if layers else "none", num_proj_layers=len(layers))
  out_dim = output_dim
  if layers:
    out_dim = graph.shape(_PROJ + (str(layers[-1]), "dense", "kernel"))[-1]
    fields.update(proj_out_dim=out_dim)
  head = graph.shape(_SUP + ("kernel",))
  fields.update(num_classes=head[-1] if head else 0)
  if ft_proj_selector is None:
    ft_proj_selector = len(layers) if head and layers and head[0] == out_dim != output_dim else 0
  fields.update(ft_proj_selector=ft_proj_selector)
  return fields


def reference_config(graph: _Graph, ft_proj_selector: int | None = None) -> ModelConfig:
  """The ModelConfig of the reference model whose variables `graph` holds.

  Raises:
    NotReferenceError: not the reference's structure, or nothing tf_simclr can build.
  """
  encoder = _encoder_fields(graph)
  expansion = 1 if resnet.DEPTHS[encoder["resnet_depth"]][0] == "basic" else 4
  output_dim = resnet.channels(512, encoder["width_multiplier"]) * expansion
  fields = dict(encoder, **_head_fields(graph, output_dim, ft_proj_selector))
  try:
    return ModelConfig(train_mode="finetune", **fields)
  except ValueError as err:
    raise NotReferenceError(str(err)) from None


def describe(config: ModelConfig) -> str:
  """One line: the architecture of `config`."""
  parts = [
    f"ResNet-{config.resnet_depth}",
    f"width {config.width_multiplier}",
    "CIFAR stem" if config.use_cifar_stem else "ImageNet stem",
  ]
  if config.sk_ratio:
    parts.append(f"selective kernels {config.sk_ratio}")
  if config.se_ratio:
    parts.append(f"squeeze-excitation {config.se_ratio}")
  head = (
    "no projection head"
    if config.proj_head_mode == "none"
    else f"projection head {config.num_proj_layers} layers -> {config.proj_out_dim}"
  )
  sup = (
    f"supervised head {config.num_classes} classes on projection layer {config.ft_proj_selector}"
    if config.num_classes
    else "no supervised head"
  )
  return ", ".join(parts + [head, sup])


def _our_kind(layer) -> str:
  for cls, kind in (
    (resnet.Conv2dFixedPadding, "conv"),
    (resnet.BatchNormRelu, "bn"),
    (resnet.SelectiveKernel, "sk"),
    (resnet.SqueezeExcitation, "se"),
  ):
    if isinstance(layer, cls):
      return kind
  raise TypeError(type(layer).__name__)


def _sublayers(kind: str, layer, path: tuple) -> list[tuple]:
  """(our Keras layer holding variables, reference object path) pairs of one list item."""
  if kind == "conv":
    return [(layer.conv, path + ("conv2d",))]
  if kind == "bn":
    return [(layer.bn, path + ("bn",))]
  if kind == "sk":
    return [
      (layer.conv.conv, path + ("conv2d_fixed_padding", "conv2d")),
      (layer.bn.bn, path + ("batch_norm_relu", "bn")),
      (layer.conv_reduce, path + ("conv2d_0",)),
      (layer.bn_reduce.bn, path + ("batch_norm_relu_1", "bn")),
      (layer.conv_mix, path + ("conv2d_1",)),
    ]
  return [(layer.reduce, path + ("se_reduce",)), (layer.expand, path + ("se_expand",))]


def _match(ours: list, theirs: list[tuple[str, tuple]], where: str) -> list[tuple]:
  """Pairs our layers with the reference's list items of the same kinds, in order."""
  our_kinds = [_our_kind(layer) for layer in ours]
  their_kinds = [k for k, _ in theirs]
  if our_kinds != their_kinds:
    raise NotReferenceError(f"{where} holds {their_kinds} where tf_simclr's model has {our_kinds}")
  return [
    pair
    for kind, layer, (_, path) in zip(our_kinds, ours, theirs)
    for pair in _sublayers(kind, layer, path)
  ]


def _block_pairs(graph: _Graph, block, path: tuple) -> list[tuple]:
  kind = "basic" if isinstance(block, resnet.ResidualBlock) else "bottleneck"
  shortcut = [block.shortcut_conv, block.shortcut_bn] if block.shortcut_conv else []
  pairs = _match(shortcut, _typed_items(graph, path + (_SHORTCUT[kind],)), "/".join(path))
  if kind == "basic":
    branch = [block.conv1, block.bn1, block.conv2, block.bn2]
  else:
    branch = (
      [block.conv1, block.bn1, block.conv2]
      + ([block.bn2] if block.bn2 else [])
      + [block.conv3, block.bn3]
    )
  theirs = _typed_items(graph, path + (_BRANCH[kind],))
  if "se_layer" in graph.children(path):  # a basic block's SE is an attribute, not an item
    theirs.append(("se", path + ("se_layer",)))
  branch += [block.se] if block.se is not None else []
  return pairs + _match(branch, theirs, "/".join(path))


def _pairs(model: model_lib.SimCLRModel, graph: _Graph, with_head: bool) -> list[tuple]:
  """(our Keras layer holding variables, reference object path) for the whole model."""
  encoder = model.encoder
  pairs = _match(encoder.stem + [encoder.stem_bn], _typed_items(graph, _STEM), "/".join(_STEM))
  for g, group in enumerate(encoder.groups):
    for b, block in enumerate(group):
      pairs += _block_pairs(graph, block, _block(g, b))
  layers = model.projection_head.layers_
  indices = graph.items(_PROJ)
  if len(layers) != len(indices):
    raise NotReferenceError(
      f"its projection head has {len(indices)} layers, the model {len(layers)}"
    )
  for layer, j in zip(layers, indices):
    pairs += [
      (layer.dense, _PROJ + (str(j), "dense")),
      (layer.bn.bn, _PROJ + (str(j), "bn_relu", "bn")),
    ]
  if with_head:
    pairs.append((model.supervised_head.dense, _SUP))
  return pairs


def _assign(pairs: list[tuple], graph: _Graph, source: str) -> None:
  """Checks every variable of `pairs` against the reference's, then assigns them all.

  Raises:
    checkpoints.CheckpointMismatchError: a value is missing or has another shape.
  """
  todo = []
  for layer, path in pairs:
    for v in layer.weights:
      names = path + (v.name,)
      shape = graph.shape(names)
      if shape != tuple(v.shape):
        found = "missing" if shape is None else f"shape {list(shape)}"
        raise checkpoints.CheckpointMismatchError(
          f"{source} does not fit the model asked for: {'/'.join(names)} is {found}, the "
          f"model's {v.path} has shape {list(v.shape)}"
        )
      todo.append((v, names))
  for v, names in todo:
    v.assign(graph.value(names))


@dataclasses.dataclass
class Source:
  """A reference artifact opened for reading."""

  path: str  # as the user gave it
  kind: str  # "checkpoint" or "SavedModel"
  step: int  # the checkpoint's global step; a SavedModel's directory name, or 0
  graph: _Graph


def _prefix(path: str) -> tuple[str, str]:
  """(checkpoint prefix, kind) of a SavedModel, a model_dir (its newest) or a prefix."""
  if export.is_saved_model(path):
    return os.path.join(path, "variables", "variables"), "SavedModel"
  if tf.io.gfile.isdir(path):
    latest = tf.train.latest_checkpoint(path)
    if latest is None:
      raise NotReferenceError(f"{path} is a directory with neither a checkpoint nor a SavedModel")
    return latest, "checkpoint"
  prefix = checkpoints.checkpoint_prefix(path)  # ckpt-3.index, as run.py's --checkpoint
  if tf.io.gfile.exists(prefix + ".index"):
    return prefix, "checkpoint"
  raise NotReferenceError(
    f"{path} does not exist (expected a reference checkpoint prefix such "
    "as model_dir/ckpt-1000, a model_dir, or a reference SavedModel)"
  )


def _step(graph: _Graph, kind: str, path: str, prefix: str) -> int:
  if kind == "SavedModel":
    name = os.path.basename(os.fspath(path).rstrip("/"))
    return int(name) if name.isdigit() else 0
  for names in (("global_step",), ("optimizer", "iter")):
    if graph.shape(names) == ():
      return int(graph.value(names))
  tail = os.path.basename(prefix).rsplit("-", 1)[-1]
  return int(tail) if tail.isdigit() else 0


def open_source(path: str) -> Source:
  """Opens a reference checkpoint or SavedModel.

  Raises:
    NotReferenceError: nothing readable at `path`, or not the reference's object graph.
  """
  prefix, kind = _prefix(path)
  try:
    graph = _Graph(prefix)
  except (tf.errors.OpError, ValueError) as err:
    raise NotReferenceError(f"{path} is unreadable ({type(err).__name__})") from None
  if graph.node(_RESNET + ("block_groups",)) is None:
    ours = graph.node(("model", "encoder")) is not None or export.is_saved_model(path)
    raise NotReferenceError(
      f"{path} is not a google-research/simclr checkpoint or SavedModel (its object graph has "
      "no model/resnet_model/block_groups)"
      + ("; it is tf_simclr's own: use it as it is" if ours else "")
    )
  return Source(path, kind, _step(graph, kind, path, prefix), graph)


def is_reference(path: str | None) -> bool:
  """Whether `path` is a readable reference checkpoint, model_dir or SavedModel."""
  if not path:
    return False
  try:
    open_source(path)
  except (NotReferenceError, tf.errors.OpError):
    return False
  return True


def _differences(found: ModelConfig, wanted: ModelConfig) -> list[str]:
  """`name reference-value (flags: value)` for each architectural field that differs."""

  def key(config, name):
    if name == "width_multiplier":  # equal widths: the same channel counts
      return [resnet.channels(64 * 2**g, config.width_multiplier) for g in range(4)]
    if name == "proj_head_mode":
      return "none" if config.proj_head_mode == "none" else "linear or nonlinear"
    if name == "num_proj_layers":
      return {"none": 0, "linear": 1}.get(config.proj_head_mode, config.num_proj_layers)
    if name in ("sk_ratio", "se_ratio"):
      return getattr(config, name) > 0  # the widths inside are checked variable by variable
    return getattr(config, name)

  names = [
    "resnet_depth",
    "width_multiplier",
    "use_cifar_stem",
    "sk_ratio",
    "se_ratio",
    "proj_head_mode",
    "num_proj_layers",
  ]
  if found.proj_head_mode != "none":
    names.append("proj_out_dim")
  return [
    f"{n} {getattr(found, n)} (flags: {getattr(wanted, n)})"
    for n in names
    if key(found, n) != key(wanted, n)
  ]


def _check_head(source: Source, found: ModelConfig, wanted: ModelConfig) -> None:
  if found.num_classes == wanted.num_classes:
    return
  what = (
    f"a supervised head of {found.num_classes} classes"
    if found.num_classes
    else "no supervised head"
  )
  raise checkpoints.CheckpointMismatchError(
    f"{source.path} has {what}, the model asked for {wanted.num_classes} classes; "
    "--zero_init_logits_layer starts a new (zero) head"
  )


def restore_reference(model: model_lib.SimCLRModel, path: str, new_head: bool = False) -> None:
  """Initialises `model` (built, any strategy scope) from a reference artifact.

  Args:
    model: its config must describe the reference's architecture.
    path: a reference checkpoint prefix, model_dir or SavedModel.
    new_head: leave the supervised head as it is (to be zeroed: `--zero_init_logits_layer`),
      whatever the reference's classes; otherwise it must have `model`'s.

  Raises:
    NotReferenceError: see `open_source`; checkpoints.CheckpointMismatchError: the reference
      model is another architecture than `model` (the message names what differs).
  """
  source = open_source(path)
  found = reference_config(source.graph)
  diffs = _differences(found, model.config)
  if diffs:
    raise checkpoints.CheckpointMismatchError(
      f"{path} is a reference {describe(found)}, which does not fit the model flags: "
      f"{'; '.join(diffs)}"
    )
  with_head = model.supervised_head is not None and not new_head
  if with_head:
    _check_head(source, found, model.config)
  _assign(_pairs(model, source.graph, with_head), source.graph, path)


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
      cannot tell (see `_head_fields`).

  Returns:
    (the architecture found, the step).

  Raises:
    NotReferenceError: `src` is not a reference artifact tf_simclr can build.
    FileExistsError: `dst` holds files.
  """
  dst = os.fspath(dst).rstrip("/")
  if tf.io.gfile.exists(dst) and (not tf.io.gfile.isdir(dst) or tf.io.gfile.listdir(dst)):
    raise FileExistsError(f"{dst} exists and is not an empty directory; not writing into it")
  source = open_source(src)
  _remove_leftovers(dst)
  config = reference_config(source.graph, ft_proj_selector)
  # Variable shapes do not depend on the image size: build small.
  model = model_lib.build_model(config, image_size=32)
  _assign(_pairs(model, source.graph, config.num_classes > 0), source.graph, src)
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
