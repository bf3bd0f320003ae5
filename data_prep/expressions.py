"""Referring expressions for the synthetic dataset: vocabulary, meaning, wording.

An expression is first a `Query` (what it says), then a sentence (how it says
it). `resolve(query, objects)` is the meaning: the one object the query clearly
refers to, or None when it refers to none or is ambiguous. The generator keeps
a query only when it resolves to its target, so every synthetic sentence names
exactly one object of its image.

Kinds of query (their mix is `ExpressionConfig.weights`):
  colour        "the red one"               attributes: colour
  shape         "the triangle"              attributes: shape
  colour_shape  "red triangle"              attributes: colour + shape
  size          "the big blue circle"       attributes: size (+ colour/shape)
  position      "the square on the left"    most extreme along a direction
  relation      "red circle left of the blue square"   relative to a landmark

Positions are in image-normalised coordinates (x right, y down, both 0..1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond")
SIZES = ("small", "big")

COLOUR_WORDS = {c: (c,) for c in COLOURS} | {"purple": ("purple", "violet")}
SHAPE_WORDS = {
  "circle": ("circle", "disc", "ball"),
  "square": ("square", "box", "block"),
  "triangle": ("triangle",),
  "star": ("star",),
  "diamond": ("diamond", "rhombus"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "big": ("big", "large")}
GENERIC_NOUNS = ("shape", "object", "thing")

# Absolute positions: unit direction -> (prefix words, suffix phrases).
DIRECTIONS: dict[
  str, tuple[tuple[float, float], tuple[str, ...], tuple[str, ...]]
]
DIRECTIONS = {
  "left": ((-1, 0), ("leftmost", "left"), ("on the left", "on the left side")),
  "right": ((1, 0), ("rightmost", "right"), ("on the right",)),
  "top": ((0, -1), ("top", "upper", "topmost"), ("at the top",)),
  "bottom": ((0, 1), ("bottom", "lower", "bottommost"), ("at the bottom",)),
  "top left": (
    (-1, -1),
    ("top left", "upper left"),
    ("in the top left corner",),
  ),
  "top right": ((1, -1), ("top right", "upper right"), ("at the top right",)),
  "bottom left": (
    (-1, 1),
    ("bottom left", "lower left"),
    ("at the bottom left",),
  ),
  "bottom right": (
    (1, 1),
    ("bottom right", "lower right"),
    ("in the bottom right corner",),
  ),
}
# Relations: the target lies along the direction from the landmark.
RELATIONS = {
  "left": ((-1, 0), ("left of", "to the left of")),
  "right": ((1, 0), ("right of", "to the right of")),
  "above": ((0, -1), ("above", "over")),
  "below": ((0, 1), ("below", "under", "beneath")),
}
# The most extreme object must lead the next one by this much (normalised).
POSITION_GAP = 0.15
# A relation holds clearly beyond RELATION_CLEAR and plausibly beyond
# RELATION_PLAUSIBLE; no other candidate may hold even plausibly.
RELATION_CLEAR = 0.15
RELATION_PLAUSIBLE = 0.05

KINDS = ("colour", "shape", "colour_shape", "size", "position", "relation")
Attrs = tuple[tuple[str, str], ...]  # Sorted (attribute, value) pairs.


@dataclasses.dataclass(frozen=True)
class ExpressionConfig:
  """How the synthetic expressions are mixed.

  Attributes:
    weights: relative frequency of each kind (see the module docstring), used
      among the kinds that can identify the target in its image. Kinds left
      out have weight 0. The default is mostly colour and colour + shape
      (with unique colours per image, scenes.SceneConfig's default, about
      45% each); shape, size, position and relation expressions are about
      2-3% each, there so that the vocabulary is complete but rare enough
      for the CPU main job to learn the task in minutes. Harder mixes: e.g.
      dict(colour=0.3, shape=0.3, colour_shape=0.2, size=0.1, position=0.06,
      relation=0.04) with SceneConfig(unique_colours=False).
    min_sentences: fewest expressions per object.
    max_sentences: most expressions per object (all distinct).
    corner_weight: weight of the corner directions ("top left") relative to
      the single-axis ones ("left") in position expressions.
  """

  weights: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: dict(
      colour=0.45,
      shape=0.025,
      colour_shape=0.45,
      size=0.025,
      position=0.025,
      relation=0.025,
    )
  )
  min_sentences: int = 2
  max_sentences: int = 3
  corner_weight: float = 0.5

  def __post_init__(self):
    unknown = set(self.weights) - set(KINDS)
    if unknown or not any(w > 0 for w in self.weights.values()):
      raise ValueError(
        f"weights must give a positive weight to some of {KINDS}; got "
        f"{dict(self.weights)} (unknown: {sorted(unknown)})."
      )
    if not 1 <= self.min_sentences <= self.max_sentences:
      raise ValueError("Need 1 <= min_sentences <= max_sentences.")


@dataclasses.dataclass(frozen=True)
class Obj:
  """What expressions can mention of an object (`x`, `y` normalised centre)."""

  shape: str
  colour: str
  size: str
  x: float
  y: float

  def attr(self, name: str) -> str:
    return getattr(self, name)


@dataclasses.dataclass(frozen=True)
class Query:
  """The meaning of an expression.

  Attributes:
    kind: one of KINDS.
    attrs: attribute filter of the target, e.g. (("colour", "red"),).
    direction: a DIRECTIONS key (position queries).
    relation: a RELATIONS key (relation queries).
    landmark: attribute filter of the landmark (relation queries).
  """

  kind: str
  attrs: Attrs = ()
  direction: str | None = None
  relation: str | None = None
  landmark: Attrs = ()


def _matching(attrs: Attrs, objects: Sequence[Obj]) -> list[int]:
  return [
    i for i, o in enumerate(objects) if all(o.attr(a) == v for a, v in attrs)
  ]


def _along(obj: Obj, direction: tuple[float, float]) -> float:
  dx, dy = direction
  return (obj.x * dx + obj.y * dy) / math.hypot(dx, dy)


def resolve(query: Query, objects: Sequence[Obj]) -> int | None:
  """The index of the one object `query` clearly refers to, else None."""
  cands = _matching(query.attrs, objects)
  if query.direction is not None:
    if len(cands) < 2:  # "The leftmost X" needs more than one X.
      return None
    d = DIRECTIONS[query.direction][0]
    score = sorted((_along(objects[i], d), i) for i in cands)
    return score[-1][1] if score[-1][0] - score[-2][0] >= POSITION_GAP else None
  if query.relation is not None:
    landmarks = _matching(query.landmark, objects)
    if len(landmarks) != 1:
      return None
    d = RELATIONS[query.relation][0]
    base = _along(objects[landmarks[0]], d)
    diff = {i: _along(objects[i], d) - base for i in cands if i != landmarks[0]}
    cands = [i for i, v in diff.items() if v > RELATION_PLAUSIBLE]
    if len(cands) != 1 or diff[cands[0]] < RELATION_CLEAR:
      return None
  return cands[0] if len(cands) == 1 else None


def _filters(obj: Obj, names: Sequence[Sequence[str]]) -> list[Attrs]:
  return [tuple((a, obj.attr(a)) for a in sorted(n)) for n in names]


# Attribute filters per kind; the last "size" one says everything.
_PLAIN = ((), ("colour",), ("shape",), ("colour", "shape"))
_FILTERS = {
  "colour": (("colour",),),
  "shape": (("shape",),),
  "colour_shape": (("colour", "shape"),),
  "size": (
    ("size",),
    ("size", "colour"),
    ("size", "shape"),
    ("size", "colour", "shape"),
  ),
}


def candidates(target: int, objects: Sequence[Obj], kind: str) -> list[Query]:
  """Every query of `kind` that resolves to `target`.

  Args:
    target: index into `objects`.
    objects: all objects of the image.
    kind: one of KINDS.

  Returns:
    The queries; empty when no query of this kind works.
  """
  obj = objects[target]
  if kind in _FILTERS:
    queries = [Query(kind, f) for f in _filters(obj, _FILTERS[kind])]
  elif kind == "position":
    queries = [
      Query(kind, f, direction=d)
      for d in DIRECTIONS
      for f in _filters(obj, _PLAIN)
    ]
  else:
    queries = [
      Query(kind, f, relation=r, landmark=lf)
      for j, other in enumerate(objects)
      if j != target
      for lf in _filters(other, _PLAIN[1:] + (("size", "colour", "shape"),))
      if _matching(lf, objects) == [j]  # The landmark alone fits lf.
      for r in RELATIONS
      for f in _filters(obj, _PLAIN)
    ]
  return [q for q in queries if resolve(q, objects) == target]


def _choice(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _noun_phrase(
  attrs: Attrs, rng: np.random.Generator, *, article: bool, prefix: str = ""
) -> str:
  """e.g. "the big red circle", "red one", "the leftmost shape"."""
  a = dict(attrs)
  words = [prefix] if prefix else []
  if "size" in a:
    words.append(_choice(rng, SIZE_WORDS[a["size"]]))
  if "colour" in a:
    words.append(_choice(rng, COLOUR_WORDS[a["colour"]]))
  if "shape" in a:
    words.append(_choice(rng, SHAPE_WORDS[a["shape"]]))
  else:
    words.append(_choice(rng, GENERIC_NOUNS + (("one",) if words else ())))
  if article:
    words.insert(0, "the")
  return " ".join(words)


def realise(query: Query, rng: np.random.Generator) -> str:
  """Words for a query, with randomly chosen synonyms and articles.

  Args:
    query: what to say.
    rng: the source of wording choices.

  Returns:
    A lower-case sentence without punctuation.
  """
  article = bool(rng.random() < 0.7)
  if query.direction is not None:
    _, prefixes, suffixes = DIRECTIONS[query.direction]
    if rng.random() < 0.5:
      prefix = _choice(rng, prefixes)
      return _noun_phrase(query.attrs, rng, article=article, prefix=prefix)
    np_ = _noun_phrase(query.attrs, rng, article=article)
    return f"{np_} {_choice(rng, suffixes)}"
  if query.relation is not None:
    target = _noun_phrase(query.attrs, rng, article=article)
    landmark = _noun_phrase(query.landmark, rng, article=True)
    return f"{target} {_choice(rng, RELATIONS[query.relation][1])} {landmark}"
  return _noun_phrase(query.attrs, rng, article=article)


def describe(
  target: int,
  objects: Sequence[Obj],
  rng: np.random.Generator,
  config: ExpressionConfig,
) -> list[tuple[str, str]]:
  """Distinct expressions that each identify `target` alone.

  Args:
    target: index into `objects`.
    objects: all objects of the image; their (size, colour, shape) must be
      unique, the fallback when no enabled kind singles out the target.
    rng: randomness for kinds, queries and wording.
    config: the kind mix and the number of sentences.

  Returns:
    [(kind, sentence)], between min_sentences and max_sentences long.
  """
  weights = {k: w for k, w in config.weights.items() if w > 0}
  cache: dict[str, list[Query]] = {}  # Kinds are enumerated when drawn.
  want = int(rng.integers(config.min_sentences, config.max_sentences + 1))
  out: list[tuple[str, str]] = []
  for _ in range(20 * want):
    if len(out) == want or not weights:
      break
    kinds = sorted(weights)
    p = np.array([weights[k] for k in kinds], np.float64)
    kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    if kind not in cache:
      cache[kind] = candidates(target, objects, kind)
    queries = cache[kind]
    if not queries:  # This kind cannot single out the target here.
      del weights[kind]
      continue
    w = np.array(
      [
        config.corner_weight if " " in (q.direction or "") else 1.0
        for q in queries
      ]
    )
    query = queries[int(rng.choice(len(queries), p=w / w.sum()))]
    text = realise(query, rng)
    if text not in {t for _, t in out}:
      out.append((kind, text))
  if not out:  # No enabled kind works: say everything about the target.
    full = Query("size", _filters(objects[target], _FILTERS["size"][-1:])[0])
    if resolve(full, objects) != target:
      raise ValueError(f"Objects are not distinguishable: {objects}.")
    out.append(("size", realise(full, rng)))
  return out
