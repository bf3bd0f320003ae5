"""OpenAI CLIP's ModifiedResNet image encoder (NHWC) with both attention pools.

Module and parameter names mirror the torch state_dict keys of `visual.*`
(`conv1`, `bn1`, `layer3/"5"/conv2`, `layer1/"0"/downsample/"0"`,
`attnpool/q_proj`, ...), so converting OpenAI weights is a renaming.

The attention pool comes in two forms sharing one set of parameters:
- `pooled`: OpenAI's original pool; the mean token is the only query, with the
  checkpoint's positional embedding. Valid only at the native feature grid
  (`input_resolution // 32` squared).
- `dense`: CRIS's pool, used by JMCELN as C5. Every feature-map position is a
  query/key/value; the positional embedding minus its class row is resized
  bicubically (torch semantics, jmceln_jax.ops.resize) to the feature grid inside
  the forward pass; the output adds a new `connect` 1x1 conv + BatchNorm
  residual and a ReLU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models import layers
from jmceln_jax.ops import resize, stacking
from jmceln_jax.ops.conv import Conv
from jmceln_jax.typing import Dtype

EXPANSION = 4
PAD1 = ((1, 1), (1, 1))


def _avg_pool(x: jax.Array, stride: int) -> jax.Array:
  """torch `AvgPool2d(stride)` on [B, H, W, C] (floors odd sizes)."""
  return nn.avg_pool(x, (stride, stride), strides=(stride, stride))


class PoolConvBN(nn.Module):
  """[AvgPool(pool)] + 1x1 conv (no bias) "0" + BatchNorm "1".

  The torch `downsample` Sequential of a Bottleneck (keys "-1", "0", "1") and
  CRIS's `connect` residual (keys "0", "1").

  Attributes:
    features: output channels.
    pool: AvgPool stride applied first; 1 for none.
    dtype: compute dtype.
  """

  features: int
  pool: int = 1
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/pool, W/pool, features]."""
    if self.pool > 1:
      x = _avg_pool(x, self.pool)
    x = Conv(self.features, (1, 1), use_bias=False, dtype=self.dtype, name="0")(
      x
    )
    return layers.batch_norm(
      use_running_average=use_running_average, dtype=self.dtype, name="1"
    )(x)


class Bottleneck(nn.Module):
  """Anti-aliased bottleneck: strided blocks AvgPool after conv2.

  Attributes:
    planes: bottleneck width; the output has 4 * planes channels.
    stride: spatial downsampling (by AvgPool, every conv has stride 1).
    dtype: compute dtype.
  """

  planes: int
  stride: int = 1
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/stride, W/stride, 4 * planes]."""
    conv = functools.partial(Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      layers.batch_norm,
      use_running_average=use_running_average,
      dtype=self.dtype,
    )
    out = nn.relu(norm(name="bn1")(conv(self.planes, (1, 1), name="conv1")(x)))
    out = conv(self.planes, (3, 3), padding=PAD1, name="conv2")(out)
    out = nn.relu(norm(name="bn2")(out))
    if self.stride > 1:
      out = _avg_pool(out, self.stride)
    out = conv(EXPANSION * self.planes, (1, 1), name="conv3")(out)
    out = norm(name="bn3")(out)
    if self.stride > 1 or x.shape[-1] != EXPANSION * self.planes:
      x = PoolConvBN(
        EXPANSION * self.planes, self.stride, self.dtype, name="downsample"
      )(x, use_running_average=use_running_average)
    # Its own buffer: XLA's CPU fusion would otherwise recompute the residual
    # stream of all earlier blocks in this one (stacking.materialize).
    return stacking.materialize(nn.relu(out + x))


class ResNetStage(nn.Module):
  """torch `layer{1..4}`: Bottlenecks named "0", "1", ...; block 0 strides.

  Attributes:
    planes: bottleneck width.
    blocks: number of Bottlenecks.
    stride: stride of the first block.
    dtype: compute dtype.
    scan: scan blocks 1.. (identical shapes; ops/stacking.py).
  """

  planes: int
  blocks: int
  stride: int
  dtype: Dtype | None = None
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/stride, W/stride, 4 * planes]."""
    block = functools.partial(Bottleneck, self.planes, dtype=self.dtype)
    x = block(self.stride, name="0")(x, use_running_average=use_running_average)
    return stacking.run_blocks(
      functools.partial(block, 1),
      x,
      1,
      self.blocks,
      self.scan,
      use_running_average=use_running_average,
    )


class AttentionPool2d(nn.Module):
  """The attention pool in OpenAI's (`pool`) and CRIS's (`dense`) forms.

  Both forms share `positional_embedding` [grid**2 + 1, width] (row 0 belongs
  to the mean token), `q_proj`/`k_proj`/`v_proj` (width -> width) and `c_proj`
  (width -> output_dim). `connect` (1x1 conv + BN) is used by `dense` only;
  OpenAI checkpoints do not have it.

  Attributes:
    grid: the checkpoint's native feature grid side (input_resolution // 32).
    width: input channels (32 * the ResNet width).
    num_heads: attention heads (width // 64 in OpenAI CLIP).
    output_dim: output channels (CLIP's embed_dim).
    dtype: compute dtype.
  """

  grid: int
  width: int
  num_heads: int
  output_dim: int
  dtype: Dtype | None = None

  def setup(self):
    init = nn.initializers.normal(stddev=self.width**-0.5)
    self.positional_embedding = self.param(
      "positional_embedding", init, (self.grid**2 + 1, self.width)
    )
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=init)
    self.q_proj = dense(self.width)
    self.k_proj = dense(self.width)
    self.v_proj = dense(self.width)
    self.c_proj = dense(self.output_dim)
    self.connect = PoolConvBN(self.output_dim, dtype=self.dtype)

  def _attend(self, query: jax.Array, tokens: jax.Array) -> jax.Array:
    """`query` [B, Lq, width] over `tokens` [B, L, width] -> [B, Lq, out]."""
    out = layers.multi_head_attention(
      self.q_proj(query),
      self.k_proj(tokens),
      self.v_proj(tokens),
      self.num_heads,
    )
    return self.c_proj(out)

  def pool(self, x: jax.Array) -> jax.Array:
    """OpenAI's pool: [B, grid, grid, width] -> [B, output_dim].

    Raises:
      ValueError: if the feature grid is not the native `grid` x `grid`.
    """
    batch, height, width, channels = x.shape
    if (height, width) != (self.grid, self.grid):
      raise ValueError(
        f"The pooled CLIP embedding needs the native {self.grid}x{self.grid} "
        f"feature grid (input {32 * self.grid}x{32 * self.grid}), got "
        f"{height}x{width}. Use the `dense` output at other resolutions."
      )
    tokens = x.reshape(batch, height * width, channels)
    tokens = jnp.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1)
    tokens = tokens + self.positional_embedding.astype(tokens.dtype)
    return self._attend(tokens[:, :1], tokens)[:, 0]

  def dense(self, x: jax.Array, *, use_running_average: bool) -> jax.Array:
    """CRIS's dense pool: [B, h, w, width] -> [B, h, w, output_dim].

    Any h, w: the positional embedding's grid x grid part is resized to h x w.
    """
    batch, height, width, channels = x.shape
    residual = self.connect(x, use_running_average=use_running_average)
    pos = self.positional_embedding[1:].reshape(self.grid, self.grid, channels)
    pos = resize.resize(pos, (height, width), "bicubic").astype(x.dtype)
    tokens = (x + pos).reshape(batch, height * width, channels)
    out = self._attend(tokens, tokens).reshape(batch, height, width, -1)
    return nn.relu(out + residual)


class ModifiedResNet(nn.Module):
  """CLIP's ModifiedResNet trunk plus both attention pools.

  Attributes:
    stage_sizes: Bottleneck counts of layer1..4, e.g. (3, 4, 23, 3) = RN101.
    output_dim: attention-pool output channels (CLIP's embed_dim).
    heads: attention-pool heads (width * 32 // 64 in OpenAI CLIP).
    input_resolution: the checkpoint's input side; fixes the positional
      embedding's grid (input_resolution // 32).
    width: stem width (64 for RN50/RN101, 80 for RN50x4, ...).
    freeze_bn: True: the BatchNorms of OpenAI's CLIP always use (and never
      update) their running statistics. The dense pool's `connect` BatchNorm
      is new (CRIS's; no checkpoint has statistics for it) and always
      follows `train`. False: batch statistics when train=True.
    dtype: compute dtype; parameters are float32.
    scan: scan the identical blocks of each stage (ops/stacking.py).
  """

  stage_sizes: Sequence[int]
  output_dim: int
  heads: int
  input_resolution: int = 224
  width: int = 64
  freeze_bn: bool = False
  dtype: Dtype | None = None
  scan: bool = False

  @nn.compact
  def __call__(
    self,
    images: jax.Array,
    *,
    train: bool = False,
    pooled: bool | None = None,
  ) -> dict[str, jax.Array]:
    """Encodes CLIP-normalised images.

    Args:
      images: [B, H, W, 3] float; H and W ideally multiples of 32.
      train: BatchNorm mode (ignored when freeze_bn). With train=True and
        trainable BN, apply needs `mutable=["batch_stats"]`.
      pooled: include OpenAI's pooled embedding: None = only when the
        feature grid is the native one, True = always (error otherwise),
        False = never.

    Returns:
      "layer1".."layer4": [B, H/4, W/4, 4w], [B, H/8, W/8, 8w],
      [B, H/16, W/16, 16w], [B, H/32, W/32, 32w] (w = width);
      "dense": [B, H/32, W/32, output_dim] (CRIS pool, C5);
      "pooled": [B, output_dim] if requested / available.
    """
    use_ra = self.freeze_bn or not train
    norm = functools.partial(
      layers.batch_norm, use_running_average=use_ra, dtype=self.dtype
    )
    conv = functools.partial(
      Conv,
      kernel_size=(3, 3),
      padding=PAD1,
      use_bias=False,
      dtype=self.dtype,
    )
    x = jnp.asarray(images, self.dtype)
    x = conv(self.width // 2, strides=(2, 2), name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = nn.relu(norm(name="bn2")(conv(self.width // 2, name="conv2")(x)))
    x = nn.relu(norm(name="bn3")(conv(self.width, name="conv3")(x)))
    x = _avg_pool(x, 2)
    out = {}
    for i, blocks in enumerate(self.stage_sizes):
      x = ResNetStage(
        self.width * 2**i,
        blocks,
        stride=1 if i == 0 else 2,
        dtype=self.dtype,
        scan=self.scan,
        name=f"layer{i + 1}",
      )(x, use_running_average=use_ra)
      out[f"layer{i + 1}"] = x

    grid = self.input_resolution // 32
    attnpool = AttentionPool2d(
      grid,
      32 * self.width,
      self.heads,
      self.output_dim,
      self.dtype,
      name="attnpool",
    )
    # `connect` is not OpenAI's: nothing converted to freeze.
    out["dense"] = attnpool.dense(x, use_running_average=not train)
    native = x.shape[1:3] == (grid, grid)
    if pooled or (pooled is None and native):
      out["pooled"] = attnpool.pool(x)
    return out
