"""Polygons of the synthetic shapes and their visible parts under occlusion.

Coordinates are COCO pixel coordinates: x right, y down, pixel (i, j) covers
[i, i+1) x [j, j+1). Polygons are float arrays of shape [N, 2].
"""

from __future__ import annotations

import math

import numpy as np

CONVEX_SHAPES = ("circle", "square", "triangle", "diamond")
_CIRCLE_VERTICES = 32
_STAR_INNER = 0.45  # Inner / outer radius of the five-pointed star.


def _ring(n: int, radius: float, start: float) -> np.ndarray:
  angles = start + np.arange(n) * (2 * math.pi / n)
  return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def shape_polygon(
  shape: str, cx: float, cy: float, radius: float, angle: float
) -> np.ndarray:
  """The outline of a shape whose area is that of a circle of `radius`.

  Args:
    shape: "circle", "square", "triangle", "star" or "diamond".
    cx: centre x in pixels.
    cy: centre y in pixels.
    radius: equal-area circle radius in pixels (so sizes compare fairly).
    angle: rotation in radians (clockwise on screen).

  Returns:
    vertices: [N, 2] float64, rounded to 0.01 px.
  """
  area = math.pi * radius**2
  up = -math.pi / 2  # Screen "up": y grows downwards.
  if shape == "circle":
    n = _CIRCLE_VERTICES  # A regular n-gon of the circle's area.
    pts = _ring(
      n, radius * math.sqrt(2 * math.pi / (n * math.sin(2 * math.pi / n))), 0.0
    )
  elif shape == "square":
    pts = _ring(4, math.sqrt(area / 2), math.pi / 4)
  elif shape == "triangle":
    pts = _ring(3, math.sqrt(area * 4 / (3 * math.sqrt(3))), up)
  elif shape == "diamond":  # Upright rhombus, width 0.7 x height.
    half = math.sqrt(area / 1.4)
    pts = np.array([[0, -half], [0.7 * half, 0], [0, half], [-0.7 * half, 0]])
  elif shape == "star":
    outer = math.sqrt(area / (5 * _STAR_INNER * math.sin(math.pi / 5)))
    pts = np.empty((10, 2))
    pts[0::2] = _ring(5, outer, up)
    pts[1::2] = _ring(5, outer * _STAR_INNER, up + math.pi / 5)
  else:
    raise ValueError(f"Unknown shape {shape!r}.")
  c, s = math.cos(angle), math.sin(angle)
  pts = pts @ np.array([[c, s], [-s, c]])
  return np.round(pts + [cx, cy], 2)


def signed_area(poly: np.ndarray) -> float:
  """Shoelace area; its sign gives the orientation."""
  x, y = poly[:, 0], poly[:, 1]
  return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _clip(poly: np.ndarray, p: np.ndarray, q: np.ndarray, sign: float):
  """Part of `poly` on the outer side of the line p->q (Sutherland-Hodgman).

  The outer side is where the cross product has the opposite sign of `sign`,
  the orientation of the polygon that p->q is an edge of.
  """
  d = q - p
  side = -sign * (d[0] * (poly[:, 1] - p[1]) - d[1] * (poly[:, 0] - p[0]))
  out = []
  for i in range(len(poly)):
    a, b = poly[i], poly[(i + 1) % len(poly)]
    sa, sb = side[i], side[(i + 1) % len(poly)]
    if sa >= 0:
      out.append(a)
    if (sa >= 0) != (sb >= 0):
      out.append(a + (b - a) * (sa / (sa - sb)))
  return np.array(out).reshape(-1, 2)


def subtract_convex(poly: np.ndarray, convex: np.ndarray) -> list[np.ndarray]:
  """`poly` minus a convex polygon, as polygons whose union is the difference.

  poly - C = union over the edges e of C of (poly on the outer side of e).
  The pieces overlap, which COCO's union of polygons (pycocotools merge)
  handles; overlapping pieces leave no seams inside the visible region.

  Args:
    poly: [N, 2] any simple polygon.
    convex: [M, 2] a convex polygon.

  Returns:
    Non-empty pieces, each [K, 2] rounded to 0.01 px; `[poly]` when the two do
    not overlap.
  """
  sign = math.copysign(1.0, signed_area(convex))
  pieces = []
  for i in range(len(convex)):
    piece = _clip(poly, convex[i], convex[(i + 1) % len(convex)], sign)
    if len(piece) >= 3 and abs(signed_area(piece)) > 1e-3:
      pieces.append(np.round(piece, 2))
  full = abs(signed_area(poly))
  if any(abs(abs(signed_area(p)) - full) < 1e-6 * max(full, 1) for p in pieces):
    return [poly]
  return pieces
