"""Image resizing with PyTorch's exact semantics; every resize lives here.

`jax.image.resize` defaults differ from `torch.nn.functional.interpolate`
(its "cubic" is Keys a=-0.5, antialiasing is on by default) and it has no
`align_corners`. Here a resize is two matrix products, one per spatial axis,
with [out, in] interpolation matrices built in numpy from the static sizes, so
the result equals torch's (antialias=False) up to float rounding:

  bilinear  align_corners False/True; source index clamped to [0, in - 1].
  bicubic   Keys a=-0.75; the 4 taps are clamped to [0, in - 1].

`linear_weights` builds the bilinear matrix from arbitrary (possibly traced)
source coordinates; preprocess.unletterbox uses it for per-sample geometry.
"""

from __future__ import annotations

import functools
import types
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Method = Literal["bilinear", "bicubic"]
_CUBIC_A = -0.75  # PyTorch's bicubic coefficient.


def source_coords(
  in_size: int, out_size: int, align_corners: bool
) -> np.ndarray:
  """Input-pixel coordinates of each output pixel, as PyTorch computes them.

  Args:
    in_size: input length along the axis.
    out_size: output length along the axis.
    align_corners: PyTorch's flag (True: corner centres map onto each other;
      False: pixel edges do, half-pixel convention).

  Returns:
    [out_size] float64 coordinates in input-pixel-index units (not clamped).
  """
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    return dst * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
  return (dst + 0.5) * (in_size / out_size) - 0.5


def linear_weights(
  src: jax.Array | np.ndarray, size: int, xp: types.ModuleType = jnp
) -> jax.Array | np.ndarray:
  """Bilinear interpolation weights from source coordinates (the tent kernel).

  Coordinates are used as given (clamp them first for edge behaviour); a
  coordinate k + f puts weight 1 - f on index k and f on index k + 1.

  Args:
    src: [..., N] float coordinates in input-pixel-index units.
    size: number of input pixels.
    xp: array module, `jax.numpy` (traceable) or `numpy`.

  Returns:
    [..., N, size] weights (float32 for jnp, float64 for numpy input).
  """
  return xp.maximum(0.0, 1.0 - xp.abs(src[..., None] - xp.arange(size)))


def _cubic_taps(t: np.ndarray) -> np.ndarray:
  """Keys cubic weights of the taps at offsets -1, 0, 1, 2 for fraction t."""
  a = _CUBIC_A
  d = np.abs(t[:, None] - np.arange(-1, 3))  # [N, 4] distances, 0..2
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, far)


@functools.lru_cache(maxsize=256)
def interp_matrix(
  in_size: int, out_size: int, method: Method, align_corners: bool = False
) -> np.ndarray:
  """The [out, in] matrix of a 1-D PyTorch resize (antialias=False).

  Args:
    in_size: input length.
    out_size: output length.
    method: "bilinear" or "bicubic".
    align_corners: PyTorch's flag.

  Returns:
    [out_size, in_size] float32; rows sum to 1. Read-only (cached).
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"Sizes must be positive, got {in_size} -> {out_size}.")
  src = source_coords(in_size, out_size, align_corners)
  if method == "bilinear":
    m = linear_weights(np.clip(src, 0, in_size - 1), in_size, xp=np)
  elif method == "bicubic":
    base = np.floor(src)
    taps = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1)
    m = np.zeros((out_size, in_size))
    rows = np.repeat(np.arange(out_size), 4)
    np.add.at(
      m, (rows, taps.astype(int).ravel()), _cubic_taps(src - base).ravel()
    )
  else:
    raise ValueError(f"method must be 'bilinear' or 'bicubic', got {method!r}.")
  m = m.astype(np.float32)
  m.flags.writeable = False
  return m


def resize(
  x: jax.Array,
  size: tuple[int, int],
  method: Method = "bilinear",
  *,
  align_corners: bool = False,
) -> jax.Array:
  """Resizes the two spatial axes like `torch.nn.functional.interpolate`.

  Equals `interpolate(x_nchw, size=size, mode=method,
  align_corners=align_corners, antialias=False)` for up- and down-sampling.

  Args:
    x: [..., H, W, C] (NHWC or HWC), any float dtype.
    size: (out_h, out_w), static.
    method: "bilinear" or "bicubic" (Keys a=-0.75).
    align_corners: PyTorch's flag.

  Returns:
    [..., out_h, out_w, C], dtype of x.
  """
  h, w = x.shape[-3:-1]
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return x  # Every mode maps a pixel onto itself at scale 1.
  wy = jnp.asarray(interp_matrix(h, out_h, method, align_corners), x.dtype)
  wx = jnp.asarray(interp_matrix(w, out_w, method, align_corners), x.dtype)
  hi = jax.lax.Precision.HIGHEST
  y = jnp.einsum("oh,...hwc->...owc", wy, x, precision=hi)
  return jnp.einsum("pw,...owc->...opc", wx, y, precision=hi)


def upsample2x(x: jax.Array, *, align_corners: bool = False) -> jax.Array:
  """2x bilinear upsampling, torch `interpolate(scale_factor=2, "bilinear")`.

  Args:
    x: [..., H, W, C].
    align_corners: PyTorch's flag (LAVT's decoder uses True).

  Returns:
    [..., 2H, 2W, C], dtype of x.
  """
  h, w = x.shape[-3:-1]
  return resize(x, (2 * h, 2 * w), "bilinear", align_corners=align_corners)
