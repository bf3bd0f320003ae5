"""The Progressive Alignment Network of §3.4.2 / Fig. 2c (HorNet-gnconv-like).

  [f1, f2, f3] = split(DWConv7x7(Conv1x1(F_mt'^{i+1})), [C/4, C/2, C])
  g  = Conv1x1(F_mt^i)                 C -> C/4   (previous stage as filter)
  y  = g * f1
  y  = Conv3x3(y) * f2                 C/4 -> C/2
  y  = Conv3x3(y) * f3                 C/2 -> C
  F_mt^{i+1} = SwitchNorm(Conv1x1(y)) + residual

residual is F_mt^i (pan_residual="previous", the paper's text) or
F_mt'^{i+1} (pan_residual="input"). Differences from HorNet's gnconv: the
first gate g comes from the previous stage instead of the input's own
projection, the progressive convolutions are 3x3 (paper) instead of 1x1, and
SwitchNorm replaces the block's LayerNorm. HorNet's 1/3 scale on the
depthwise output and layer scale are not used (the paper mentions neither).

The convolutions along the gated path (g, both 3x3, the output 1x1) have no
bias, so the path is linear in g: when g is zero (a zero previous-stage
output, or a zero projection) the input to SwitchNorm is exactly zero and the
block returns residual + SwitchNorm(0) = residual + bias in training mode.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jmceln_jax.models.layers import Dtype
from jmceln_jax.models.switchnorm import SwitchNorm
from jmceln_jax.ops.conv import Conv, DepthwiseConv
from jmceln_jax.typing import Array

PAN_RESIDUALS = ("previous", "input")


class PAN(nn.Module):
  """Gates the current stage output by the previous one.

  Attributes:
    residual: "previous" (add F_mt^i) or "input" (add F_mt'^{i+1}).
    dtype: compute dtype.
  """

  residual: str = "previous"
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: Array, previous: Array, *, train: bool) -> Array:
    """Computes F_mt^{i+1}.

    Args:
      x: F_mt'^{i+1}, [B, h, w, C] (C divisible by 4).
      previous: F_mt^i, [B, h, w, C].
      train: SwitchNorm batch statistics (True) or running ones (False).

    Returns:
      [B, h, w, C]. The pre-norm gated path is sown as
      intermediates/gated.
    """
    if self.residual not in PAN_RESIDUALS:
      raise ValueError(
        f"model.pan_residual={self.residual!r}; choose one of {PAN_RESIDUALS}."
      )
    c = x.shape[-1]
    if c % 4:
      raise ValueError(f"PAN needs model.dim divisible by 4, got {c}.")
    dims = (c // 4, c // 2, c)
    conv = functools.partial(Conv, dtype=self.dtype)
    gate_conv = functools.partial(conv, use_bias=False)
    pad3 = ((1, 1), (1, 1))

    abc = conv(sum(dims), (1, 1), name="proj_in")(x)
    abc = DepthwiseConv(7, dtype=self.dtype, name="dwconv")(abc)
    f1, f2, f3 = jnp.split(abc, [dims[0], dims[0] + dims[1]], axis=-1)
    y = gate_conv(dims[0], (1, 1), name="proj_prev")(previous) * f1
    y = gate_conv(dims[1], (3, 3), padding=pad3, name="pws_0")(y) * f2
    y = gate_conv(dims[2], (3, 3), padding=pad3, name="pws_1")(y) * f3
    y = gate_conv(c, (1, 1), name="proj_out")(y)
    self.sow("intermediates", "gated", y)
    y = SwitchNorm(dtype=self.dtype, name="norm")(y, train=train)
    return (previous if self.residual == "previous" else x) + y
