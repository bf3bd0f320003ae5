"""JMCELN (Huang & Satoh, EMNLP 2023), Fig. 2a: encoders, neck, LSRAN, cascade,
head.

`JMCELNDecoder` is everything after the CLIP encoders and takes their feature
dicts; `JMCELN` adds the encoders (submodule "clip") and takes images and
tokens. Both share one decoding body, so parameter paths are the same at the
top level: clip/..., neck/..., lsran/..., cascade/stage_{i}/..., head/...

Table 2 variants are switches (jmceln_jax.config_lib.VARIANTS): num_stages=0
drops the cascade (the head reads F_mt^0); use_lsran=False makes F_mt^0 = F_m;
use_pan=False ends each stage at Eq. 4; adaptive_lce=False feeds F_mt^0 to
every stage's Eq. 3.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jmceln_jax import config_lib
from jmceln_jax.models.cascade import Cascade
from jmceln_jax.models.clip import CLIP
from jmceln_jax.models.head import Head
from jmceln_jax.models.layers import Dtype, compute_dtype
from jmceln_jax.models.lsran import LSRAN
from jmceln_jax.models.neck import Neck
from jmceln_jax.models.pan import PAN_RESIDUALS
from jmceln_jax.ops import resize
from jmceln_jax.ops.conv import Conv
from jmceln_jax.typing import Array

CLIP_BN_MODES = ("train", "frozen")
NUM_CLASSES = 2


class JMCELNDecoder(nn.Module):
  """Neck + LSRAN + cascade + head on precomputed encoder features.

  Attributes:
    dim: C, decoder channels at H/8.
    num_queries: Q, rows of the contextual embedding.
    num_stages: n cascade stages (0: no cascade).
    num_heads: heads of every attention.
    window: LSRAN window side.
    dilations: LSRAN dilated-branch rates.
    use_lsran: LSRAN on F_m (else F_mt^0 = F_m).
    use_pan: PAN at the end of every stage.
    adaptive_lce: Eq. 3 values are the current stage input (else F_mt^0).
    query_init_std: std of q^0's normal initialisation.
    use_words: word features as extra keys/values in Eq. 3.
    coord_conv: CRIS's CoordConv at the end of the neck (x, y channels).
    sine_pos: 2-D sine encodings on Eq. 3's pixel keys and Eq. 4's pixel
      queries.
    lsran_sine_pos: 2-D sine encodings in LSRAN's window attention.
    pan_residual: "previous" (F_mt^i) or "input" (F_mt'^{i+1}).
    head_channels: channels of the head's 2x upsampling stages.
    deep_supervision: also return per-stage logits (1x1 classifier on each
      F_mt^{i+1}, bilinearly upsampled to the output size).
    dtype: compute dtype ("float32", "bfloat16"); params stay float32.
    remat: rematerialise cascade stages in the backward pass.
  """

  dim: int = 1024
  num_queries: int = 20
  num_stages: int = 6
  num_heads: int = 8
  window: int = 13
  dilations: Sequence[int] = (1, 6, 12, 18)
  use_lsran: bool = True
  use_pan: bool = True
  adaptive_lce: bool = True
  query_init_std: float = 1.0
  use_words: bool = False
  # Position information (models/position.py). Off here, as in runs made
  # before these options existed (their saved configs lack the fields);
  # config_lib.base_config sets the defaults of new runs.
  coord_conv: bool = False
  sine_pos: bool = False
  lsran_sine_pos: bool = False
  pan_residual: str = "previous"
  head_channels: Sequence[int] = (256, 128, 64)
  deep_supervision: bool = False
  dtype: Dtype | str | None = "float32"
  remat: bool = False

  @nn.compact
  def __call__(
    self,
    visual: Mapping[str, Array],
    text: Mapping[str, Array],
    *,
    train: bool,
  ) -> tuple[Array, dict[str, Any]]:
    """Decodes encoder features; see `decode`."""
    return self.decode(visual, text, train=train)

  def decode(
    self,
    visual: Mapping[str, Array],
    text: Mapping[str, Array],
    *,
    train: bool,
  ) -> tuple[Array, dict[str, Any]]:
    """The decoding body, called from a compact `__call__`.

    Args:
      visual: "layer2" [B, H/8, W/8, C3], "layer3" [B, H/16, W/16, C4],
        "dense" [B, H/32, W/32, C5] (CLIP.encode_image output).
      text: "sentence" [B, Ds]; with use_words also "words" [B, L, Dw] and
        "pad_mask" [B, L] bool, True at padding (CLIP.encode_text output).
      train: batch statistics and running-statistics updates (True) or
        running averages (False).

    Returns:
      logits [B, H, W, 2] float32 (H = 8 * H/8 for the default three head
      stages) and aux = {"f_m", "f_mt0" [B, H/8, W/8, C], "stages": list of
      n dicts {"q": [B, Q, C], "f_mt": [B, H/8, W/8, C], "query_cosine":
      scalar (models/cascade.py)} plus "logits" [B, H, W, 2] float32 with
      deep_supervision}.
    """
    self._check_fields()
    dtype = compute_dtype(self.dtype)
    f_m = Neck(self.dim, self.coord_conv, dtype=dtype, name="neck")(
      visual["layer2"],
      visual["layer3"],
      visual["dense"],
      text["sentence"],
      train=train,
    )
    f_mt = f_m
    if self.use_lsran:
      f_mt = LSRAN(
        self.window,
        self.num_heads,
        self.dilations,
        sine_pos=self.lsran_sine_pos,
        dtype=dtype,
        name="lsran",
      )(f_m, train=train)
    aux: dict[str, Any] = {"f_m": f_m, "f_mt0": f_mt, "stages": []}
    if self.num_stages:
      f_mt, aux["stages"] = Cascade(
        num_stages=self.num_stages,
        num_queries=self.num_queries,
        num_heads=self.num_heads,
        query_init_std=self.query_init_std,
        adaptive_lce=self.adaptive_lce,
        use_pan=self.use_pan,
        pan_residual=self.pan_residual,
        use_words=self.use_words,
        sine_pos=self.sine_pos,
        remat=self.remat,
        dtype=dtype,
        name="cascade",
      )(f_m, f_mt, text.get("words"), text.get("pad_mask"), train=train)
    logits = Head(self.head_channels, NUM_CLASSES, dtype=dtype, name="head")(
      f_mt, train=train
    )
    if self.deep_supervision:
      for i, stage in enumerate(aux["stages"]):
        stage_logits = Conv(
          NUM_CLASSES, (1, 1), dtype=dtype, name=f"stage_classifier_{i}"
        )(stage["f_mt"])
        stage["logits"] = resize.resize(
          stage_logits.astype(jnp.float32), logits.shape[1:3]
        )
    return logits, aux

  def _check_fields(self) -> None:
    """Raises ValueError for inconsistent model settings."""
    problems = []
    if self.pan_residual not in PAN_RESIDUALS:
      problems.append(f"pan_residual must be one of {PAN_RESIDUALS}")
    if self.num_stages < 0:
      problems.append("num_stages must be >= 0")
    if self.dim % self.num_heads:
      problems.append("dim must be divisible by num_heads")
    if self.dim % 4 or self.dim % len(self.dilations):
      problems.append("dim must be divisible by 4 and by len(dilations)")
    if problems:
      raise ValueError(
        f"Invalid model config (dim={self.dim}, num_heads={self.num_heads}, "
        f"dilations={tuple(self.dilations)}, num_stages={self.num_stages}, "
        f"pan_residual={self.pan_residual!r}): " + "; ".join(problems) + "."
      )


class JMCELN(JMCELNDecoder):
  """The full model: CLIP encoders (submodule "clip") + JMCELNDecoder.

  Attributes:
    clip: CLIP hyperparameters (config.model.clip, e.g. CLIP_RN101).
    clip_bn: "train" (CRIS: CLIP BatchNorms use and update batch statistics
      in training) or "frozen" (always running averages).
    scan_layers: scan CLIP's identical blocks (text layers, ResNet blocks
      1.. of each stage): stacked parameters, a much smaller program
      (ops/stacking.py).
  """

  clip: Mapping[str, Any] | None = None
  clip_bn: str = "train"
  scan_layers: bool = False

  @nn.compact
  def __call__(
    self, images: Array, tokens: Array, *, train: bool
  ) -> tuple[Array, dict[str, Any]]:
    """Segments the referent of `tokens` in `images`.

    Args:
      images: [B, H, W, 3] CLIP-normalised; H and W multiples of 32.
      tokens: [B, L] int32 CLIP BPE ids, 0-padded.
      train: training mode (norm statistics).

    Returns:
      logits [B, H, W, 2] float32 and the aux dict of `decode`.
    """
    self._check_inputs(images, tokens)
    encoder = CLIP(
      **self.clip,
      freeze_bn=self.clip_bn == "frozen",
      dtype=compute_dtype(self.dtype),
      scan=self.scan_layers,
      name="clip",
    )
    visual = encoder.encode_image(images, train=train)
    text = encoder.encode_text(tokens)
    return self.decode(visual, text, train=train)

  def _check_inputs(self, images: Array, tokens: Array) -> None:
    """Raises ValueError for unusable inputs or settings."""
    if self.clip is None:
      raise ValueError(
        "JMCELN needs `clip` hyperparameters (config.model.clip)."
      )
    if self.clip_bn not in CLIP_BN_MODES:
      raise ValueError(
        f"model.clip_bn={self.clip_bn!r}; choose one of {CLIP_BN_MODES}."
      )
    if len(self.head_channels) != 3:
      raise ValueError(
        "model.head_channels needs exactly 3 entries (H/8 -> H), got "
        f"{tuple(self.head_channels)}."
      )
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got {images.shape}.")
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(
        f"Image sides must be multiples of 32 (stride of C5), got "
        f"{images.shape[1]}x{images.shape[2]}; resize or pad the input."
      )
    if tokens.ndim != 2 or tokens.shape[0] != images.shape[0]:
      raise ValueError(
        f"tokens must be [B, L] with B={images.shape[0]}, got {tokens.shape}."
      )


def build_model(model_config: Mapping[str, Any]) -> JMCELN:
  """Builds JMCELN from `config.model` (see jmceln_jax.config_lib).

  Args:
    model_config: the model section, a ConfigDict or a plain mapping.

  Returns:
    The unbound JMCELN module.
  """
  fields = dict(model_config)
  known = set(JMCELN.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise config_lib.ConfigError(
      f"Unknown model config field(s) {unknown}; known: {sorted(known)}."
    )
  if fields.get("dtype") not in (None, "float32", "bfloat16"):
    raise config_lib.ConfigError(
      f"model.dtype={fields['dtype']!r}: use 'float32' or 'bfloat16'."
    )
  fields["clip"] = dict(fields["clip"])
  for key in ("dilations", "head_channels"):
    if key in fields:
      fields[key] = tuple(fields[key])
  return JMCELN(**fields)
