"""Building blocks shared by every zoo model, one focused module each:

  checks     argument checks (dtypes, rates, per-stage tuples, forward_intermediates indices)
  dense      Linear, LayerNorm, dropout/drop-path, the transformer MLP, the FSDP gather helper
  attention  multi-head self/cross attention around `kernels_pallas.attention`
  image      patch embedding, torch-convention Conv2d/BatchNorm/ConvBN, 2-D sin-cos codes

Models use them as `layers.<name>`; the names are re-exported here.

Why one package: the paper models (ViT, FIT, SSA, NViST, Swin/VSA) differ in how they wire these
pieces, not in the pieces, so parameter layout, initialisation and mixed-precision handling are
decided once here and every model inherits them.

Conventions (all layers):
  * Every `nnx.Param` is created through `zoo.axes.with_axes`, so it carries one logical axis
    name (or None) per dimension; the training config maps those names to mesh axes.
  * `dtype` is the compute dtype (inputs and weights are cast to it before a matmul),
    `param_dtype` the storage dtype (float32 by default). Norm statistics are always computed in
    float32 and the result cast back to `dtype`, because bf16 mean/variance loses the small
    differences a LayerNorm exists to amplify.
  * Default initialisation follows timm's ViT ("timm" mode): Linear kernels truncated normal with
    std 0.02, biases zero, norm scales one. JAX's truncated normal cuts at +-2 std and rescales to
    keep std 0.02; timm cuts at +-2 absolute, which at std 0.02 never triggers. Both therefore
    draw from (practically) the same distribution.
  * Stochastic layers (dropout, drop-path) draw their randomness from the `rngs` passed at call
    time (stream "dropout"); nothing random is stored in model state. With `train=False` or a
    zero rate they are the identity and need no rngs.
  * Attention goes through `kernels_pallas.attention`, the single attention entry point.
  * Activations are constrained by logical name (`zoo.axes.constrain`): attention q/k/v as
    [batch, length, heads, kv], the MLP hidden layer as [batch, ..., mlp], the outputs of both
    as [batch, ..., embed]. Under a mesh the batch is then split over the data axes and heads and
    hidden units over `tensor` at every layer, whatever the model around them does; outside
    a mesh these calls do nothing.
"""
from zoo.layers.checks import (  # noqa: F401
        canonical_dtype, check_positive_int, check_rate, int_pair, int_tuple, select_indices)
from zoo.layers.dense import (  # noqa: F401
        DEFAULT_KERNEL_INIT, ONES_INIT, XAVIER_INIT, ZEROS_INIT, Dropout, DropPath,
        Initializer, LayerNorm, Linear, Mlp, constrain_channels_last, drop_path, dropout,
        gathered, xavier_linear)
from zoo.layers.attention import (  # noqa: F401
        ATTENTION_IMPLS, ATTENTION_LOGITS, Attention, capturing)
from zoo.layers.image import (  # noqa: F401
        CONV_AXES, HE_FAN_OUT_INIT, BatchNorm, Conv2d, ConvBN, PatchEmbed, average_pool_head,
        sincos_2d, torch_uniform)
