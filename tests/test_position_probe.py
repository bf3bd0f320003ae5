"""The test suite's position probe (configs/position_probe.py and
docs/benchmarks.md at full size): three identical objects, told apart only by
a position word, must be segmented well above chance (1/3 mIoU) by the
decoder with the default position options after a few hundred steps.

The decoder (JMCELNDecoder) reads synthetic encoder features: three identical
blobs in a row, horizontal or vertical, on a 16 x 16 map; the sentence
feature is one fixed vector per word (left, middle, right, top, bottom).
A decoder that loses its position information, or stops reading the
sentence, picks one of the three and fails. (On a map this small padding
also tells the blobs apart, so this test alone does not show that the
explicit options are on: tests/test_position.py's translation tests do.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmceln_jax import config_lib, losses, metrics
from jmceln_jax.models.jmceln import JMCELNDecoder

SIDE = 16  # The decoder map (H/8); the logits are 8x larger.
WORDS = {"horizontal": ("left", "middle", "right"), "vertical": (
  "top", "middle", "bottom")}  # fmt: skip
VOCAB = ("left", "middle", "right", "top", "bottom")
STEPS, BATCH = 200, 8


def _batch(rng: np.random.Generator, batch: int):
  """(visual, text, targets [B, 8*SIDE, 8*SIDE]) of random probe scenes."""
  fine = 8 * SIDE
  yy, xx = np.mgrid[0:fine, 0:fine] / fine
  layer2 = np.zeros((batch, SIDE, SIDE, 8), np.float32)
  sentence = np.zeros((batch, len(VOCAB)), np.float32)
  targets = np.zeros((batch, fine, fine), np.int32)
  for b in range(batch):
    orientation = ("horizontal", "vertical")[rng.integers(2)]
    across = rng.uniform(0.4, 0.6)
    pick = rng.integers(3)
    for k in range(3):
      along = 0.5 + (k - 1) * 0.2 + rng.uniform(-0.02, 0.02)
      x, y = (along, across) if orientation == "horizontal" else (across, along)
      disc = (xx - x) ** 2 + (yy - y) ** 2 < 0.08**2
      small = disc.reshape(SIDE, 8, SIDE, 8).mean((1, 3))
      layer2[b] += small[..., None] * np.linspace(1, 2, 8)
      if k == pick:
        targets[b] = disc
    sentence[b, VOCAB.index(WORDS[orientation][pick])] = 1.0

  def pool(x, f):
    n = x.shape[1] // f
    return x.reshape(batch, n, f, n, f, -1).mean((2, 4))

  visual = {
    "layer2": layer2,
    "layer3": pool(layer2, 2),
    "dense": pool(layer2, 4),
  }
  return visual, {"sentence": sentence}, targets


def _probe_miou(position_options: dict) -> float:
  """Test mIoU after STEPS Adam steps of a small decoder."""
  model = JMCELNDecoder(
    dim=32, num_queries=4, num_stages=1, num_heads=4, window=4,
    dilations=(1, 2), head_channels=(8, 8, 8), **position_options,
  )  # fmt: skip
  rng = np.random.default_rng(0)
  visual, text, _ = _batch(rng, BATCH)
  variables = jax.jit(functools.partial(model.init, train=True))(
    jax.random.key(0), visual, text
  )
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, stats, opt, visual, text, targets):
    def loss_fn(p):
      (logits, _), new = model.apply(
        {"params": p, "batch_stats": stats}, visual, text, train=True,
        mutable=["batch_stats"],
      )  # fmt: skip
      loss, _ = losses.segmentation_loss(logits, targets)
      return loss, new["batch_stats"]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  for _ in range(STEPS):
    params, stats, opt = step(params, stats, opt, *_batch(rng, BATCH))
  visual, text, targets = _batch(np.random.default_rng(1), 64)
  logits, _ = jax.jit(functools.partial(model.apply, train=False))(
    {"params": params, "batch_stats": stats}, visual, text
  )
  i, u = metrics.network_iu(logits, jnp.asarray(targets))
  return float(jnp.mean(jnp.where(u > 0, i / jnp.maximum(u, 1), 0.0)))


def test_default_position_options_ground_position_words():
  cfg = config_lib.base_config().model
  defaults = {k: cfg[k] for k in ("coord_conv", "sine_pos", "lsran_sine_pos")}
  assert _probe_miou(defaults) > 0.6


def test_probe_images_differ_only_by_position():
  """Three shapes of one shape, colour and size in a row, away from the
  borders; every sentence names a place, and only its own."""
  from data_prep import expressions, position_probe

  config = expressions.ExpressionConfig(min_sentences=2, max_sentences=3)
  middle = {"middle", "centre", "center"}
  for index in range(20):
    _, shapes, sentences = position_probe.make_image(
      index, 0, position_probe.ProbeConfig(), config
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
