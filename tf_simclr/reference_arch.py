"""The architecture of a google-research/simclr (tf2/) model, read from its variables.

`reference_config(graph)` infers the `ModelConfig` (depth, width, selective kernels,
squeeze-excitation, stem, heads) of a reference training checkpoint or SavedModel from the
shapes in its object graph (`checkpoints.ObjectGraph`); `describe` says it in one line.
`model_source.identify` calls them (for `--checkpoint`, `--teacher_checkpoint` and
`python -m tf_simclr.convert`); `reference_weights` maps the values by the same object paths.

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

from tf_simclr import resnet
from tf_simclr.checkpoints import ObjectGraph
from tf_simclr.config import ModelConfig

RESNET = ("model", "resnet_model")
STEM = RESNET + ("initial_conv_relu_max_pool",)
PROJ = ("model", "_projection_head", "linear_layers")
SUP = ("model", "supervised_head", "linear_layer", "dense")
# Branch and shortcut lists of a block, by block kind.
BRANCH = {"basic": "conv2d_bn_layers", "bottleneck": "conv_relu_dropblock_layers"}
SHORTCUT = {"basic": "shortcut_layers", "bottleneck": "projection_layers"}
_SK_RATIO = 0.0625  # SimCLRv2's; any ratio giving the same reduce widths builds the same net
_SE_RATIO = 0.25


class NotReferenceError(ValueError):
  """SRC is not a reference artifact, or one of an architecture tf_simclr cannot build."""


def is_reference(graph: ObjectGraph) -> bool:
  """Whether the object graph is the reference model's (it has the ResNet's block groups)."""
  return graph.node(RESNET + ("block_groups",)) is not None


def item_kind(graph: ObjectGraph, names) -> str:
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


def typed_items(graph, names) -> list[tuple[str, tuple]]:
  """[(kind, path)] of the variable-holding items of the list at `names`."""
  return [
    (item_kind(graph, tuple(names) + (str(i),)), tuple(names) + (str(i),))
    for i in graph.items(names)
  ]


def block_path(g: int, b: int) -> tuple:
  return RESNET + ("block_groups", str(g), "layers", str(b))


def _block_kind(graph: ObjectGraph) -> str:
  children = graph.children(block_path(0, 0))
  for kind, name in BRANCH.items():
    if name in children:
      return kind
  raise NotReferenceError(f"its first residual block has neither {' nor '.join(BRANCH.values())}")


def _depth(graph: ObjectGraph, kind: str) -> int:
  """The depth whose blocks per group (`resnet.DEPTHS`) the reference's block groups have."""
  groups = [n for n in graph.children(RESNET + ("block_groups",)) if n.isdigit()]
  blocks = tuple(
    len([n for n in graph.children(RESNET + ("block_groups", str(g), "layers")) if n.isdigit()])
    for g in range(len(groups))
  )
  for depth, layout in resnet.DEPTHS.items():
    if layout == (kind, blocks):
      return depth
  raise NotReferenceError(
    f"a ResNet of {kind} blocks {list(blocks)} per group is not one of the "
    f"depths tf_simclr builds ({sorted(resnet.DEPTHS)})"
  )


def _group_filters(graph: ObjectGraph, kind: str) -> list[int]:
  """Base channel count of each block group: its first block's first convolution's output."""
  filters = []
  for g in range(4):
    first = typed_items(graph, block_path(g, 0) + (BRANCH[kind],))[0][1]
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
  return [(g, block_path(g, b)) for g, n in enumerate(resnet.DEPTHS[depth][1]) for b in range(n)]


def _sk_ratio(graph: ObjectGraph, kind: str, depth: int, filters: list[int]) -> float:
  """Selective kernels (bottleneck branches) or, in basic blocks, the ResNet-D shortcut alone."""
  mids = []
  for g, path in _blocks(depth):
    for kind_of_item, item in typed_items(graph, path + (BRANCH[kind],)):
      if kind_of_item == "sk":
        mids.append((filters[g], graph.shape(item + ("conv2d_0", "kernel"))[-1]))
  if mids:
    return _ratio(mids, _SK_RATIO, floor=32)
  # ResNet-D's shortcut pools (a layer without variables) before its convolution.
  shortcut = graph.items(block_path(0, 0) + (SHORTCUT[kind],))
  return _SK_RATIO if shortcut and shortcut[0] > 0 else 0.0


def _se_ratio(graph: ObjectGraph, kind: str, depth: int, filters: list[int]) -> float:
  reduced = []
  for g, path in _blocks(depth):
    items = typed_items(graph, path + (BRANCH[kind],))
    se = [item for k, item in items if k == "se"]
    if "se_layer" in graph.children(path):
      se.append(path + ("se_layer",))
    reduced += [(filters[g], graph.shape(s + ("se_reduce", "kernel"))[-1]) for s in se]
  return _ratio(reduced, _SE_RATIO, floor=1) if reduced else 0.0


def _cifar_stem(graph: ObjectGraph) -> bool:
  """The CIFAR stem is one 3x3 convolution; ImageNet's a 7x7 or (ResNet-D) three 3x3."""
  convs = [p for k, p in typed_items(graph, STEM) if k == "conv"]
  if not convs:
    raise NotReferenceError("its stem has no convolution")
  return len(convs) == 1 and graph.shape(convs[0] + ("conv2d", "kernel"))[0] == 3


def _encoder_fields(graph: ObjectGraph) -> dict:
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


def _head_fields(graph: ObjectGraph, output_dim: int, ft_proj_selector: int | None) -> dict:
  """ModelConfig fields of the projection head and the supervised head.

  The reference's `linear` mode cannot run (its head returns None), so one layer is `nonlinear`
  with `num_proj_layers=1`, which is the same function. Which projection layer fed the
  supervised head (`ft_proj_selector`) is in no variable: the head's input width tells it only
  when it is `proj_out_dim`; otherwise 0 unless given.
  """
  layers = graph.items(PROJ)
  fields = dict(proj_head_mode="nonlinear" if layers else "none", num_proj_layers=len(layers))
  out_dim = output_dim
  if layers:
    out_dim = graph.shape(PROJ + (str(layers[-1]), "dense", "kernel"))[-1]
    fields.update(proj_out_dim=out_dim)
  head = graph.shape(SUP + ("kernel",))
  fields.update(num_classes=head[-1] if head else 0)
  if ft_proj_selector is None:
    ft_proj_selector = len(layers) if head and layers and head[0] == out_dim != output_dim else 0
  fields.update(ft_proj_selector=ft_proj_selector)
  return fields


def reference_config(graph: ObjectGraph, ft_proj_selector: int | None = None) -> ModelConfig:
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
