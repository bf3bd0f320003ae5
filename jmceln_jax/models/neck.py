"""The neck of §3.2 (Eq. 1-2): top-down fusion of C3..C5 with the sentence.

  F_m2 = σ(F_s W_s) ⊙ σ(C5 W_v3)                      at H/32   (Eq. 1)
  F_m1 = σ(W_m2 [Up(F_m2), σ(C4 W_v2)])               at H/16   (Eq. 2, i=2)
  F_m  = σ(W_m1 [Up(F_m1), σ(C3 W_v1)])               at H/8    (Eq. 2, i=1)

σ = BatchNorm + LeakyReLU (slope 0.01, torch's default); Up = 2x bilinear
(align_corners=False). With coord_conv, F_m then goes through CRIS's
CoordConv: normalised x, y channels joined, a 3x3 convolution back to C and
σ (models/position.py). Kernel sizes follow CRIS's FPN: W_v3 is 1x1 (CRIS
`f1_v_proj`), W_v2 and W_v1 are 3x3 (CRIS `f2_v_proj`, `f3_v_proj`), the
fusion convolutions W_m2 and W_m1 after the concatenation are 1x1 (CRIS
`f2_cat`, `f3_cat`). Every projection outputs C channels. Convolutions have no
bias (a BatchNorm follows). W_s is a linear layer without bias.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from jmceln_jax.models import layers, position
from jmceln_jax.models.layers import ConvBN, Dtype
from jmceln_jax.ops.resize import upsample2x
from jmceln_jax.typing import Array


def check_pyramid(c3: Array, c4: Array, c5: Array) -> None:
  """Raises ValueError unless c3/c4/c5 are at strides 8/16/32 of one image."""
  for name, fine, coarse in (("C4", c4, c5), ("C3", c3, c4)):
    want = (2 * coarse.shape[1], 2 * coarse.shape[2])
    if fine.shape[1:3] != want or fine.shape[0] != coarse.shape[0]:
      raise ValueError(
        f"Feature pyramid mismatch: {name} has shape {fine.shape} but 2x "
        f"upsampling of the coarser level gives {want}. Input image sides "
        "must be multiples of 32."
      )


class Neck(nn.Module):
  """Fuses visual features C3, C4, C5 and the sentence feature into F_m.

  Attributes:
    dim: C, the output channels.
    coord_conv: end with CRIS's CoordConv (absolute position channels).
    dtype: compute dtype.
  """

  dim: int
  coord_conv: bool = False
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self, c3: Array, c4: Array, c5: Array, sentence: Array, *, train: bool
  ) -> Array:
    """Computes F_m.

    Args:
      c3: [B, H/8, W/8, C3] (CLIP layer2).
      c4: [B, H/16, W/16, C4] (CLIP layer3).
      c5: [B, H/32, W/32, C5] (CLIP dense attention pool).
      sentence: [B, Ds] global sentence feature F_s.
      train: batch statistics (True) or running averages (False).

    Returns:
      F_m: [B, H/8, W/8, dim].
    """
    check_pyramid(c3, c4, c5)
    conv = functools.partial(
      ConvBN, self.dim, act=nn.leaky_relu, dtype=self.dtype
    )
    s = nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="w_s")(
      sentence
    )
    bn_s = layers.batch_norm(
      use_running_average=not train, dtype=self.dtype, name="bn_s"
    )
    s = nn.leaky_relu(bn_s(s))
    f = conv(kernel_size=1, name="w_v3")(c5, train=train) * s[:, None, None, :]
    for level, feature in ((2, c4), (1, c3)):
      v = conv(kernel_size=3, name=f"w_v{level}")(feature, train=train)
      f = jnp.concatenate([upsample2x(f), v], axis=-1)
      f = conv(kernel_size=1, name=f"w_m{level}")(f, train=train)
    if self.coord_conv:
      f = conv(kernel_size=3, name="coord")(
        position.add_coordinates(f), train=train
      )
    return f
