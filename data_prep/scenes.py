"""Synthetic scenes: 2-4 coloured shapes on a plain, noisy or graded background.

Shapes are drawn as polygons, anti-aliased, in order; a later shape may partly
hide one earlier shape, whose visible part is then kept as polygons whose union
is that part (see geometry.subtract_convex). Coordinates are COCO pixels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from data_prep import expressions, geometry
from data_prep.expressions import Obj

COLOUR_RGB = {
  "red": (215, 35, 35),
  "green": (30, 160, 55),
  "blue": (35, 80, 220),
  "yellow": (240, 210, 30),
  "purple": (135, 55, 185),
  "orange": (245, 130, 20),
}
_SUPERSAMPLE = 4  # Anti-aliasing: shapes are drawn at 4x and box-filtered.
JPEG_QUALITY = 90  # Of the written images.


@dataclasses.dataclass(frozen=True)
class SceneConfig:
  """How synthetic images are drawn.

  Attributes:
    min_side: smallest image side in pixels.
    max_side: largest image side in pixels.
    min_objects: fewest shapes per image.
    max_objects: most shapes per image (fewer when they do not fit).
    small_radius: (low, high) equal-area radius of small shapes, as a fraction
      of the shorter image side.
    big_radius: the same for big shapes.
    distractor_prob: chance that a new shape copies the colour or the shape of
      one already placed (a tenth of these copy both and differ in size).
    unique_colours: no two shapes of an image share a colour (distractors
      then copy the shape only); colour words alone can pick any shape.
    occlusion_prob: chance that an image tries to show one shape partly hiding
      another (about two thirds of the tries succeed).
    min_visible: smallest visible fraction of a partly hidden shape.
    noise_std: (low, high) std of the pixel noise added to the image.
  """

  min_side: int = 100
  max_side: int = 140
  min_objects: int = 2
  max_objects: int = 3
  small_radius: tuple[float, float] = (0.16, 0.19)
  big_radius: tuple[float, float] = (0.25, 0.29)
  distractor_prob: float = 0.7
  unique_colours: bool = True
  occlusion_prob: float = 0.2
  min_visible: float = 0.6
  noise_std: tuple[float, float] = (0.0, 6.0)


@dataclasses.dataclass
class Shape:
  """One drawn shape: what expressions can say about it and its polygons."""

  obj: Obj
  polygon: np.ndarray  # [N, 2] the whole outline.
  radius: float  # Bounding-circle radius in pixels.
  rgb: np.ndarray  # [3] float.
  visible: list[np.ndarray]  # Polygons whose union is the visible part.
  hidden: bool = False  # Partly hidden by a later shape.


def _attributes(
  rng: np.random.Generator, placed: Sequence[Shape], cfg: SceneConfig
) -> tuple[str, str, str]:
  """(shape, colour, size), often sharing an attribute with a placed shape."""

  def pick(options: Sequence) -> object:
    return options[int(rng.integers(len(options)))]

  used = {p.obj.colour for p in placed} if cfg.unique_colours else set()
  colours = [c for c in expressions.COLOURS if c not in used]
  shape, colour = pick(expressions.SHAPES), pick(colours)
  size = pick(expressions.SIZES)
  if placed and rng.random() < cfg.distractor_prob:
    base = pick(placed).obj
    u = rng.random()
    if u < 0.45 or cfg.unique_colours:  # Same shape, another colour.
      shape = base.shape
      colour = pick([c for c in colours if c != base.colour])
    elif u < 0.9:  # Same colour, another shape.
      colour = base.colour
      shape = pick([s for s in expressions.SHAPES if s != base.shape])
    else:  # Same colour and shape, the other size.
      shape, colour = base.shape, base.colour
      size = "big" if base.size == "small" else "small"
  return shape, colour, size


def _area(polygons: Sequence[np.ndarray], height: int, width: int) -> int:
  rles = mask_utils.frPyObjects(
    [p.ravel().tolist() for p in polygons], height, width
  )
  return int(mask_utils.area(mask_utils.merge(rles)))


def _outline(
  rng: np.random.Generator,
  shape: str,
  size_name: str,
  side: int,
  cfg: SceneConfig,
) -> np.ndarray:
  """The polygon of a shape centred at (0, 0), mildly rotated."""
  lo, hi = cfg.big_radius if size_name == "big" else cfg.small_radius
  if shape == "star":
    angle = rng.uniform(0, 2 * math.pi / 5)
  else:
    angle = rng.uniform(-0.15, 0.15) if shape != "circle" else 0.0
  return geometry.shape_polygon(shape, 0, 0, rng.uniform(lo, hi) * side, angle)


def _place(
  rng: np.random.Generator,
  placed: list[Shape],
  size: tuple[int, int],
  cfg: SceneConfig,
  occlude: bool,
) -> Shape | None:
  """Samples one new shape that fits, on top of a placed one if `occlude`.

  Without `occlude` the new shape keeps clear of the others. With it, the
  first attempts put a convex shape partly over one placed shape, whose
  visible part must stay at least `cfg.min_visible` of it.
  """
  width, height = size
  for attempt in range(30):
    shape, colour, size_name = _attributes(rng, placed, cfg)
    if any(
      (s.obj.shape, s.obj.colour, s.obj.size) == (shape, colour, size_name)
      for s in placed
    ):
      continue
    outline = _outline(rng, shape, size_name, min(size), cfg)
    bound = float(np.max(np.hypot(outline[:, 0], outline[:, 1])))
    if occlude and placed and attempt < 20 and shape in geometry.CONVEX_SHAPES:
      base = placed[int(rng.integers(len(placed)))]
      angle = rng.uniform(0, 2 * math.pi)
      reach = rng.uniform(0.6, 0.95) * (bound + base.radius)
      cx = base.obj.x * width + reach * math.cos(angle)
      cy = base.obj.y * height + reach * math.sin(angle)
    else:
      cx = rng.uniform(bound + 2, width - bound - 2)
      cy = rng.uniform(bound + 2, height - bound - 2)
    inside = bound + 2 <= cx <= width - bound - 2
    if not inside or not bound + 2 <= cy <= height - bound - 2:
      continue
    near = [
      s
      for s in placed
      if math.hypot(cx - s.obj.x * width, cy - s.obj.y * height)
      < 1.05 * (bound + s.radius)
    ]
    polygon = outline + [cx, cy]
    if near:
      if not occlude or len(near) > 1 or shape not in geometry.CONVEX_SHAPES:
        continue
      pieces = geometry.subtract_convex(near[0].polygon, polygon)
      full = _area([near[0].polygon], height, width)
      visible = _area(pieces, height, width) if pieces else 0
      if visible < cfg.min_visible * full:
        continue
      near[0].visible, near[0].hidden = pieces, visible < full
    jitter = rng.uniform(-15, 15, 3)
    return Shape(
      Obj(shape, colour, size_name, cx / width, cy / height),
      polygon,
      bound,
      np.clip(np.array(COLOUR_RGB[colour]) + jitter, 0, 255),
      [polygon],
    )
  return None


def _background(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
  """[H, W, 3] float: grey with a tint, plain or with a gentle gradient."""
  width, height = size
  base = rng.uniform(85, 175) + rng.uniform(-12, 12, 3)
  img = np.broadcast_to(base, (height, width, 3)).astype(np.float32)
  if rng.random() < 0.5:
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width] / max(size)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) * rng.uniform(-40, 40)
    img = img + ramp[..., None]
  return img


def _paint(img: np.ndarray, polygon: np.ndarray, rgb: np.ndarray) -> None:
  """Paints a polygon into img [H, W, 3] float, anti-aliased, in place.

  Each pixel is blended by the share of it inside the polygon, estimated on a
  4x finer grid, so a pixel is mostly painted exactly when its centre is inside
  the polygon: where pycocotools puts it in the mask.
  """
  s = _SUPERSAMPLE
  height, width = img.shape[:2]
  x0, y0 = np.maximum(np.floor(polygon.min(0)).astype(int) - 1, 0)
  x1, y1 = np.minimum(np.ceil(polygon.max(0)).astype(int) + 1, [width, height])
  canvas = Image.new("L", (int(x1 - x0) * s, int(y1 - y0) * s), 0)
  # Sub-pixel k has its centre at (k + 0.5) / s in COCO coordinates.
  local = (polygon - [x0, y0]) * s - 0.5
  ImageDraw.Draw(canvas).polygon([tuple(p) for p in local], fill=255)
  alpha = np.asarray(canvas.reduce(s), np.float32)[..., None] / 255.0
  crop = img[y0:y1, x0:x1]
  crop += (rgb - crop) * alpha


def draw_scene(
  rng: np.random.Generator, config: SceneConfig
) -> tuple[np.ndarray, list[Shape]]:
  """Samples and draws one scene.

  Args:
    rng: the only source of randomness (same state, same scene).
    config: sizes, counts and probabilities.

  Returns:
    (pixels [H, W, 3] uint8, shapes in drawing order).
  """
  while True:
    size = tuple(
      int(v) for v in rng.integers(config.min_side, config.max_side + 1, 2)
    )
    if size[0] != size[1]:
      break
  occlude = bool(rng.random() < config.occlusion_prob)
  want = int(rng.integers(config.min_objects, config.max_objects + 1))
  placed: list[Shape] = []
  for _ in range(100):
    shape = _place(
      rng, placed, size, config, occlude and not any(s.hidden for s in placed)
    )
    if shape is not None:
      placed.append(shape)
    elif len(placed) < config.min_objects:
      placed = []  # These shapes leave no room: start the image over.
    if len(placed) == want or (shape is None and placed):
      break
  else:
    raise ValueError(
      f"Cannot fit {config.min_objects} shapes into {size}: "
      "make the radii smaller or the images larger."
    )
  return render(rng, size, placed, config.noise_std), placed


def render(
  rng: np.random.Generator,
  size: tuple[int, int],
  shapes: Sequence[Shape],
  noise_std: tuple[float, float],
) -> np.ndarray:
  """Paints shapes, in order, on a random background with pixel noise.

  Args:
    rng: source of the background and the noise.
    size: (width, height) in pixels.
    shapes: what to paint (their whole polygons, later ones on top).
    noise_std: (low, high) of the noise's standard deviation.

  Returns:
    pixels [H, W, 3] uint8.
  """
  img = _background(rng, size)
  for s in shapes:
    _paint(img, s.polygon, s.rgb)
  img = img + rng.normal(0, rng.uniform(*noise_std), img.shape)
  return np.clip(np.round(img), 0, 255).astype(np.uint8)
