"""The SimCLR model: ResNet encoder, projection head g(.), and a linear supervised head.

`SimCLRModel(images)` returns a dict of named outputs under constant keys (`OUTPUTS`): the
encoder's endpoints, `proj_head_input` (= h), `proj_head_output` (= z, fed to the contrastive
loss), `sup_head_input` (the projection-head layer chosen by `ft_proj_selector`) and `logits_sup`.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tf_simclr import batch_norm
from tf_simclr import config
from tf_simclr import resnet
from tf_simclr.config import ModelConfig

PROJ_HEAD_MODES = config.PROJ_HEAD_MODES
OUTPUTS = resnet.ENDPOINTS + ("proj_head_input", "proj_head_output", "sup_head_input", "logits_sup")
SUPERVISED_HEAD_NAME = "head_supervised"  # LARS's weight-decay exclusion selects it by path.


class LinearLayer(keras.layers.Layer):
  """Dense (N(0, 0.01) init) optionally followed by batch norm, as the reference's LinearLayer.

  With batch norm the dense layer has no bias and BN's beta plays its part (`center=use_bias`).
  `[B, D_in] -> [B, units]`.
  """

  def __init__(
    self, units, use_bias=True, use_bn=False, bn_decay=0.9, synchronized_bn=False, **kwargs
  ):
    super().__init__(**kwargs)
    self.units = units
    self.use_bias = use_bias
    self.use_bn = use_bn
    self.dense = keras.layers.Dense(
      units,
      use_bias=use_bias and not use_bn,
      kernel_initializer=keras.initializers.RandomNormal(stddev=0.01),
      name="dense",
    )
    self.bn = (
      batch_norm.BatchNormRelu(
        relu=False, center=use_bias, decay=bn_decay, synchronized=synchronized_bn, name="bn"
      )
      if use_bn
      else None
    )

  def call(self, inputs, training=None):
    x = self.dense(inputs)
    return self.bn(x, training=training) if self.bn is not None else x


class ProjectionHead(keras.layers.Layer):
  """SimCLR's g(.): `none`, `linear` (one dense+BN) or `nonlinear` (num_layers dense+BN).

  Nonlinear: every layer but the last keeps the input width and has bias (BN beta) and ReLU;
  the last maps to `out_dim` with neither (SimCLRv2). Returns `(output, selected)` where
  `selected` is the `ft_proj_selector`-th element of [input, layer 1 output, ...], the input of
  the supervised head. `[B, D] -> ([B, out_dim], [B, D or out_dim])`.
  """

  def __init__(
    self,
    mode,
    input_dim,
    out_dim=128,
    num_layers=3,
    ft_proj_selector=0,
    bn_decay=0.9,
    synchronized_bn=False,
    **kwargs,
  ):
    super().__init__(**kwargs)
    if mode not in PROJ_HEAD_MODES:
      raise ValueError(f"proj_head_mode must be one of {PROJ_HEAD_MODES}, got {mode!r}")
    if mode == "nonlinear" and num_layers < 1:
      raise ValueError(f"num_proj_layers must be >= 1, got {num_layers}")
    depth = {"none": 0, "linear": 1, "nonlinear": num_layers}[mode]
    if not 0 <= ft_proj_selector <= depth:
      raise ValueError(
        f"ft_proj_selector must be in 0..{depth} for proj_head_mode={mode!r} "
        f"with num_proj_layers={num_layers}, got {ft_proj_selector}"
      )
    self.mode = mode
    self.ft_proj_selector = ft_proj_selector
    bn = dict(bn_decay=bn_decay, synchronized_bn=synchronized_bn)
    if mode == "linear":
      layers = [LinearLayer(out_dim, use_bias=False, use_bn=True, **bn, name="l_0")]
    elif mode == "nonlinear":
      layers = [
        LinearLayer(input_dim, use_bias=True, use_bn=True, **bn, name=f"nl_{j}")
        if j != num_layers - 1
        else LinearLayer(out_dim, use_bias=False, use_bn=True, **bn, name=f"nl_{j}")
        for j in range(num_layers)
      ]
    else:
      layers = []
    # Attributes, not a list: tf.train.Checkpoint does not follow Keras 3's tracked lists.
    for layer in layers:
      setattr(self, layer.name, layer)
    self._layer_names = [layer.name for layer in layers]

  @property
  def layers_(self):
    """The head's LinearLayers in order."""
    return [getattr(self, n) for n in self._layer_names]

  def call(self, inputs, training=None):
    hiddens = [inputs]
    for j, layer in enumerate(self.layers_):
      x = layer(hiddens[-1], training=training)
      if self.mode == "nonlinear" and j != len(self.layers_) - 1:
        x = tf.nn.relu(x)
      hiddens.append(x)
    return hiddens[-1], hiddens[self.ft_proj_selector]


class SimCLRModel(keras.Model):
  """Encoder + projection head + supervised linear head.

  Call: `images` float `[B, H, W, 3]` in [0, 1] (for pretraining, the two views stacked along
  the batch: rows 0..N-1 view one, N..2N-1 view two) -> dict (`OUTPUTS`) of float32 tensors:
  ResNet endpoints, `proj_head_input` `[B, D]`, `proj_head_output` `[B, proj_out_dim]`
  (`[B, D]` for mode `none`), `sup_head_input`, and `logits_sup` `[B, num_classes]` when there
  is a supervised head. During pretraining the supervised head sees stop-gradient features, so
  the linear evaluation trained alongside cannot shape the representation.

  `fine_tune_after_block` (see `resnet.ResNet`) freezes the encoder up to that block; at 4
  (linear evaluation) the projection head is frozen too, BN in inference mode, so that only the
  supervised head trains: the features it reads (`sup_head_input`) are those of the pretrained
  network, whichever projection layer `ft_proj_selector` picks.
  """

  def __init__(self, config: ModelConfig, **kwargs):
    kwargs.setdefault("name", "simclr_model")
    super().__init__(**kwargs)
    self.config = config
    self.encoder = resnet.ResNet(
      depth=config.resnet_depth,
      width_multiplier=config.width_multiplier,
      cifar_stem=config.use_cifar_stem,
      sk_ratio=config.sk_ratio,
      se_ratio=config.se_ratio,
      batch_norm_decay=config.batch_norm_decay,
      synchronized_bn=config.global_bn,
      fine_tune_after_block=config.fine_tune_after_block,
      zero_init_residual=config.zero_init_residual,
      name="resnet",
    )
    self.projection_head = ProjectionHead(
      config.proj_head_mode,
      self.encoder.output_dim,
      out_dim=config.proj_out_dim,
      num_layers=config.num_proj_layers,
      ft_proj_selector=config.ft_proj_selector,
      bn_decay=config.batch_norm_decay,
      synchronized_bn=config.global_bn,
      name="projection_head",
    )
    if config.fine_tune_after_block == 4:
      self.projection_head.trainable = False
    self.supervised_head = (
      LinearLayer(config.num_classes, use_bias=True, use_bn=False, name=SUPERVISED_HEAD_NAME)
      if config.num_classes > 0
      else None
    )

  def call(self, images, training=None):
    out = dict(self.encoder(images, training=training))
    hidden = out["final_avg_pool"]
    proj_out, sup_in = self.projection_head(hidden, training=training)
    out["proj_head_input"] = hidden
    out["proj_head_output"] = proj_out
    out["sup_head_input"] = sup_in
    if self.supervised_head is not None:
      if self.config.train_mode == "pretrain":
        sup_in = tf.stop_gradient(sup_in)
      out["logits_sup"] = self.supervised_head(sup_in, training=training)
    # Mixed precision computes in bfloat16/float16; every consumer (losses, metrics, export)
    # gets float32.
    return {k: tf.cast(v, tf.float32) for k, v in out.items()}

  def zero_init_supervised_head(self):
    """Sets the supervised head's kernel and bias to 0 (`--zero_init_logits_layer`)."""
    for v in self.supervised_head.weights:
      v.assign(tf.zeros_like(v))


def build_model(config: ModelConfig, image_size: int | None = None) -> SimCLRModel:
  """Creates a SimCLRModel and builds its variables with a dummy batch of `image_size`."""
  model = SimCLRModel(config)
  size = image_size or config.image_size
  model(tf.zeros([1, size, size, 3]), training=False)
  return model
