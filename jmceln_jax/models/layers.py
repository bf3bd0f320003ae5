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
  scanned block, models/stacking.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models import stacking

Dtype = Any

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


class MultiheadAttention(nn.Module):
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
  or scanned (see models/stacking.py).

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
