"""Layers shared by the JMCELN decoder modules.

Conv-BN-activation, multi-head attention with arbitrary leading batch
dimensions (windows) around the float32 core `layers.dot_product_attention`,
the depthwise convolution, and the compute-dtype helper. All tensors are NHWC.
Torch-parity norm constructors come from `jmceln_jax.models.layers`, resizing
from `jmceln_jax.resize`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models import layers
from jmceln_jax.models.conv import Conv

Array = jax.Array
Dtype = Any


def compute_dtype(dtype: Dtype | str | None) -> jnp.dtype | None:
  """Turns a config dtype ("float32", "bfloat16", None) into a jnp dtype."""
  return None if dtype is None else jnp.dtype(dtype)


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm + optional activation, 'same' padding.

  Attributes:
    features: output channels.
    kernel_size: square kernel side (odd).
    dilation: kernel dilation; the padding keeps the spatial size.
    act: activation after the norm, or None for a linear output.
    dtype: compute dtype.
  """

  features: int
  kernel_size: int = 3
  dilation: int = 1
  act: Callable[[Array], Array] | None = nn.relu
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """[B, H, W, Cin] -> [B, H, W, features]."""
    pad = self.dilation * (self.kernel_size // 2)
    x = Conv(
      self.features,
      (self.kernel_size, self.kernel_size),
      padding=((pad, pad), (pad, pad)),
      kernel_dilation=self.dilation,
      use_bias=False,
      dtype=self.dtype,
      name="conv",
    )(x)
    x = layers.batch_norm(
      use_running_average=not train, dtype=self.dtype, name="bn"
    )(x)
    return x if self.act is None else self.act(x)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention (Vaswani et al.) with projections.

  Logits and softmax are computed in float32 whatever the compute dtype. The
  query, value and output projections have biases, the key projection has
  none (it would cancel in the softmax and only receive zero gradients).
  Leading dimensions of the inputs are batch dimensions, so windows or other
  groupings need no reshape into one batch axis.

  Attributes:
    num_heads: number of heads; the query width must be divisible by it.
    dtype: compute dtype of the projections.
  """

  num_heads: int
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None = None,
    mask: Array | None = None,
  ) -> Array:
    """Attends `query` to `key`/`value`.

    Args:
      query: [..., Tq, C].
      key: [..., Tk, Ck].
      value: [..., Tk, Cv].
      bias: optional additive logit bias broadcastable to [..., heads, Tq, Tk].
      mask: optional bool, broadcastable to [..., heads, Tq, Tk]; True where
        a key may be attended. Every query must keep at least one key.

    Returns:
      [..., Tq, C] in the compute dtype.
    """
    dim = query.shape[-1]
    if dim % self.num_heads:
      raise ValueError(
        f"Attention width {dim} is not divisible by num_heads="
        f"{self.num_heads}; change model.dim or model.num_heads."
      )
    head_dim = dim // self.num_heads

    def project(x: Array, name: str, use_bias: bool = True) -> Array:
      return nn.DenseGeneral(
        (self.num_heads, head_dim),
        use_bias=use_bias,
        dtype=self.dtype,
        name=name,
      )(x)

    q = project(query, "query")
    # A key bias shifts every logit of a query equally: softmax ignores it.
    k = project(key, "key", use_bias=False)
    v = project(value, "value")
    out = layers.dot_product_attention(q, k, v, bias=bias, mask=mask)
    return nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, name="out")(
      out
    )
