"""Explicit absolute position information for the decoder (inferred; the
paper is silent, see docs/architecture.md, "Position information").

Two forms, each a config switch:
  coordinate channels  normalised x and y joined to F_m in the neck, as
                       CRIS's CoordConv (model.coord_conv);
  2-D sine encodings   DETR's fixed encodings added to the attention keys and
                       queries that read pixels, never to the values
                       (model.sine_pos, model.lsran_sine_pos).

Both are constants of the map's shape: computed with numpy at trace time.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# The position switches by name, as the probes compare them: none, each
# alone, all (model fields coord_conv, sine_pos, lsran_sine_pos).
OPTIONS: dict[str, dict[str, bool]] = {
  "none": dict(coord_conv=False, sine_pos=False, lsran_sine_pos=False),
  "coord": dict(coord_conv=True, sine_pos=False, lsran_sine_pos=False),
  "sine": dict(coord_conv=False, sine_pos=True, lsran_sine_pos=False),
  "lsran_sine": dict(coord_conv=False, sine_pos=False, lsran_sine_pos=True),
  "all": dict(coord_conv=True, sine_pos=True, lsran_sine_pos=True),
}

# DETR's wavelength base of the sine encodings.
TEMPERATURE = 10000.0


def coordinates(height: int, width: int) -> np.ndarray:
  """[H, W, 2] float32: x then y of each pixel centre, from -1 (left/top) to
  1 (right/bottom); 0 on a side of one pixel."""

  def axis(n: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)

  y, x = np.meshgrid(axis(height), axis(width), indexing="ij")
  return np.stack([x, y], axis=-1).astype(np.float32)


def sine_encoding(height: int, width: int, dim: int) -> np.ndarray:
  """DETR's 2-D sine encoding of an H x W map, [H, W, dim] float32.

  The first dim/2 channels encode y, the rest x. Along each axis the pixel
  centres are normalised to (0, 2*pi] and channel pairs (sin, cos) have
  wavelengths growing geometrically up to TEMPERATURE.

  Args:
    height: H.
    width: W.
    dim: channels; a multiple of 4.
  """
  if dim % 4:
    raise ValueError(f"Sine encodings need channels divisible by 4, got {dim}.")
  half = dim // 2
  freqs = TEMPERATURE ** (2 * (np.arange(half) // 2) / half)

  def encode(n: int) -> np.ndarray:  # [n, half]
    pos = (np.arange(n) + 1.0) / n * 2 * np.pi
    angles = pos[:, None] / freqs
    return np.stack(
      [np.sin(angles[:, 0::2]), np.cos(angles[:, 1::2])], axis=-1
    ).reshape(n, half)

  ey = np.broadcast_to(encode(height)[:, None], (height, width, half))
  ex = np.broadcast_to(encode(width)[None, :], (height, width, half))
  return np.concatenate([ey, ex], axis=-1).astype(np.float32)


def sine_map(height: int, width: int, dim: int, dtype) -> jnp.ndarray:
  """`sine_encoding` as a [1, H, W, dim] array of `dtype`, to add to
  features."""
  return jnp.asarray(sine_encoding(height, width, dim)[None], dtype)


def add_coordinates(x: jnp.ndarray) -> jnp.ndarray:
  """[B, H, W, C] -> [B, H, W, C + 2]: `coordinates` joined as channels."""
  b, h, w, _ = x.shape
  coords = jnp.asarray(coordinates(h, w), x.dtype)
  return jnp.concatenate([x, jnp.broadcast_to(coords, (b, h, w, 2))], -1)
