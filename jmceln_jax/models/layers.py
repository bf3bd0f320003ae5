"""Small building blocks with PyTorch numerics, shared by the model files.

Everything here pins one torch convention in one place:
- BatchNorm: torch momentum 0.1 is flax momentum 0.9; eps 1e-5.
- LayerNorm: eps 1e-5 (flax's default is 1e-6).
- QuickGELU: x * sigmoid(1.702 x), as in OpenAI CLIP.
- `dot_product_attention`: the package's one attention core (CLIP and the
  decoder), float32 logits and softmax.
- Multi-head attention with separate q/k/v projections (torch's
  `nn.MultiheadAttention` after splitting its fused `in_proj_weight`).
- `Stack`: a sequence of blocks named "0", "1", ... like torch's
  `nn.Sequential`, so parameter paths mirror torch state_dict keys (or one
  scanned block, ops/stacking.py).

And the decoder's layers: Conv-BN-activation, multi-head attention with
arbitrary leading batch dimensions (windows) around the same float32 core,
the depthwise convolution, and the compute-dtype helper. All tensors are NHWC.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.ops import stacking
from jmceln_jax.ops.conv import Conv
from jmceln_jax.typing import Array, Dtype

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
LN_EPSILON = 1e-5


def batch_norm(
  *, use_running_average: bool, dtype: Dtype | None = None, **kwargs: Any
) -> nn.BatchNorm:
  """A `nn.BatchNorm` with torch's defaults (momentum 0.1, eps 1e-5).

  Args:
    use_running_average: True normalises with the running statistics and never
      updates them; False uses batch statistics and updates the running ones
      (apply then needs `mutable=["batch_stats"]`).
    dtype: compute dtype (parameters stay float32).
    **kwargs: further `nn.BatchNorm` arguments (e.g. `name`).

  Returns:
    The (unbound) BatchNorm module.
  """
  return nn.BatchNorm(
    use_running_average=use_running_average,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    **kwargs,
  )


def layer_norm(*, dtype: Dtype | None = None, **kwargs: Any) -> nn.LayerNorm:
  """A `nn.LayerNorm` with torch's eps 1e-5 (statistics in float32)."""
  return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, **kwargs)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def dot_product_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  *,
  bias: jax.Array | None = None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Scaled dot-product attention over projected, head-split inputs.

  The one attention core of the package (CLIP and the decoder). Logits,
  scaling, bias, mask and softmax are float32 whatever the input dtype; the
  probabilities are cast back to the dtype of `value` for the second product.
  Leading dimensions are batch dimensions (e.g. [B, windows]).

  Args:
    query: [..., Tq, heads, d].
    key: [..., Tk, heads, d].
    value: [..., Tk, heads, dv].
    bias: optional additive logit bias broadcastable to [..., heads, Tq, Tk].
    mask: optional bool broadcastable to [..., heads, Tq, Tk]; True where a
      key may be attended. A query with no allowed key attends uniformly.

  Returns:
    [..., Tq, heads, dv] in the dtype of `value`.
  """
  logits = jnp.einsum(
    "...qhd,...khd->...hqk", query, key, preferred_element_type=jnp.float32
  ) * (query.shape[-1] ** -0.5)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.einsum("...hqk,...khd->...qhd", probs, value)


def multi_head_attention(
  query: jax.Array,
  key: jax.Array,
  value: jax.Array,
  num_heads: int,
  mask: jax.Array | None = None,
) -> jax.Array:
  """`dot_product_attention` on inputs whose heads are fused in the width.

  Args:
    query: [B, Lq, D].
    key: [B, Lk, D].
    value: [B, Lk, D].
    num_heads: number of heads; D must be divisible by it.
    mask: optional bool, broadcastable to [B, num_heads, Lq, Lk]; True where
      attention is allowed.

  Returns:
    [B, Lq, D] in the dtype of `value`; logits and softmax are float32.
  """
  dim = query.shape[-1]
  if dim % num_heads:
    raise ValueError(f"width {dim} is not divisible by {num_heads} heads.")

  def split(x: jax.Array) -> jax.Array:  # [B, L, D] -> [B, L, heads, D/heads]
    return x.reshape(*x.shape[:-1], num_heads, dim // num_heads)

  out = dot_product_attention(split(query), split(key), split(value), mask=mask)
  return out.reshape(*out.shape[:-2], dim)


class TorchMultiheadAttention(nn.Module):
  """torch `nn.MultiheadAttention` (batch-first) with q/k/v projections.

  Child names follow the torch keys once the fused `in_proj_weight` is split:
  `q_proj`, `k_proj`, `v_proj` (D -> D, with bias) and `out_proj`.

  Attributes:
    num_heads: number of attention heads.
    dtype: compute dtype; parameters are float32.
  """

  num_heads: int
  dtype: Dtype | None = None

  @nn.compact
  def __call__(
    self,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array | None = None,
  ) -> jax.Array:
    """Attends `query` [B, Lq, D] to `key`/`value` [B, Lk, D] -> [B, Lq, D].

    `mask` is as in `multi_head_attention` (True = allowed).
    """
    dim = query.shape[-1]

    def dense(name: str) -> nn.Dense:
      return nn.Dense(dim, dtype=self.dtype, name=name)

    out = multi_head_attention(
      dense("q_proj")(query),
      dense("k_proj")(key),
      dense("v_proj")(value),
      self.num_heads,
      mask,
    )
    return dense("out_proj")(out)


class Stack(nn.Module):
  """Blocks applied in sequence, named "0", "1", ... (torch nn.Sequential),
  or scanned (see ops/stacking.py).

  Attributes:
    block: module factory taking `name=`, e.g. functools.partial(Block, ...).
    count: number of blocks.
    scan: one scanned block with stacked parameters.
  """

  block: Callable[..., nn.Module]
  count: int
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """Returns block[count-1](...block[0](x, *args, **kwargs)...)."""
    return stacking.run_blocks(
      self.block, x, 0, self.count, self.scan, *args, **kwargs
    )


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
    x = batch_norm(use_running_average=not train, dtype=self.dtype, name="bn")(
      x
    )
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
    out = dot_product_attention(q, k, v, bias=bias, mask=mask)
    return nn.DenseGeneral(dim, axis=(-2, -1), dtype=self.dtype, name="out")(
      out
    )
