"""The position probe: three identical shapes told apart only by position.

Each image shows three shapes of one shape, colour and size in a row,
horizontal or vertical, away from the borders; each is a ref whose sentences
name it by its place in the row and nothing else: "the left one", "middle
shape", "the circle at the bottom". Colour and shape words, when used, fit
all three shapes. A model that does not ground position words can do no
better than picking one of the three (about 1/3 mIoU).

`make_image` has the signature of `synthetic.make_image`, so that
`synthetic.generate(..., preset="position")` writes the probe in the raw
refer format like the default dataset.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from data_prep import expressions, geometry, scenes
from data_prep.expressions import Obj


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """How probe images are drawn.

  Attributes:
    min_side: smallest image side in pixels.
    max_side: largest image side in pixels.
    radius: (low, high) equal-area radius of the shapes, as a fraction of
      the shorter side.
    spacing: distance between neighbouring centres along the row, as a
      fraction of the side along the row (the middle shape sits at 0.5).
    jitter: largest random shift of each centre, along and across the row,
      as a fraction of the side.
    across: (low, high) range of the row's position across it.
    noise_std: (low, high) std of the pixel noise.
  """

  min_side: int = 200
  max_side: int = 260
  radius: tuple[float, float] = (0.08, 0.1)
  spacing: float = 0.27
  jitter: float = 0.03
  across: tuple[float, float] = (0.3, 0.7)
  noise_std: tuple[float, float] = (0.0, 6.0)


# Words for the three places of a row: (prefixes, suffix phrases).
_MIDDLE = (("middle", "centre", "center"), ("in the middle", "in the centre"))
PLACES = {
  "horizontal": ("left", "middle", "right"),
  "vertical": ("top", "middle", "bottom"),
}


def _words(place: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  if place == "middle":
    return _MIDDLE
  _, prefixes, suffixes = expressions.DIRECTIONS[place]
  return prefixes, suffixes


def describe(
  place: str, obj: Obj, rng: np.random.Generator, count: int
) -> list[tuple[str, str]]:
  """`count` distinct position-only sentences for the shape at `place`.

  Returns:
    [("position", sentence)].
  """
  prefixes, suffixes = _words(place)
  nouns = (
    ("one", "shape", "object", "thing")
    + expressions.SHAPE_WORDS[obj.shape]
    + tuple(f"{c} {obj.shape}" for c in expressions.COLOUR_WORDS[obj.colour])
  )
  out: list[str] = []
  for _ in range(50):
    if len(out) == count:
      break
    noun = nouns[int(rng.integers(len(nouns)))]
    article = "the " if rng.random() < 0.7 else ""
    if rng.random() < 0.5:
      prefix = prefixes[int(rng.integers(len(prefixes)))]
      text = f"{article}{prefix} {noun}"
    else:
      suffix = suffixes[int(rng.integers(len(suffixes)))]
      text = f"{article}{noun} {suffix}"
    if text not in out:
      out.append(text)
  return [("position", t) for t in out]


def draw(
  rng: np.random.Generator, config: ProbeConfig
) -> tuple[np.ndarray, list[scenes.Shape], list[str]]:
  """Draws one probe image.

  Returns:
    (pixels [H, W, 3] uint8, the three shapes, their places in the row).
  """
  while True:
    size = tuple(
      int(v) for v in rng.integers(config.min_side, config.max_side + 1, 2)
    )
    if size[0] != size[1]:
      break
  width, height = size
  orientation = ("horizontal", "vertical")[int(rng.integers(2))]
  shape = expressions.SHAPES[int(rng.integers(len(expressions.SHAPES)))]
  colour = expressions.COLOURS[int(rng.integers(len(expressions.COLOURS)))]
  size_name = expressions.SIZES[int(rng.integers(len(expressions.SIZES)))]
  radius = rng.uniform(*config.radius) * min(size)
  angle = rng.uniform(-0.15, 0.15) if shape not in ("circle", "star") else 0.0
  across = rng.uniform(*config.across)
  rgb = np.clip(
    np.array(scenes.COLOUR_RGB[colour]) + rng.uniform(-15, 15, 3), 0, 255
  )
  shapes = []
  for k in range(3):
    along = 0.5 + (k - 1) * config.spacing
    a, b = along + rng.uniform(-1, 1) * config.jitter, across
    b += rng.uniform(-1, 1) * config.jitter
    x, y = (a, b) if orientation == "horizontal" else (b, a)
    polygon = geometry.shape_polygon(
      shape, x * width, y * height, radius, angle
    )
    obj = Obj(shape, colour, size_name, x, y)
    shapes.append(scenes.Shape(obj, polygon, radius, rgb, [polygon]))
  pixels = scenes.render(rng, size, shapes, config.noise_std)
  return pixels, shapes, list(PLACES[orientation])


def make_image(
  index: int,
  seed: int,
  scene: ProbeConfig,
  config: expressions.ExpressionConfig,
) -> tuple[bytes, list[scenes.Shape], list[list[tuple[str, str]]]]:
  """Draws probe image `index` of the dataset with seed `seed` and describes
  each shape with `config.min_sentences`..`config.max_sentences` sentences
  (its kind weights are not used: every sentence is a position one)."""
  rng = np.random.default_rng([seed, index])
  pixels, shapes, places = draw(rng, scene)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=scenes.JPEG_QUALITY)
  sentences = [
    describe(
      place,
      s.obj,
      rng,
      int(rng.integers(config.min_sentences, config.max_sentences + 1)),
    )
    for place, s in zip(places, shapes, strict=True)
  ]
  return buf.getvalue(), shapes, sentences
