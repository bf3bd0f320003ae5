"""Pictures of predictions: mask overlays with outlines, captions, grids.

Used by `python -m jmceln_jax.predict` (one panel per sentence) and
`python -m jmceln_jax.evaluate` (best and worst predictions of a split).
Everything is drawn with Pillow on the host; PNGs are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from jmceln_jax.utils import writers

PRED_COLOR = (255, 0, 200)  # Predicted mask (magenta): tint and outline.
GT_COLOR = (0, 230, 255)  # Ground-truth outline (cyan).
ALPHA = 0.45  # Opacity of the predicted-mask tint.
_MARGIN = 6


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
  """Boundary pixels of a binary mask (inside the mask, next to outside).

  Args:
    mask: [H, W] bool.
    width: boundary thickness in pixels.

  Returns:
    [H, W] bool.
  """
  inner = np.asarray(mask, bool)
  for _ in range(width):
    padded = np.pad(inner, 1, constant_values=False)
    inner = (
      padded[1:-1, 1:-1]
      & padded[:-2, 1:-1]
      & padded[2:, 1:-1]
      & padded[1:-1, :-2]
      & padded[1:-1, 2:]
    )
  return np.asarray(mask, bool) & ~inner


def overlay(
  image: np.ndarray,
  mask: np.ndarray,
  gt: np.ndarray | None = None,
  *,
  line: int = 2,
) -> np.ndarray:
  """The image with the mask tinted and outlined (and the GT outlined).

  Args:
    image: [H, W, 3] uint8 RGB.
    mask: [H, W] bool, the prediction.
    gt: optional [H, W] bool ground truth, outlined in GT_COLOR.
    line: outline thickness in pixels.

  Returns:
    [H, W, 3] uint8.
  """
  out = image.astype(np.float32)
  mask = np.asarray(mask, bool)
  out[mask] = (1 - ALPHA) * out[mask] + ALPHA * np.float32(PRED_COLOR)
  out[outline(mask, line)] = PRED_COLOR
  if gt is not None:
    out[outline(np.asarray(gt, bool), line)] = GT_COLOR
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _fit(
  array: np.ndarray, size: int, resample: Image.Resampling
) -> Image.Image:
  """Resizes so that the longer side is `size` (aspect kept)."""
  img = Image.fromarray(array)
  scale = size / max(img.size)
  new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
  return img.resize(new, resample)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow < 10.1 or no FreeType: bitmap font.
    return ImageFont.load_default()


def _wrap(text: str, font, width: int) -> list[str]:
  """Greedy word wrap to `width` pixels (a too-long word gets its own line)."""
  lines: list[str] = []
  for word in text.split():
    candidate = f"{lines[-1]} {word}" if lines else word
    if lines and font.getlength(candidate) <= width:
      lines[-1] = candidate
    else:
      lines.append(word)
  return lines or [""]


def panel(
  image: np.ndarray,
  mask: np.ndarray,
  caption: str,
  *,
  gt: np.ndarray | None = None,
  size: int = 384,
) -> Image.Image:
  """One picture: the overlay at display size with a wrapped caption below.

  The image and masks are resized first (masks nearest-neighbour) so that
  outlines stay visible at any original resolution.

  Args:
    image: [H, W, 3] uint8 RGB.
    mask: [H, W] bool prediction.
    caption: text under the picture (e.g. the sentence).
    gt: optional [H, W] bool ground truth.
    size: longer side of the picture in pixels.

  Returns:
    An RGB PIL image.
  """
  picture = _fit(image, size, Image.Resampling.BICUBIC)
  resize = lambda m: np.asarray(  # noqa: E731
    _fit(np.asarray(m, np.uint8) * 255, size, Image.Resampling.NEAREST)
  )
  shown = overlay(
    np.asarray(picture),
    resize(mask) > 127,
    None if gt is None else resize(gt) > 127,
    line=max(1, size // 160),
  )
  font = _font(max(11, size // 26))
  lines = _wrap(caption, font, picture.width - 2 * _MARGIN)
  line_h = int(font.getbbox("Ag")[3]) + 3
  out = Image.new(
    "RGB",
    (picture.width, picture.height + len(lines) * line_h + 2 * _MARGIN),
    "white",
  )
  out.paste(Image.fromarray(shown), (0, 0))
  draw = ImageDraw.Draw(out)
  for k, text in enumerate(lines):
    y = picture.height + _MARGIN + k * line_h
    draw.text((_MARGIN, y), text, fill="black", font=font)
  return out


def grid(
  panels: Sequence[Image.Image],
  columns: int,
  *,
  titles: Sequence[str] = (),
) -> Image.Image:
  """Tiles panels row by row on a white background.

  Args:
    panels: RGB images (any sizes; each cell is as large as the largest).
    columns: panels per row.
    titles: optional one line of text above each row (row order).

  Returns:
    An RGB PIL image.
  """
  if not panels:
    raise ValueError("grid() needs at least one panel.")
  cell_w = max(p.width for p in panels) + _MARGIN
  cell_h = max(p.height for p in panels) + _MARGIN
  rows = -(-len(panels) // columns)
  font = _font(16)
  title_h = int(font.getbbox("Ag")[3]) + 2 * _MARGIN if titles else 0
  out = Image.new(
    "RGB", (columns * cell_w + _MARGIN, rows * (cell_h + title_h)), "white"
  )
  draw = ImageDraw.Draw(out)
  for r in range(rows):
    top = r * (cell_h + title_h)
    if r < len(titles):
      draw.text((_MARGIN, top + _MARGIN), titles[r], fill="black", font=font)
    for c, p in enumerate(panels[r * columns : (r + 1) * columns]):
      out.paste(p, (_MARGIN + c * cell_w, top + title_h))
  return out


def preview_grid(previews: dict, size: int = 192) -> np.ndarray:
  """Evaluator.run's "previews" as one picture: a panel per expression
  (prediction tinted, target outlined, sentence below).

  Returns:
    [H, W, 3] uint8 RGB.
  """
  panels = [
    panel(image, mask, sentence, gt=target, size=size)
    for image, mask, target, sentence in zip(
      previews["image"],
      previews["mask"],
      previews["target"],
      previews["sentence"],
      strict=True,
    )
  ]
  return np.asarray(grid(panels, columns=len(panels)))


def save_png(image: Image.Image | np.ndarray, path: str) -> None:
  """Writes a PNG atomically (temporary name, then rename); makes parents.

  Args:
    image: a PIL image or a uint8 array ([H, W] or [H, W, 3]).
    path: destination file.
  """
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with writers.atomic_path(path) as tmp:
    image.save(tmp, format="PNG")
