"""The Long-Short Relation-Aware Network of §3.3 / Fig. 2b.

  x      = F_m + WindowAttention(LayerNorm(F_m))          (long relations)
  r_k    = ReLU(BN(Conv3x3_{dilation d_k}(x)))  C -> C/K   (K dilated branches)
  r      = ReLU(BN(Conv1x1([r_1, ..., r_K])))  -> C        (channel mixing)
  F_mt^0 = r * BN(Conv3x3(F_m))                            (boundary gate)

The paper gives the order (window attention, dilated convolutions, concat,
1x1 mix, product with a 3x3 convolution of F_m) but not where normalisation,
activations or residuals go. Choices: a pre-LayerNorm and a residual around
the window attention (as in a Swin block, without its MLP); conv-BN-ReLU in the
branches and the mix; the boundary convolution is conv-BN without activation,
so it acts as a signed, linear gate (as the depthwise features do in HorNet's
gnconv) instead of zeroing three quarters of the product.

Window attention (Swin, Liu et al. 2021) partitions the map into
non-overlapping w x w windows and attends within each, with a learned relative
position bias; with sine_pos, a fixed 2-D sine encoding of the whole map
(models/position.py) is also added to the window's queries and keys (not its
values), so that the attention knows where the window is. When H or W is not
a multiple of w the map is zero-padded at the bottom/right, padded keys are
masked out, and the result is cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jmceln_jax.models import position
from jmceln_jax.models.layers import (
  ConvBN,
  Dtype,
  MultiHeadAttention,
  layer_norm,
)
from jmceln_jax.typing import Array


def window_partition(x: Array, window: int) -> Array:
  """Splits a map into non-overlapping windows, zero-padding bottom/right.

  Args:
    x: [B, H, W, C].
    window: window side w.

  Returns:
    [B, ceil(H/w) * ceil(W/w), w*w, C]; windows in row-major order, pixels
    row-major within a window.
  """
  b, h, w, c = x.shape
  nh, nw = -(-h // window), -(-w // window)
  x = jnp.pad(x, ((0, 0), (0, nh * window - h), (0, nw * window - w), (0, 0)))
  x = x.reshape(b, nh, window, nw, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, nh, nw, w, w, C]
  return x.reshape(b, nh * nw, window * window, c)


def window_merge(windows: Array, window: int, height: int, width: int) -> Array:
  """Inverse of `window_partition`, cropping the padding.

  Args:
    windows: [B, ceil(H/w) * ceil(W/w), w*w, C].
    window: window side w.
    height: H of the unpadded map.
    width: W of the unpadded map.

  Returns:
    [B, H, W, C].
  """
  b, _, _, c = windows.shape
  nh, nw = -(-height // window), -(-width // window)
  x = windows.reshape(b, nh, nw, window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, nh, w, nw, w, C]
  x = x.reshape(b, nh * window, nw * window, c)
  return x[:, :height, :width]


def relative_position_index(window: int) -> np.ndarray:
  """[w*w, w*w] int index into a (2w-1)^2 relative-offset table."""
  coords = np.stack(
    np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  ).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
  return rel[0] * (2 * window - 1) + rel[1]


class WindowAttention(nn.Module):
  """Multi-head self-attention inside w x w windows, any H and W.

  Attributes:
    window: window side w.
    num_heads: attention heads.
    sine_pos: add the map's sine encoding to queries and keys.
    dtype: compute dtype.
  """

  window: int
  num_heads: int
  sine_pos: bool = False
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    _, h, w, c = x.shape
    tokens = window_partition(x, self.window)  # [B, nW, w*w, C]
    queries = tokens
    if self.sine_pos:
      pos = position.sine_map(h, w, c, x.dtype)
      queries = tokens + window_partition(pos, self.window)
    valid = window_partition(jnp.ones((1, h, w, 1), jnp.bool_), self.window)
    key_mask = valid[:, :, None, None, :, 0]  # [1, nW, 1, 1, w*w]
    table = self.param(
      "relative_position_bias",
      nn.initializers.truncated_normal(0.02),
      ((2 * self.window - 1) ** 2, self.num_heads),
    )
    index = relative_position_index(self.window)
    bias = table[index].transpose(2, 0, 1)  # [heads, w*w, w*w]
    out = MultiHeadAttention(self.num_heads, dtype=self.dtype, name="attn")(
      queries, queries, tokens, bias=bias, mask=key_mask
    )
    return window_merge(out, self.window, h, w)


class LSRAN(nn.Module):
  """F_m -> F_mt^0 (module docstring has the equations).

  Attributes:
    window: window-attention side w (13 divides the 52x52 map).
    num_heads: window-attention heads.
    dilations: one dilated 3x3 branch per rate; each has C / len(dilations)
      channels.
    sine_pos: sine position encodings in the window attention.
    dtype: compute dtype.
  """

  window: int = 13
  num_heads: int = 8
  dilations: Sequence[int] = (1, 6, 12, 18)
  sine_pos: bool = False
  dtype: Dtype = None

  @nn.compact
  def __call__(self, f_m: Array, *, train: bool) -> Array:
    """[B, H/8, W/8, C] -> F_mt^0 [B, H/8, W/8, C]."""
    dim = f_m.shape[-1]
    if dim % len(self.dilations):
      raise ValueError(
        f"model.dim={dim} must be divisible by the number of LSRAN dilations "
        f"{tuple(self.dilations)}."
      )
    y = layer_norm(dtype=self.dtype, name="norm")(f_m)
    y = WindowAttention(
      self.window,
      self.num_heads,
      sine_pos=self.sine_pos,
      dtype=self.dtype,
      name="window_attn",
    )(y)
    x = f_m + y
    branch_dim = dim // len(self.dilations)
    relations = [
      ConvBN(branch_dim, 3, dilation=d, dtype=self.dtype, name=f"branch_{k}")(
        x, train=train
      )
      for k, d in enumerate(self.dilations)
    ]
    r = ConvBN(dim, 1, dtype=self.dtype, name="mix")(
      jnp.concatenate(relations, axis=-1), train=train
    )
    boundary = ConvBN(dim, 3, act=None, dtype=self.dtype, name="boundary")(
      f_m, train=train
    )
    return r * boundary
