"""Position information (models/position.py) and the Q-embedding collapse
measure (models/cascade.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmceln_jax import config_lib
from jmceln_jax.models import position
from jmceln_jax.models.cascade import Cascade, mean_cosine
from jmceln_jax.models.jmceln import JMCELNDecoder
from jmceln_jax.models.lsran import WindowAttention
from jmceln_jax.training import checkpoints, model_state


def test_coordinates_span_the_map():
  c = position.coordinates(3, 5)
  assert c.shape == (3, 5, 2)
  np.testing.assert_allclose(c[0, :, 0], [-1, -0.5, 0, 0.5, 1])
  np.testing.assert_allclose(c[:, 0, 1], [-1, 0, 1])
  assert np.all(position.coordinates(1, 1) == 0)


def test_sine_encoding_tells_every_pixel_apart():
  e = position.sine_encoding(26, 13, 64)
  assert e.shape == (26, 13, 64) and e.dtype == np.float32
  assert np.abs(e).max() <= 1.0
  flat = e.reshape(-1, 64)
  distances = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  assert np.sort(distances, axis=1)[:, 1].min() > 0.05
  # y in the first half of the channels, x in the second.
  np.testing.assert_array_equal(e[:, 0, :32], e[:, 7, :32])
  np.testing.assert_array_equal(e[0, :, 32:], e[9, :, 32:])
  with pytest.raises(ValueError, match="divisible by 4"):
    position.sine_encoding(4, 4, 6)


def test_mean_cosine():
  q = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 512)))
  assert abs(float(mean_cosine(q))) < 0.02
  same = jnp.ones((2, 8, 16))
  np.testing.assert_allclose(float(mean_cosine(same)), 1.0, rtol=1e-6)
  assert float(mean_cosine(jnp.ones((1, 1, 4)))) == 0.0


def _collapse(std: float, dim: int = 256) -> float:
  """query_cosine of q^1 at init, on non-negative features (as the neck's
  LeakyReLU outputs mostly are)."""
  cascade = Cascade(
    num_stages=1, num_queries=20, num_heads=8, query_init_std=std, use_pan=False
  )
  f = jnp.abs(jax.random.normal(jax.random.key(0), (2, 13, 13, dim)))
  (_, stages), _ = cascade.init_with_output(
    jax.random.key(1), f, f, train=False
  )
  return float(stages[0]["query_cosine"])


@pytest.mark.slow
def test_small_query_init_collapses_the_embeddings():
  """The paper stresses that the Q embeddings start different; at std 0.02
  one Eq. 3 update makes them nearly identical, at 1.0 it does not."""
  assert _collapse(0.02) > 0.95
  assert _collapse(1.0) < 0.5


def test_cascade_sine_pos_reaches_keys_and_queries_not_values():
  """With F_m and F_mt constant over the map, a position-free cascade gives
  the same output at every pixel; sine encodings on Eq. 3's keys alone
  cannot change that (softmax over identical values), on Eq. 4's pixel
  queries they must."""
  f = jnp.ones((1, 6, 6, 32))
  outputs = {}
  for sine in (False, True):
    cascade = Cascade(
      num_stages=1,
      num_queries=4,
      num_heads=4,
      query_init_std=1.0,
      use_pan=False,
      sine_pos=sine,
    )
    (out, _), _ = cascade.init_with_output(jax.random.key(0), f, f, train=False)
    outputs[sine] = np.asarray(out)
  spread = {
    k: np.ptp(v.reshape(-1, 32), axis=0).max() for k, v in outputs.items()
  }
  assert spread[False] < 1e-5 < 1e-2 < spread[True]


def test_window_attention_sine_pos_sees_where_the_window_is():
  """Four windows with the same content: their outputs are the same
  without sine encodings, different with them."""
  tile = jax.random.normal(jax.random.key(1), (1, 4, 4, 16))
  x = jnp.tile(tile, (1, 2, 2, 1))
  outs = []
  for sine in (False, True):
    attn = WindowAttention(4, 4, sine_pos=sine)
    out, _ = attn.init_with_output(jax.random.key(0), x)
    windows = np.asarray(out).reshape(2, 4, 2, 4, 16).transpose(0, 2, 1, 3, 4)
    outs.append(np.ptp(windows[:, :, 0, 0].reshape(4, 16), axis=0).max())
  # The same pixel of each window: identical without, distinct with.
  assert outs[0] < 1e-5 < 1e-3 < outs[1]


def _decoder_inputs():
  keys = jax.random.split(jax.random.key(0), 4)
  visual = {
    "layer2": jax.random.normal(keys[0], (1, 16, 16, 8)),
    "layer3": jax.random.normal(keys[1], (1, 8, 8, 8)),
    "dense": jax.random.normal(keys[2], (1, 4, 4, 8)),
  }
  return visual, {"sentence": jax.random.normal(keys[3], (1, 8))}


def test_coord_conv_adds_the_neck_coord_layer():
  kw = dict(
    dim=32, num_queries=4, num_stages=1, num_heads=4, window=4,
    dilations=(1, 2), head_channels=(8, 8, 8),
  )  # fmt: skip
  shapes = {
    flag: jax.eval_shape(
      functools.partial(JMCELNDecoder(**kw, coord_conv=flag).init, train=False),
      jax.random.key(0),
      *_decoder_inputs(),
    )["params"]["neck"]
    for flag in (False, True)
  }
  assert set(shapes[True]) - set(shapes[False]) == {"coord"}
  assert shapes[True]["coord"]["conv"]["kernel"].shape == (3, 3, 34, 32)


@pytest.mark.slow
def test_checkpoint_from_before_the_position_options_is_refused(tmp_path):
  """A state saved without the neck's coord layer is refused by name."""
  config = config_lib.small_config(image_size=64, max_len=8, width=8, dim=32)
  old, new = config.copy_and_resolve_references(), config
  old.model.coord_conv = False
  new.model.coord_conv = True
  before = model_state.build_setup(old, num_train_refs=1).abstract_state
  after = model_state.build_setup(new, num_train_refs=1).abstract_state
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), before)
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, zeros, {})
  ckpt.close()
  reader = checkpoints.Checkpointer(str(tmp_path), read_only=True)
  with pytest.raises(checkpoints.MismatchError, match="neck/coord"):
    reader.restore(1, after)
  reader.close()


def _shifted_response(options: dict, shift: int = 16) -> float:
  """Largest logit change, around an object, when the object moves `shift`
  decoder cells to the right on a 64 x 64 decoder map.

  Far from the borders every layer of a position-free decoder is translation
  equivariant (convolutions, windows of 4 moved by whole windows, Eq. 3's
  softmax over the same set of pixels): the logits move with the object and
  the difference is float noise. Absolute position information changes them.
  """
  side, y0, x0 = 64, 32, 24
  yy, xx = np.mgrid[0:side, 0:side]
  visual_batch = []
  for x in (x0, x0 + shift):
    blob = np.exp(-((yy - y0) ** 2 + (xx - x) ** 2) / 8.0)[..., None]
    layer2 = (blob * np.linspace(1, 2, 8)).astype(np.float32)
    pool = lambda a, f: a.reshape(side // f, f, side // f, f, -1).mean((1, 3))  # noqa: E731
    visual_batch.append((layer2, pool(layer2, 2), pool(layer2, 4)))
  visual = {
    k: jnp.asarray(np.stack([v[i] for v in visual_batch]))
    for i, k in enumerate(("layer2", "layer3", "dense"))
  }
  text = {"sentence": jnp.ones((2, 8))}
  decoder = JMCELNDecoder(
    dim=32, num_queries=4, num_stages=1, num_heads=4, window=4,
    dilations=(1, 2), head_channels=(8, 8, 8), **options,
  )  # fmt: skip
  logits, _ = decoder.init_with_output(
    jax.random.key(0), visual, text, train=False
  )[0]
  logits = np.asarray(logits)
  crop = slice(8 * (y0 - 8), 8 * (y0 + 8))
  a = logits[0, crop, 8 * (x0 - 8) : 8 * (x0 + 8)]
  b = logits[1, crop, 8 * (x0 + shift - 8) : 8 * (x0 + shift + 8)]
  return float(np.abs(a - b).max())


POSITION_OPTIONS = ("coord_conv", "sine_pos", "lsran_sine_pos")


@pytest.mark.slow
def test_the_default_config_gives_the_decoder_absolute_position():
  model = config_lib.base_config().model
  assert _shifted_response({k: model[k] for k in POSITION_OPTIONS}) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("option", POSITION_OPTIONS)
def test_each_position_option_breaks_translation_equivariance(option):
  # Position-free: exactly 0 here; with the option: 4e-3 to 5e-2 at init.
  assert _shifted_response({}) < 1e-4
  assert _shifted_response({option: True}) > 1e-3
