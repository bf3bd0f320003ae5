"""Switchable Normalization (Luo et al., ICLR 2019) for NHWC feature maps.

Follows the reference `SwitchNorm2d` (switchablenorms/Switchable-Normalization,
devkit/ops/switchable_norm.py) with `using_bn=True` and
`using_moving_average=True`:

- instance statistics per sample and channel over H*W; the IN variance is the
  UNBIASED one (torch `x.var(-1)`, divisor H*W - 1), as in the reference;
- layer statistics are derived from the instance ones:
  mean_ln = mean_C(mean_in), var_ln = mean_C(var_in + mean_in^2) - mean_ln^2;
- batch statistics likewise over the batch:
  mean_bn = mean_B(mean_in), var_bn = mean_B(var_in + mean_in^2) - mean_bn^2;
- mean = sum_k softmax(mean_weight)_k * mean_k, same for var with
  var_weight (order IN, LN, BN); y = (x - mean) / sqrt(var + eps) * scale +
  bias.

Running statistics live in the "batch_stats" collection (`mean`, `var`, both
initialised to ZERO as in the reference) and are updated in training as
running = momentum * running + (1 - momentum) * batch with momentum 0.9, i.e.
torch's BatchNorm momentum 0.1. In eval mode the BN branch uses the running
statistics while IN and LN statistics still come from the current sample.

A zero input has zero statistics of every kind, so in training mode (and in
eval mode while the running statistics are zero) its output is exactly `bias`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models.layers import BN_EPSILON, BN_MOMENTUM, Dtype
from jmceln_jax.typing import Array


class SwitchNorm(nn.Module):
  """SwitchNorm over [B, H, W, C]; statistics in float32.

  Attributes:
    momentum: running-statistics decay (0.9 == torch momentum 0.1).
    epsilon: added to the mixed variance.
    dtype: output dtype (None: the input's).
  """

  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Normalises x: [B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    if h * w < 2:
      raise ValueError(
        f"SwitchNorm needs at least 2 spatial positions for its unbiased "
        f"instance variance; got a {h}x{w} map. Use a larger input."
      )
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    mean_weight = self.param("mean_weight", nn.initializers.ones, (3,))
    var_weight = self.param("var_weight", nn.initializers.ones, (3,))
    running_mean = self.variable(
      "batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32)
    )
    running_var = self.variable(
      "batch_stats", "var", lambda: jnp.zeros((c,), jnp.float32)
    )

    x32 = x.astype(jnp.float32)
    mean_in = jnp.mean(x32, axis=(1, 2), keepdims=True)  # [B, 1, 1, C]
    var_in = jnp.var(x32, axis=(1, 2), keepdims=True, ddof=1)
    second_moment = var_in + mean_in**2
    mean_ln = jnp.mean(mean_in, axis=-1, keepdims=True)  # [B, 1, 1, 1]
    var_ln = jnp.mean(second_moment, axis=-1, keepdims=True) - mean_ln**2
    if train:
      mean_bn = jnp.mean(mean_in, axis=0)  # [1, 1, C]
      var_bn = jnp.mean(second_moment, axis=0) - mean_bn**2
      if not self.is_initializing():
        decay = self.momentum
        running_mean.value = decay * running_mean.value + (
          1.0 - decay
        ) * mean_bn.reshape(c)
        running_var.value = decay * running_var.value + (
          1.0 - decay
        ) * var_bn.reshape(c)
    else:
      mean_bn = running_mean.value
      var_bn = running_var.value

    wm = jax.nn.softmax(mean_weight)
    wv = jax.nn.softmax(var_weight)
    mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
    var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale + bias
    return y.astype(self.dtype or x.dtype)
