"""The test suite's position probe (bench/position_probe.py at SIDE 16; the
benchmark runs it at 28 and compares the position options): three identical
objects, told apart only by a position word, must be segmented well above
chance (1/3 mIoU) by the decoder with the default position options after a
few hundred steps.

The decoder (JMCELNDecoder) reads synthetic encoder features: three identical
blobs in a row, horizontal or vertical, on a 16 x 16 map; the sentence
feature is one fixed vector per word (left, middle, right, top, bottom).
A decoder that loses its position information, or stops reading the
sentence, picks one of the three and fails. (On a map this small padding
also tells the blobs apart, so this test alone does not show that the
explicit options are on: tests/test_position.py's translation tests do.)
"""

import pytest

from bench import position_probe
from jmceln_jax import config_lib

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.


def test_default_position_options_ground_position_words():
  cfg = config_lib.base_config().model
  defaults = {k: cfg[k] for k in ("coord_conv", "sine_pos", "lsran_sine_pos")}
  assert position_probe.probe_miou(defaults, side=16, steps=200) > 0.6


def test_probe_images_differ_only_by_position():
  """Three shapes of one shape, colour and size in a row, away from the
  borders; every sentence names a place, and only its own."""
  from data_prep import expressions
  from data_prep import position_probe as probe_data

  config = expressions.ExpressionConfig(min_sentences=2, max_sentences=3)
  middle = {"middle", "centre", "center"}
  for index in range(20):
    _, shapes, sentences = probe_data.make_image(
      index, 0, probe_data.ProbeConfig(), config
    )
    assert len(shapes) == 3
    assert len({(s.obj.shape, s.obj.colour, s.obj.size) for s in shapes}) == 1
    for s in shapes:
      assert 0.15 < s.obj.x < 0.85 and 0.15 < s.obj.y < 0.85
    for k, described in enumerate(sentences):
      assert 2 <= len(described) <= 3
      for kind, sentence in described:
        words = set(sentence.replace(",", " ").split())
        assert kind == "position"
        assert bool(words & middle) == (k == 1), sentence
