"""Our model's weights from a google-research/simclr model's variables, matched by object path.

`restore_reference` (`--checkpoint`, `--teacher_checkpoint`: `model_source.restore`) checks that
a built model is the reference's architecture, naming what differs, and assigns every value;
`assign_all` (the converter) assigns them into a model built from the reference's own config.
Our layers hold the reference's values in the same order: each of our layers is paired with the
reference's list item of the same kind (see `reference_arch` for the object paths).
"""

from __future__ import annotations

from tf_simclr import checkpoints
from tf_simclr import model as model_lib
from tf_simclr import resnet
from tf_simclr.checkpoints import ObjectGraph
from tf_simclr.config import ModelConfig
from tf_simclr.reference_arch import BRANCH
from tf_simclr.reference_arch import PROJ
from tf_simclr.reference_arch import SHORTCUT
from tf_simclr.reference_arch import STEM
from tf_simclr.reference_arch import SUP
from tf_simclr.reference_arch import NotReferenceError
from tf_simclr.reference_arch import block_path
from tf_simclr.reference_arch import describe
from tf_simclr.reference_arch import typed_items


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


def _block_pairs(graph: ObjectGraph, block, path: tuple) -> list[tuple]:
  kind = "basic" if isinstance(block, resnet.ResidualBlock) else "bottleneck"
  shortcut = [block.shortcut_conv, block.shortcut_bn] if block.shortcut_conv else []
  pairs = _match(shortcut, typed_items(graph, path + (SHORTCUT[kind],)), "/".join(path))
  if kind == "basic":
    branch = [block.conv1, block.bn1, block.conv2, block.bn2]
  else:
    branch = (
      [block.conv1, block.bn1, block.conv2]
      + ([block.bn2] if block.bn2 else [])
      + [block.conv3, block.bn3]
    )
  theirs = typed_items(graph, path + (BRANCH[kind],))
  if "se_layer" in graph.children(path):  # a basic block's SE is an attribute, not an item
    theirs.append(("se", path + ("se_layer",)))
  branch += [block.se] if block.se is not None else []
  return pairs + _match(branch, theirs, "/".join(path))


def _pairs(model: model_lib.SimCLRModel, graph: ObjectGraph, with_head: bool) -> list[tuple]:
  """(our Keras layer holding variables, reference object path) for the whole model."""
  encoder = model.encoder
  pairs = _match(encoder.stem + [encoder.stem_bn], typed_items(graph, STEM), "/".join(STEM))
  for g, group in enumerate(encoder.groups):
    for b, block in enumerate(group):
      pairs += _block_pairs(graph, block, block_path(g, b))
  layers = model.projection_head.layers_
  indices = graph.items(PROJ)
  if len(layers) != len(indices):
    raise NotReferenceError(
      f"its projection head has {len(indices)} layers, the model {len(layers)}"
    )
  for layer, j in zip(layers, indices):
    pairs += [
      (layer.dense, PROJ + (str(j), "dense")),
      (layer.bn.bn, PROJ + (str(j), "bn_relu", "bn")),
    ]
  if with_head:
    pairs.append((model.supervised_head.dense, SUP))
  return pairs


def _assign(pairs: list[tuple], graph: ObjectGraph, source: str) -> None:
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


def _check_head(path: str, found: ModelConfig, wanted: ModelConfig) -> None:
  if found.num_classes == wanted.num_classes:
    return
  what = (
    f"a supervised head of {found.num_classes} classes"
    if found.num_classes
    else "no supervised head"
  )
  raise checkpoints.CheckpointMismatchError(
    f"{path} has {what}, the model asked for {wanted.num_classes} classes; "
    "--zero_init_logits_layer starts a new (zero) head"
  )


def restore_reference(
  model: model_lib.SimCLRModel, path: str, prefix: str, found: ModelConfig, new_head: bool = False
) -> None:
  """Initialises `model` (built, any strategy scope) from a reference artifact.

  Args:
    model: its config must describe the reference's architecture.
    path: the reference checkpoint prefix, model_dir or SavedModel as the user gave it.
    prefix: the TF2 checkpoint it reads (`model_source.ModelSource.prefix`).
    found: the reference's architecture (`model_source.ModelSource.config`).
    new_head: leave the supervised head as it is (to be zeroed: `--zero_init_logits_layer`),
      whatever the reference's classes; otherwise it must have `model`'s.

  Raises:
    checkpoints.CheckpointMismatchError: the reference model is another architecture than
      `model` (the message names what differs).
  """
  diffs = _differences(found, model.config)
  if diffs:
    raise checkpoints.CheckpointMismatchError(
      f"{path} is a reference {describe(found)}, which does not fit the model flags: "
      f"{'; '.join(diffs)}"
    )
  with_head = model.supervised_head is not None and not new_head
  if with_head:
    _check_head(path, found, model.config)
  assign_all(model, path, prefix, with_head)


def assign_all(model: model_lib.SimCLRModel, path: str, prefix: str, with_head: bool) -> None:
  """Assigns the reference's values (checkpoint `prefix`, given as `path`) to every weight of
  `model` (its supervised head's too when `with_head`).

  Raises:
    NotReferenceError: the lists of layers differ; checkpoints.CheckpointMismatchError: a value
      is missing or has another shape.
  """
  graph = ObjectGraph(prefix)
  _assign(_pairs(model, graph, with_head), graph, path)
