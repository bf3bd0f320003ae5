"""OpenAI CLIP's text transformer, CRIS-style outputs (words, sentence, mask).

Parameter names mirror the torch state_dict keys of the text tower
(`token_embedding`, `positional_embedding`, `transformer/resblocks/"3"/attn/
q_proj`, `ln_final`, `text_projection`); the converter splits torch's fused
`attn.in_proj_weight` into q/k/v.

As in CRIS the attention mask is causal only (no padding mask), and the
positional embedding is sliced to the sequence length, so any length up to
`context_length` works (e.g. 30 for JMCELN, 77 for OpenAI's).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models import layers
from jmceln_jax.typing import Dtype


class Mlp(nn.Module):
  """`c_fc` (D -> 4D) + QuickGELU + `c_proj` (4D -> D).

  Attributes:
    dtype: compute dtype.
  """

  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D]."""
    dim = x.shape[-1]
    x = nn.Dense(4 * dim, dtype=self.dtype, name="c_fc")(x)
    return nn.Dense(dim, dtype=self.dtype, name="c_proj")(layers.quick_gelu(x))


class ResidualAttentionBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

  Attributes:
    heads: attention heads.
    dtype: compute dtype.
  """

  heads: int
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; mask: bool [L, L] (True = may attend) -> [B, L, D]."""
    y = layers.layer_norm(dtype=self.dtype, name="ln_1")(x)
    x = x + layers.TorchMultiheadAttention(self.heads, self.dtype, name="attn")(
      y, y, y, mask
    )
    y = layers.layer_norm(dtype=self.dtype, name="ln_2")(x)
    return x + Mlp(self.dtype, name="mlp")(y)


class Transformer(nn.Module):
  """torch `Transformer`: `resblocks` "0".."layers-1".

  Attributes:
    num_layers: number of residual blocks.
    heads: attention heads.
    dtype: compute dtype.
    scan: scan the blocks (stacked parameters, ops/stacking.py).
  """

  num_layers: int
  heads: int
  dtype: Dtype | None = None
  scan: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """x: [B, L, D]; mask: bool [L, L] -> [B, L, D]."""
    block = functools.partial(ResidualAttentionBlock, self.heads, self.dtype)
    return layers.Stack(block, self.num_layers, self.scan, name="resblocks")(
      x, mask
    )


class TextTransformer(nn.Module):
  """CLIP's text tower.

  Attributes:
    context_length: rows of the positional embedding (longest input).
    vocab_size: token vocabulary size.
    width: transformer width.
    heads: attention heads.
    num_layers: residual blocks.
    embed_dim: output width of `text_projection` (CLIP's joint embedding).
    dtype: compute dtype; parameters are float32.
    scan: scan the residual blocks (ops/stacking.py).
  """

  context_length: int
  vocab_size: int
  width: int
  heads: int
  num_layers: int
  embed_dim: int
  dtype: Dtype | None = None
  scan: bool = False

  @nn.compact
  def __call__(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """Encodes token ids.

    Args:
      tokens: [B, L] int, L <= context_length, SOT ... EOT then 0 padding;
        EOT must be the largest id of each row (CLIP BPE: 49407).

    Returns:
      "words": [B, L, width] ln_final output (not projected);
      "sentence": [B, embed_dim] the EOT row @ text_projection;
      "pad_mask": [B, L] bool, True at padding (id 0).
    """
    length = tokens.shape[-1]
    if length > self.context_length:
      raise ValueError(
        f"Token length {length} exceeds the text encoder's context length "
        f"{self.context_length}; tokenize with a max length <= "
        f"{self.context_length}."
      )
    x = nn.Embed(
      self.vocab_size,
      self.width,
      embedding_init=nn.initializers.normal(0.02),
      dtype=self.dtype,
      name="token_embedding",
    )(tokens)
    pos = self.param(
      "positional_embedding",
      nn.initializers.normal(0.01),
      (self.context_length, self.width),
    )
    x = x + pos[:length].astype(x.dtype)
    causal = jnp.tril(jnp.ones((length, length), bool))
    x = Transformer(
      self.num_layers, self.heads, self.dtype, self.scan, name="transformer"
    )(x, causal)
    words = layers.layer_norm(dtype=self.dtype, name="ln_final")(x)
    projection = self.param(
      "text_projection",
      nn.initializers.normal(self.width**-0.5),
      (self.width, self.embed_dim),
    )
    eot = words[jnp.arange(words.shape[0]), jnp.argmax(tokens, axis=-1)]
    sentence = eot @ projection.astype(eot.dtype)
    return {"words": words, "sentence": sentence, "pad_mask": tokens == 0}
