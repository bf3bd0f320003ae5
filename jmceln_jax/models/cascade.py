"""Joint Mask Contextual Embedding Learning cascade (§3.4, Eq. 3-4, Fig. 2a).

Stage i (i = 0..n-1):
  Eq. 3  q^{i+1}      = MHA(query=q^i, key=F_m, value=V^i) + q^i
  Eq. 4  F_mt'^{i+1}  = MHA(query=F_mt^i, key=value=q^{i+1}) + F_mt^i
  PAN    F_mt^{i+1}   = PAN(F_mt'^{i+1}, previous=F_mt^i)     (use_pan)
         F_mt^{i+1}   = F_mt'^{i+1}                            (otherwise)

V^i = F_mt^i with adaptive LCE (the embedding update sees the current
reasoning output); V^i = F_mt^0 for every stage without it (Table 2 row 6),
so no stage output feeds back into the embeddings. q^0 is a learned [Q, C]
embedding, N(0, query_init_std^2), shared by the batch. With use_words the
word features (projected to C) are appended to the keys and values of Eq. 3,
padded words masked out. With sine_pos, a fixed 2-D sine encoding P of the
map (models/position.py) is added to the pixel keys of Eq. 3 (F_m + P) and
the pixel queries of Eq. 4 (F_mt^i + P); values stay position-free. As in the
paper's equations there is no LayerNorm around the attentions; each MHA has
its own q/k/v/out projections.

Each stage also reports how alike its Q embeddings are ("query_cosine", the
mean cosine similarity over pairs of rows of q^{i+1}): near 1 the embeddings
have collapsed into one and the cascade has one query, not Q.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jmceln_jax.models import position
from jmceln_jax.models.layers import Dtype, MultiHeadAttention
from jmceln_jax.models.pan import PAN
from jmceln_jax.typing import Array


class CascadeStage(nn.Module):
  """One stage: Eq. 3, Eq. 4 and (optionally) PAN, on explicit inputs.

  Attributes:
    num_heads: heads of both attentions.
    use_pan: apply PAN after Eq. 4.
    pan_residual: see PAN.
    dtype: compute dtype.
  """

  num_heads: int = 8
  use_pan: bool = True
  pan_residual: str = "previous"
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    q: Array,
    keys: Array,
    values: Array,
    f_mt: Array,
    key_mask: Array | None = None,
    pixel_pos: Array | None = None,
    *,
    train: bool,
  ) -> tuple[Array, Array]:
    """Runs stage i.

    Args:
      q: q^i, [B, Q, C].
      keys: Eq. 3 keys, [B, N, C] (F_m tokens, then words if used).
      values: Eq. 3 values, [B, N, C] (F_mt^i or F_mt^0 tokens, then words).
      f_mt: F_mt^i, [B, h, w, C].
      key_mask: optional bool [B, 1, 1, N], True for keys to attend.
      pixel_pos: optional [1, h*w, C] added to Eq. 4's pixel queries.
      train: norm statistics mode (PAN).

    Returns:
      (q^{i+1} [B, Q, C], F_mt^{i+1} [B, h, w, C]).
    """

    def mha(name: str) -> MultiHeadAttention:
      return MultiHeadAttention(self.num_heads, dtype=self.dtype, name=name)

    q = q + mha("context")(q, keys, values, mask=key_mask)  # Eq. 3
    b, h, w, c = f_mt.shape
    pixels = f_mt.reshape(b, h * w, c)
    if pixel_pos is not None:
      pixels = pixels + pixel_pos
    update = mha("mask")(pixels, q, q).reshape(b, h, w, c)
    f_mt_prime = f_mt + update  # Eq. 4
    if not self.use_pan:
      return q, f_mt_prime
    pan = PAN(self.pan_residual, dtype=self.dtype, name="pan")
    return q, pan(f_mt_prime, f_mt, train=train)


def _run_stage(
  stage: CascadeStage,
  q: Array,
  keys: Array,
  values: Array,
  f_mt: Array,
  key_mask: Array | None,
  pixel_pos: Array | None,
  train: bool,
) -> tuple[Array, Array]:
  """Calls a stage with `train` positional, so nn.remat can keep it static."""
  return stage(q, keys, values, f_mt, key_mask, pixel_pos, train=train)


def mean_cosine(q: Array) -> Array:
  """Mean cosine similarity over the Q(Q-1)/2 pairs of rows of q [B, Q, C]
  (float32 scalar, averaged over the batch; 0 for Q = 1)."""
  q = q.astype(jnp.float32)
  unit = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)
  gram = jnp.einsum("bqc,bkc->bqk", unit, unit)
  n = q.shape[1]
  off_diagonal = jnp.sum(gram) - jnp.sum(jnp.diagonal(gram, axis1=1, axis2=2))
  return off_diagonal / max(q.shape[0] * n * (n - 1), 1)


class Cascade(nn.Module):
  """n stages of contextual-embedding learning and mask predicting.

  Attributes:
    num_stages: n (>= 1).
    num_queries: Q, rows of the learned embedding q^0.
    num_heads: attention heads.
    query_init_std: q^0 ~ N(0, query_init_std^2).
    adaptive_lce: Eq. 3 values are F_mt^i (True) or always F_mt^0 (False).
    use_pan: PAN after every stage.
    pan_residual: see PAN.
    use_words: append projected word features to Eq. 3's keys and values.
    sine_pos: add a 2-D sine encoding to Eq. 3's pixel keys and Eq. 4's
      pixel queries.
    remat: rematerialise each stage in the backward pass.
    dtype: compute dtype.
  """

  num_stages: int = 6
  num_queries: int = 20
  num_heads: int = 8
  query_init_std: float = 1.0
  adaptive_lce: bool = True
  use_pan: bool = True
  pan_residual: str = "previous"
  use_words: bool = False
  sine_pos: bool = False
  remat: bool = False
  dtype: Dtype = None

  @nn.compact
  def __call__(
    self,
    f_m: Array,
    f_mt0: Array,
    words: Array | None = None,
    pad_mask: Array | None = None,
    *,
    train: bool,
  ) -> tuple[Array, list[dict[str, Array]]]:
    """Runs the cascade.

    Args:
      f_m: F_m, [B, h, w, C].
      f_mt0: F_mt^0, [B, h, w, C] (LSRAN output, or F_m without LSRAN).
      words: [B, L, Dw] word features; required iff use_words.
      pad_mask: [B, L] bool, True at padding; required iff use_words.
      train: norm statistics mode.

    Returns:
      (F_mt^n [B, h, w, C], stages) where stages[i] = {"q": q^{i+1}
      [B, Q, C], "f_mt": F_mt^{i+1} [B, h, w, C], "query_cosine":
      mean_cosine(q^{i+1}), a float32 scalar}.
    """
    b, h, w, c = f_m.shape

    def tokens(x: Array) -> Array:  # [B, h, w, C] -> [B, h*w, C]
      return x.reshape(b, h * w, c)

    q0 = self.param(
      "query_embed",
      nn.initializers.normal(self.query_init_std),
      (self.num_queries, c),
    )
    q = jnp.broadcast_to(q0.astype(f_m.dtype), (b, self.num_queries, c))
    keys, key_mask, word_tokens, pixel_pos = tokens(f_m), None, None, None
    if self.sine_pos:
      pixel_pos = position.sine_map(h, w, c, f_m.dtype).reshape(1, h * w, c)
      keys = keys + pixel_pos
    if self.use_words:
      if words is None or pad_mask is None:
        raise ValueError("model.use_words=True needs words and pad_mask.")
      word_tokens = nn.Dense(c, dtype=self.dtype, name="word_proj")(words)
      keys = jnp.concatenate([keys, word_tokens.astype(keys.dtype)], axis=1)
      visible = jnp.concatenate(
        [jnp.ones((b, h * w), jnp.bool_), jnp.logical_not(pad_mask)], axis=1
      )
      key_mask = visible[:, None, None, :]

    run = (
      nn.remat(_run_stage, static_argnums=(7,)) if self.remat else _run_stage
    )
    f_mt, stages = f_mt0, []
    for i in range(self.num_stages):
      values = tokens(f_mt if self.adaptive_lce else f_mt0)
      if word_tokens is not None:
        values = jnp.concatenate(
          [values, word_tokens.astype(values.dtype)], axis=1
        )
      stage = CascadeStage(
        self.num_heads,
        use_pan=self.use_pan,
        pan_residual=self.pan_residual,
        dtype=self.dtype,
        name=f"stage_{i}",
      )
      q, f_mt = run(stage, q, keys, values, f_mt, key_mask, pixel_pos, train)
      stages.append({"q": q, "f_mt": f_mt, "query_cosine": mean_cosine(q)})
    return f_mt, stages
