"""The one image preprocessing used by training, evaluation and prediction.

Pipeline (CRIS-style letterbox, design.md §3):
  prepare_image   load_image + letterbox_image, the one entry point.
  load_image      bytes / path / PIL image -> uint8 [H, W, 3] RGB, EXIF applied.
  letterbox_image aspect-preserving bicubic fit into S x S, centred, on a canvas
                  of the CLIP mean colour; returns the geometry as a Letterbox.
  random_letterbox_params  a scaled-down, randomly placed fit (training
                  augmentation; letterbox_image and letterbox_mask take it).
  letterbox_mask  the same geometry for a 0/1 mask (bilinear, >= 0.5).
  normalize       uint8 -> float32 CLIP-normalised (numpy or jax arrays).
  unletterbox     (jax) network logits [B, S, S, K] -> original-size logits on
                  a fixed M x M canvas plus a validity mask; for scoring at the
                  original resolution on device.
  unletterbox_numpy  the same for one prediction, cropped to exactly (h, w).

Geometry: scale = min(S / h, S / w); (nh, nw) = round-half-up(h * scale,
w * scale); top = (S - nh) // 2; left = (S - nw) // 2. Pixel centres follow the
half-pixel convention: original pixel y (centre y + 0.5) lies at network pixel
coordinate top + (y + 0.5) * nh / h - 0.5, which is how PIL resizes.
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageOps

from jmceln_jax.ops import resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Letterbox border: the CLIP mean as uint8, (123, 117, 104).
FILL = tuple(int(round(255 * m)) for m in CLIP_MEAN)
_SIXTEEN_BIT = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class Letterbox(NamedTuple):
  """Geometry of one letterboxed image; batched as int32 [6] in this order."""

  height: int  # Original image height h.
  width: int  # Original image width w.
  new_height: int  # nh: height of the resized image inside the canvas.
  new_width: int  # nw.
  top: int  # Row of the canvas where the image starts.
  left: int  # Column of the canvas where the image starts.

  @property
  def region(self) -> tuple[slice, slice]:
    """Index of the image inside the S x S canvas: canvas[box.region]."""
    rows = slice(self.top, self.top + self.new_height)
    return rows, slice(self.left, self.left + self.new_width)

  def as_array(self) -> np.ndarray:
    """Returns [6] int32 (height, width, new_height, new_width, top, left)."""
    return np.asarray(self, np.int32)


def _fit(
  height: int, width: int, size: int, factor: float = 1.0
) -> tuple[int, int]:
  """(nh, nw): the aspect-preserving fit into size x size times `factor`,
  rounded half up and clipped to [1, size]."""
  if min(height, width, size) < 1:
    raise ValueError(f"Bad letterbox sizes: image {height}x{width}, S={size}.")
  scale = factor * min(size / height, size / width)
  nh = min(size, max(1, int(np.floor(height * scale + 0.5))))
  nw = min(size, max(1, int(np.floor(width * scale + 0.5))))
  return nh, nw


def letterbox_params(height: int, width: int, size: int) -> Letterbox:
  """The centred aspect-preserving fit of an h x w image into size x size."""
  nh, nw = _fit(height, width, size)
  return Letterbox(height, width, nh, nw, (size - nh) // 2, (size - nw) // 2)


def random_letterbox_params(
  height: int,
  width: int,
  size: int,
  rng: np.random.Generator,
  min_scale: float = 0.85,
) -> Letterbox:
  """A jittered letterbox for training augmentation.

  The aspect-preserving fit is scaled by a factor drawn uniformly from
  [min_scale, 1] and placed at a uniformly random position inside the
  size x size canvas (instead of centred).

  Args:
    height: h of the original image.
    width: w.
    size: S.
    rng: draws, in order, the scale factor, the top and the left offset.
    min_scale: smallest scale factor, in (0, 1].

  Returns:
    The Letterbox geometry (for letterbox_image(..., box=) and
    letterbox_mask).
  """
  if not 0 < min_scale <= 1:
    raise ValueError(f"min_scale must be in (0, 1], got {min_scale}.")
  nh, nw = _fit(height, width, size, rng.uniform(min_scale, 1.0))
  top = int(rng.integers(size - nh + 1))
  left = int(rng.integers(size - nw + 1))
  return Letterbox(height, width, nh, nw, top, left)


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB. Alpha is dropped; 16-bit samples scaled by 1/257."""
  if img.mode in _SIXTEEN_BIT:
    grey = np.asarray(img, np.float64) / 257.0
    img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8))
  elif img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  try:
    return img.convert("RGB")
  except ValueError as e:
    raise ValueError(
      f"Cannot convert an image of PIL mode {img.mode!r} to RGB; re-save it "
      "as an 8-bit RGB or grey-scale JPEG/PNG."
    ) from e


def load_image(source: bytes | str | os.PathLike | Image.Image) -> np.ndarray:
  """Decodes an image to RGB with its EXIF orientation applied.

  Every PIL mode becomes RGB: grey levels are replicated, palettes expanded,
  CMYK converted by PIL; an alpha channel is dropped (colours kept as stored,
  as cv2.imread in CRIS and PIL's convert("RGB") do); 16-bit samples are
  scaled to 8 bits.

  Args:
    source: encoded bytes, a file path, or an open PIL image.

  Returns:
    [H, W, 3] uint8, H x W after the EXIF rotation.
  """
  if isinstance(source, Image.Image):
    img = source
  elif isinstance(source, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(source))
  else:
    img = Image.open(source)
  img = ImageOps.exif_transpose(img)
  return np.asarray(_to_rgb(img))


def letterbox_image(
  image: np.ndarray, size: int, box: Letterbox | None = None
) -> tuple[np.ndarray, Letterbox]:
  """Fits an image into size x size (PIL bicubic), border = CLIP mean colour.

  Args:
    image: [H, W, 3] uint8 RGB.
    size: S.
    box: the geometry to use (e.g. from random_letterbox_params); default
      the centred fit, letterbox_params(H, W, S).

  Returns:
    canvas: [S, S, 3] uint8.
    box: the Letterbox geometry.
  """
  if box is None:
    box = letterbox_params(image.shape[0], image.shape[1], size)
  elif (box.height, box.width) != image.shape[:2]:
    raise ValueError(
      f"The letterbox is for a {box.height}x{box.width} image, but the "
      f"image is {image.shape[0]}x{image.shape[1]}."
    )
  if (box.new_height, box.new_width) != image.shape[:2]:
    pil = Image.fromarray(image).resize(
      (box.new_width, box.new_height), Image.Resampling.BICUBIC
    )
    image = np.asarray(pil)
  canvas = np.empty((size, size, 3), np.uint8)
  canvas[...] = FILL
  canvas[box.region] = image
  return canvas, box


def prepare_image(
  source: bytes | str | os.PathLike | Image.Image, size: int
) -> tuple[np.ndarray, Letterbox]:
  """load_image + letterbox_image: what training, evaluation and prediction use.

  Args:
    source: encoded bytes, a file path, or a PIL image.
    size: S, the network input side.

  Returns:
    canvas: [S, S, 3] uint8 (normalize() it on host or device).
    box: the Letterbox geometry (box.as_array() to batch it).
  """
  return letterbox_image(load_image(source), size)


def letterbox_mask(mask: np.ndarray, box: Letterbox, size: int) -> np.ndarray:
  """Maps a binary mask through a letterbox: PIL bilinear on 0/1, then >= 0.5.

  Args:
    mask: [H, W], nonzero = object.
    box: the image's Letterbox (from letterbox_image).
    size: S.

  Returns:
    [S, S] uint8 in {0, 1}; 0 on the border.
  """
  if mask.shape != (box.height, box.width):
    raise ValueError(
      f"Mask shape {mask.shape} does not match the image "
      f"({box.height}, {box.width})."
    )
  soft = Image.fromarray((mask != 0).astype(np.float32))  # Mode "F".
  soft = soft.resize((box.new_width, box.new_height), Image.Resampling.BILINEAR)
  out = np.zeros((size, size), np.uint8)
  out[box.region] = np.asarray(soft) >= 0.5
  return out


def normalize(image: np.ndarray | jax.Array) -> np.ndarray | jax.Array:
  """CLIP normalisation, (x / 255 - mean) / std; numpy or jax arrays.

  Args:
    image: [..., 3] uint8 (or float in 0..255).

  Returns:
    [..., 3] float32, numpy for numpy input, jax for jax input.
  """
  mean = np.asarray(CLIP_MEAN, np.float32)
  inv_std = np.asarray([1.0 / s for s in CLIP_STD], np.float32)
  return (image.astype(np.float32) * np.float32(1 / 255) - mean) * inv_std


def _axis_weights(orig, new, start, out_len: int, size: int, xp):
  """[..., out_len, size] bilinear weights from original pixels to the network.

  Output pixel p < orig reads network coordinate start + (p + 0.5) * new / orig
  - 0.5, clamped to the image part [start, start + new - 1]; rows p >= orig are
  zero.
  """
  orig, new, start = (xp.asarray(v)[..., None] for v in (orig, new, start))
  p = xp.arange(out_len)
  src = start + (p + 0.5) * (new / orig) - 0.5
  src = xp.clip(src, start, start + new - 1)
  return resize.linear_weights(src, size, xp) * (p < orig)[..., None]


def unletterbox(
  logits: jax.Array, boxes: jax.Array, canvas: int
) -> tuple[jax.Array, jax.Array]:
  """Resamples network-resolution maps to original resolution (jittable).

  Original pixel (y, x) with y < h and x < w gets the bilinear sample of the
  network map at its letterbox position; the rest of the canvas is 0.

  Args:
    logits: [B, S, S, K] maps at network resolution.
    boxes: [B, 6] int32 Letterbox rows.
    canvas: M (static) >= every original side, e.g. 640 for COCO.

  Returns:
    maps: [B, M, M, K] float32, original image at the top-left.
    valid: [B, M, M] bool, y < h and x < w.
  """
  size = logits.shape[1]
  h, w, nh, nw, top, left = (boxes[:, i].astype(jnp.float32) for i in range(6))
  wy = _axis_weights(h, nh, top, canvas, size, jnp)  # [B, M, S]
  wx = _axis_weights(w, nw, left, canvas, size, jnp)
  hi = jax.lax.Precision.HIGHEST
  x = logits.astype(jnp.float32)
  x = jnp.einsum("bys,bsxk->byxk", wy, x, precision=hi)
  x = jnp.einsum("bpx,byxk->bypk", wx, x, precision=hi)
  p = jnp.arange(canvas)
  valid = (p[None, :, None] < boxes[:, 0, None, None]) & (
    p[None, None, :] < boxes[:, 1, None, None]
  )
  return x, valid


def unletterbox_numpy(logits: np.ndarray, box: Letterbox) -> np.ndarray:
  """Host version of unletterbox for one map, cropped to exactly (h, w).

  Args:
    logits: [S, S, K] (or [S, S]) map at network resolution.
    box: its Letterbox (or the [6] int row).

  Returns:
    [h, w, K] (or [h, w]) float32.
  """
  box = Letterbox(*(int(v) for v in box))
  size = logits.shape[0]
  wy = _axis_weights(box.height, box.new_height, box.top, box.height, size, np)
  wx = _axis_weights(box.width, box.new_width, box.left, box.width, size, np)
  # tensordot runs as BLAS matrix products (np.einsum here does not).
  out = np.tensordot(wy, np.asarray(logits, np.float64), axes=(1, 0))
  out = np.swapaxes(np.tensordot(wx, out, axes=(1, 1)), 0, 1)
  return out.astype(np.float32)
