"""OpenAI CLIP (ResNet image tower + text tower) in Flax linen, and its loader.

The hyperparameters are OpenAI's `build_model` names (also `CLIP_RN101` in
jmceln_jax/config_lib.py); `hparams_from_shapes` derives them from a torch
state_dict exactly as `build_model` does. Converted weights (see
`python -m jmceln_jax.convert_clip`) are loaded with `load_clip`.

Parameter tree: `visual/...` (ModifiedResNet, torch keys `visual.*`) and
`text/...` (the text tower, torch keys without a prefix).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models import clip_resnet, clip_text
from jmceln_jax.typing import Dtype
from jmceln_jax.utils import paths

HPARAMS = (
  "embed_dim",
  "image_resolution",
  "vision_layers",
  "vision_width",
  "context_length",
  "vocab_size",
  "transformer_width",
  "transformer_heads",
  "transformer_layers",
)
CONFIG_FILE = "clip_config.json"
CHECKPOINT_SUBDIR = "checkpoint"


class CLIP(nn.Module):
  """CLIP with a ModifiedResNet image tower (RN50, RN101, RN50x4, ...).

  Attributes:
    embed_dim: joint embedding width (pooled / dense / sentence outputs).
    image_resolution: the checkpoint's input side (224 for RN50/RN101).
    vision_layers: Bottleneck counts of layer1..4, e.g. (3, 4, 23, 3).
    vision_width: ResNet stem width (64 for RN50/RN101).
    context_length: text positional embedding rows (77).
    vocab_size: text vocabulary size (49408).
    transformer_width: text transformer width.
    transformer_heads: text attention heads.
    transformer_layers: text residual blocks.
    freeze_bn: True: the image BatchNorms of OpenAI's CLIP always use their
      running statistics (the new dense-pool `connect` BatchNorm still
      follows `train`).
    dtype: compute dtype (None/float32 or bfloat16); params are float32.
    scan: scan the identical blocks of both towers (ops/stacking.py).
  """

  embed_dim: int
  image_resolution: int
  vision_layers: Sequence[int]
  vision_width: int
  context_length: int
  vocab_size: int
  transformer_width: int
  transformer_heads: int
  transformer_layers: int
  freeze_bn: bool = False
  dtype: Dtype | None = None
  scan: bool = False

  def setup(self):
    self.visual = clip_resnet.ModifiedResNet(
      stage_sizes=tuple(self.vision_layers),
      output_dim=self.embed_dim,
      heads=self.vision_width * 32 // 64,
      input_resolution=self.image_resolution,
      width=self.vision_width,
      freeze_bn=self.freeze_bn,
      dtype=self.dtype,
      scan=self.scan,
    )
    self.text = clip_text.TextTransformer(
      context_length=self.context_length,
      vocab_size=self.vocab_size,
      width=self.transformer_width,
      heads=self.transformer_heads,
      num_layers=self.transformer_layers,
      embed_dim=self.embed_dim,
      dtype=self.dtype,
      scan=self.scan,
    )

  def encode_image(
    self,
    images: jax.Array,
    *,
    train: bool = False,
    pooled: bool | None = None,
  ) -> dict[str, jax.Array]:
    """Image features; see `ModifiedResNet.__call__`.

    Args:
      images: [B, H, W, 3] float32, CLIP-normalised.
      train: BatchNorm mode (with freeze_bn only for `connect`); with
        train=True, apply needs `mutable=["batch_stats"]`.
      pooled: None: include "pooled" only at the native resolution
        (image_resolution x image_resolution); True: always (error at other
        sizes); False: never.

    Returns:
      "layer1".."layer4" (NHWC trunk outputs, strides 4..32), "dense"
      [B, H/32, W/32, embed_dim] and, if included, "pooled" [B, embed_dim].
    """
    return self.visual(images, train=train, pooled=pooled)

  def encode_text(self, tokens: jax.Array) -> dict[str, jax.Array]:
    """Text features of int tokens [B, L] (L <= context_length).

    Returns:
      "words" [B, L, transformer_width], "sentence" [B, embed_dim],
      "pad_mask" [B, L] bool (True at padding, id 0).
    """
    return self.text(tokens)

  def __call__(
    self, images: jax.Array, tokens: jax.Array, *, train: bool = False
  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Both towers (used for `init`): (encode_image(...), encode_text(...))."""
    return self.encode_image(images, train=train), self.encode_text(tokens)


def _count_indices(keys: Sequence[str], prefix: str) -> int:
  """Number of distinct `<prefix><i>.` indices among `keys`."""
  return len(
    {k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)}
  )


def _require(shapes: Mapping[str, Sequence[int]], keys: Sequence[str]) -> None:
  missing = [k for k in keys if k not in shapes]
  if missing:
    raise ValueError(f"Not an OpenAI-style CLIP state dict: missing {missing}.")


def text_hparams_from_shapes(
  shapes: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
  """The text-tower hyperparameters (and embed_dim), as `build_model`.

  Args:
    shapes: torch key -> tensor shape (OpenAI names, no prefix).

  Returns:
    embed_dim, context_length, vocab_size and transformer_{width,heads,layers}.
  """
  _require(
    shapes,
    (
      "text_projection",
      "positional_embedding",
      "token_embedding.weight",
      "ln_final.weight",
    ),
  )
  width = shapes["ln_final.weight"][0]
  return dict(
    embed_dim=shapes["text_projection"][1],
    context_length=shapes["positional_embedding"][0],
    vocab_size=shapes["token_embedding.weight"][0],
    transformer_width=width,
    transformer_heads=width // 64,
    transformer_layers=_count_indices(list(shapes), "transformer.resblocks."),
  )


def vision_hparams_from_shapes(
  shapes: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
  """image_resolution, vision_layers and vision_width, as `build_model`.

  Raises:
    ValueError: for a ViT CLIP or a state dict without a ResNet tower.
  """
  if "visual.proj" in shapes or "visual.class_embedding" in shapes:
    raise ValueError(
      "This is a ViT CLIP checkpoint; only ResNet CLIPs (RN50, RN101, "
      "RN50x4, ...) are supported."
    )
  _require(
    shapes,
    ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"),
  )
  pos_rows = shapes["visual.attnpool.positional_embedding"][0]
  grid = math.isqrt(pos_rows - 1)
  if grid * grid + 1 != pos_rows:
    raise ValueError(
      f"visual.attnpool.positional_embedding has {pos_rows} rows, not "
      "grid**2 + 1."
    )
  return dict(
    image_resolution=grid * 32,
    vision_layers=tuple(
      _count_indices(list(shapes), f"visual.layer{b}.") for b in (1, 2, 3, 4)
    ),
    vision_width=shapes["visual.layer1.0.conv1.weight"][0],
  )


def hparams_from_shapes(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
  """All CLIP hyperparameters (`HPARAMS`) from torch state_dict shapes.

  Derived exactly as OpenAI's `build_model`: layers counted from the
  `visual.layer{b}.{i}` keys, width from visual.layer1.0.conv1.weight,
  image_resolution = sqrt(attnpool positional rows - 1) * 32, embed_dim =
  text_projection.shape[1], transformer heads = width // 64, ...

  Args:
    shapes: torch key -> tensor shape (OpenAI names, no prefix).

  Returns:
    A dict with the `HPARAMS` keys (vision_layers a tuple).

  Raises:
    ValueError: for a ViT CLIP or a state dict that is not a CLIP.
  """
  hparams = {
    **vision_hparams_from_shapes(shapes),
    **text_hparams_from_shapes(shapes),
  }
  return {k: hparams[k] for k in HPARAMS}


def abstract_variables(model: CLIP) -> dict[str, Any]:
  """`jax.eval_shape` of `model.init` at the native resolution (no compute).

  Returns:
    {"params": ..., "batch_stats": ...} of jax.ShapeDtypeStruct.
  """
  res = model.image_resolution
  images = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, model.context_length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), images, tokens)


def read_config(directory: str) -> dict[str, Any]:
  """The `clip_config.json` written by the converter."""
  path = os.path.join(paths.absolute(directory), CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} not found: {directory!r} is not a converted CLIP directory. "
      "Create one with `python -m jmceln_jax.convert_clip --checkpoint "
      "RN101.pt --out DIR`."
    )
  with open(path) as f:
    return json.load(f)


def load_clip(
  directory: str, *, freeze_bn: bool = False, dtype: Dtype | None = None
) -> tuple[CLIP, dict[str, Any]]:
  """Loads a converted CLIP directory.

  Args:
    directory: output directory of `python -m jmceln_jax.convert_clip`
      (may be relative or start with `~`).
    freeze_bn: the module's `freeze_bn` option.
    dtype: the module's compute dtype.

  Returns:
    (model, variables): variables = {"params", "batch_stats"} of float32
    numpy arrays (place or shard them as needed).
  """
  import orbax.checkpoint as ocp  # Deferred: only loading needs orbax.

  config = read_config(directory)
  hparams = {k: config[k] for k in HPARAMS}
  hparams["vision_layers"] = tuple(hparams["vision_layers"])
  model = CLIP(**hparams, freeze_bn=freeze_bn, dtype=dtype)
  path = os.path.join(paths.absolute(directory), CHECKPOINT_SUBDIR)
  # The converter validated the tree against the model, so no target is
  # needed (restoring into one would cost an extra trace of the model).
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(path)
  return model, variables
