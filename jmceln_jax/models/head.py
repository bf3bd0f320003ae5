"""The progressive upsampling head of §3.5 (LAVT SimpleDecoding style).

Per stage: 2x bilinear upsampling (align_corners=False), then
conv3x3-BN-ReLU twice at `channels[k]`; finally a 1x1 convolution (with bias)
to the 2 classes. With three stages a 52x52 map becomes 416x416.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jmceln_jax.models.layers import ConvBN, Dtype
from jmceln_jax.ops.conv import Conv
from jmceln_jax.ops.resize import upsample2x
from jmceln_jax.typing import Array


class Head(nn.Module):
  """[B, h, w, C] -> logits [B, h * 2^K, w * 2^K, num_classes] (float32).

  Attributes:
    channels: channels of the K upsampling stages.
    num_classes: output classes (2: background, referent).
    dtype: compute dtype.
  """

  channels: Sequence[int] = (256, 128, 64)
  num_classes: int = 2
  dtype: Dtype = None

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    """Upsamples and classifies; see the class docstring for shapes."""
    for k, ch in enumerate(self.channels):
      x = upsample2x(x)
      for j in range(2):
        x = ConvBN(ch, 3, dtype=self.dtype, name=f"up{k}_conv{j}")(
          x, train=train
        )
    logits = Conv(
      self.num_classes, (1, 1), dtype=self.dtype, name="classifier"
    )(x)
    return logits.astype(jnp.float32)
