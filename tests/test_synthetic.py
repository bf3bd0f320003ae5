"""The synthetic generator: unambiguous expressions, occlusion geometry, mix."""

import collections
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_prep import expressions, geometry, scenes, synthetic
from data_prep.expressions import ExpressionConfig, Obj, Query

pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation:DeprecationWarning"
)

# An independent reading of the sentences: word -> (attribute, value).
_WORDS = {
  w: (attr, value)
  for attr, table in (
    ("colour", expressions.COLOUR_WORDS),
    ("shape", expressions.SHAPE_WORDS),
    ("size", expressions.SIZE_WORDS),
  )
  for value, words in table.items()
  for w in words
}
_RELATION = re.compile(
  r"\b(?:to the )?(left|right) of\b|\b(above|over)\b|\b(below|under|beneath)\b"
)
_AXES = (
  ("top", {"top", "upper", "topmost"}),
  ("bottom", {"bottom", "lower", "bottommost"}),
  ("left", {"left", "leftmost"}),
  ("right", {"right", "rightmost"}),
)


def _attrs(phrase):
  return tuple(sorted(_WORDS[t] for t in phrase.split() if t in _WORDS))


def parse(sentence):
  """Sentence -> (Query, coarse kind) without using the generator's queries."""
  m = _RELATION.search(sentence)
  if m:
    relation = m.group(1) or ("above" if m.group(2) else "below")
    return Query(
      "relation",
      _attrs(sentence[: m.start()]),
      relation=relation,
      landmark=_attrs(sentence[m.end() :]),
    ), "relation"
  words = set(sentence.split())
  direction = " ".join(name for name, syn in _AXES if words & syn)
  if direction:
    return Query("position", _attrs(sentence), direction=direction), "position"
  return Query("attributes", _attrs(sentence)), "attributes"


_COARSE = dict(
  colour="attributes",
  shape="attributes",
  size="attributes",
  colour_shape="attributes",
  position="position",
  relation="relation",
)


@pytest.mark.slow
def test_every_expression_names_only_its_target():
  kinds = collections.Counter()
  scene, config = scenes.SceneConfig(), ExpressionConfig()
  for index in range(120):
    _, shapes, described = synthetic.make_image(index, 5, scene, config)
    objects = [s.obj for s in shapes]
    for target, exprs in enumerate(described):
      assert 1 <= len(exprs) <= 3
      assert len({t for _, t in exprs}) == len(exprs)
      for kind, text in exprs:
        kinds[kind] += 1
        query, coarse = parse(text)
        assert coarse == _COARSE[kind], text
        assert expressions.resolve(query, objects) == target, (text, objects)
        if coarse == "attributes":  # Plain counting, no generator code.
          same = [
            o for o in objects if all(o.attr(a) == v for a, v in query.attrs)
          ]
          assert same == [objects[target]], text
        if kind in ("colour", "shape", "colour_shape"):
          assert {a for a, _ in query.attrs} == set(kind.split("_")), text
  assert set(kinds) == set(expressions.KINDS)
  total = sum(kinds.values())
  spatial = (kinds["position"] + kinds["relation"]) / total
  assert 0.02 < spatial < 0.15, kinds  # Mostly attribute expressions.


def test_scenes_have_distractors_and_occlusion():
  scene = scenes.SceneConfig()
  shared, occluded, sizes = 0, 0, set()
  for index in range(60):
    pixels, shapes = scenes.draw_scene(np.random.default_rng(index), scene)
    h, w, _ = pixels.shape
    sizes.add((w, h))
    assert w != h and 96 <= min(w, h) and max(w, h) <= 160
    assert 2 <= len(shapes) <= 4
    keys = [(s.obj.size, s.obj.colour, s.obj.shape) for s in shapes]
    assert len(set(keys)) == len(keys)
    shared += any(
      a.colour == b.colour or a.shape == b.shape
      for i, a in enumerate(s.obj for s in shapes)
      for b in (s.obj for s in shapes[i + 1 :])
    )
    occluded += any(s.hidden for s in shapes)
  assert shared > 40 and 3 < occluded < 30 and len(sizes) > 50


def test_unique_colours_keep_shape_distractors():
  scene = scenes.SceneConfig(unique_colours=True)
  shared_shape = 0
  for index in range(60):
    _, shapes = scenes.draw_scene(np.random.default_rng(index), scene)
    colours = [s.obj.colour for s in shapes]
    assert len(set(colours)) == len(colours)
    shared_shape += len({s.obj.shape for s in shapes}) < len(shapes)
  assert shared_shape > 30


def _raster(polygons, h, w):
  rles = mask_utils.frPyObjects([p.ravel().tolist() for p in polygons], h, w)
  return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _inside(polygon, h, w):
  """Exact even-odd test of the pixel centres: [h, w] bool."""
  ys, xs = np.mgrid[0:h, 0:w] + 0.5
  inside = np.zeros((h, w), bool)
  for (x1, y1), (x2, y2) in zip(polygon, np.roll(polygon, -1, 0), strict=True):
    crosses = (y1 > ys) != (y2 > ys)
    with np.errstate(divide="ignore", invalid="ignore"):
      inside ^= crosses & (xs < (x2 - x1) * (ys - y1) / (y2 - y1) + x1)
  return inside


@pytest.mark.parametrize("shape", ["star", "circle", "triangle"])
def test_subtract_convex_is_the_visible_part(shape):
  h, w = 60, 70
  hidden = geometry.shape_polygon(shape, 30, 30, 14, 0.3)
  for occluder in ("square", "circle", "diamond", "triangle"):
    on_top = geometry.shape_polygon(occluder, 44, 38, 11, 0.1)
    pieces = geometry.subtract_convex(hidden, on_top)
    exact = _inside(hidden, h, w) & ~_inside(on_top, h, w)
    union = np.any([_inside(p, h, w) for p in pieces], axis=0)
    assert 0 < exact.sum() < _inside(hidden, h, w).sum()
    assert (union != exact).sum() <= 1, (shape, occluder)  # 0.01 px rounding.
    # pycocotools rasterises approximately, a little differently per polygon.
    coco = _raster([hidden], h, w) & ~_raster([on_top], h, w)
    mismatch = (_raster(pieces, h, w) != coco).sum()
    assert mismatch <= 0.02 * coco.sum(), (shape, occluder, mismatch)
  far = geometry.shape_polygon("square", 60, 50, 5, 0.0)
  assert geometry.subtract_convex(hidden, far)[0] is hidden
  assert geometry.subtract_convex(far, hidden) == [far]


def test_shapes_of_one_size_have_equal_area():
  for shape in expressions.SHAPES:
    poly = geometry.shape_polygon(shape, 50, 50, 10, 0.4)
    assert abs(abs(geometry.signed_area(poly)) - np.pi * 100) < 2.0, shape


def test_kind_mix_is_configurable():
  objects = [
    Obj("circle", "red", "big", 0.2, 0.5),
    Obj("circle", "red", "small", 0.8, 0.5),
    Obj("square", "blue", "big", 0.5, 0.2),
  ]
  rng = np.random.default_rng(0)
  only_position = ExpressionConfig(
    weights=dict(position=1.0), min_sentences=3, max_sentences=3
  )
  out = expressions.describe(0, objects, rng, only_position)
  assert [k for k, _ in out] == ["position"] * 3
  only_colour = ExpressionConfig(weights=dict(colour=1.0))
  # Colour alone cannot single out a red circle: the full description is used.
  out = expressions.describe(0, objects, rng, only_colour)
  assert out == [("size", out[0][1])] and "red" in out[0][1]
  with pytest.raises(ValueError, match="positive weight"):
    ExpressionConfig(weights=dict(colour=0.0))
  with pytest.raises(ValueError, match="unknown"):
    ExpressionConfig(weights=dict(texture=1.0))
