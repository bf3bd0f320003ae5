"""JMCELN decoder and model: every Table 2 variant trains (finite, nonzero
gradients for exactly the parameters it creates), remat and bfloat16 paths,
and the paper configuration by shape only."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_test_utils import TINY_CLIP

from jmceln_jax import config_lib
from jmceln_jax.models.jmceln import JMCELNDecoder, build_model
from jmceln_jax.training import losses

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

B, H, W = 2, 64, 96  # H/8 x W/8 = 8 x 12: window 3 does not divide 8.
TINY = dict(
  dim=32,
  num_queries=4,
  num_stages=2,
  num_heads=4,
  window=3,
  dilations=(1, 2, 3, 4),
  head_channels=(8, 8, 8),
)
# Adds every optional parameter: all variants' trees are subtrees of it.
SUPERSET = dict(
  use_words=True,
  deep_supervision=True,
  coord_conv=True,
  sine_pos=True,
  lsran_sine_pos=True,
)


def _features(batch=B, height=H, width=W, c3=16, c4=24, c5=12, text=10):
  """Random encoder outputs shaped like CLIP.encode_image / encode_text."""
  keys = jax.random.split(jax.random.key(0), 5)
  visual = {
    "layer2": jax.random.normal(keys[0], (batch, height // 8, width // 8, c3)),
    "layer3": jax.random.normal(
      keys[1], (batch, height // 16, width // 16, c4)
    ),
    "dense": jax.random.normal(keys[2], (batch, height // 32, width // 32, c5)),
  }
  pad_mask = jnp.arange(5)[None, :] >= jnp.array([[3], [5]])[:batch]
  text = {
    "sentence": jax.random.normal(keys[3], (batch, text)),
    "words": jax.random.normal(keys[4], (batch, 5, text)),
    "pad_mask": pad_mask,
  }
  return visual, text


@functools.cache
def _superset_variables():
  """One real init of the model with every optional part."""
  model = JMCELNDecoder(**TINY, **SUPERSET)
  init = functools.partial(model.init, train=True)
  return jax.jit(init)(jax.random.key(2), *_features())


def _select(tree, shapes):
  """The entries of `tree` named in the nested dict `shapes`."""
  if not isinstance(shapes, dict):
    return tree
  return {k: _select(tree[k], v) for k, v in shapes.items()}


def _variables_for(model, train):
  """(abstract variables of `model`, their values from the superset init)."""
  shapes = jax.eval_shape(
    functools.partial(model.init, train=train), jax.random.key(0), *_features()
  )
  variables = _select(_superset_variables(), shapes)
  jax.tree.map(lambda s, x: chex.assert_shape(x, s.shape), shapes, variables)
  return shapes, variables


# Table 2 rows plus one run with every option (words, deep supervision,
# position information, the other PAN residual, rematerialised stages).
SETTINGS = dict(
  config_lib.VARIANTS,
  options=dict(SUPERSET, pan_residual="input", remat=True),
)
EXPECTED_TOP = {
  "baseline": {"neck", "head"},
  "lsran": {"neck", "lsran", "head"},
  "cascade": {"neck", "cascade", "head"},
  "wo_pan": {"neck", "lsran", "cascade", "head"},
  "full": {"neck", "lsran", "cascade", "head"},
  "wo_adaptive_lce": {"neck", "lsran", "cascade", "head"},
  "options": {
    "neck",
    "lsran",
    "cascade",
    "head",
    "stage_classifier_0",
    "stage_classifier_1",
  },
}


@functools.cache
def _run_variant(variant):
  """(abstract variables, loss, logits, aux, grads) of one training step."""
  model = JMCELNDecoder(**{**TINY, **SETTINGS[variant]})
  shapes, variables = _variables_for(model, train=True)
  targets = jax.random.bernoulli(jax.random.key(1), 0.3, (B, H, W))

  def loss_fn(params):
    (logits, aux), _ = model.apply(
      {**variables, "params": params},
      *_features(),
      train=True,
      mutable=["batch_stats"],
    )
    stage_logits = [s["logits"] for s in aux["stages"] if "logits" in s]
    loss, _ = losses.segmentation_loss(
      logits,
      targets.astype(jnp.int32),
      class_weights=(0.9, 1.1),
      stage_logits=stage_logits,
      stage_weight=0.5 if stage_logits else 0.0,
    )
    return loss, (logits, aux)

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (logits, aux)), grads = step(variables["params"])
  return shapes, loss, logits, aux, grads


@pytest.mark.parametrize("variant", sorted(EXPECTED_TOP))
def test_variant_trains(variant):
  shapes, loss, logits, aux, grads = _run_variant(variant)
  params = shapes["params"]
  assert set(params) == EXPECTED_TOP[variant]
  stage = params.get("cascade", {}).get("stage_0", {})
  use_pan = SETTINGS[variant].get("use_pan", True)
  assert ("pan" in stage) == bool(stage and use_pan)
  assert ("word_proj" in params.get("cascade", {})) == (variant == "options")
  chex.assert_shape(logits, (B, H, W, 2))
  assert np.isfinite(float(loss))
  chex.assert_tree_all_finite(grads)
  zero = [
    jax.tree_util.keystr(path)
    for path, g in jax.tree_util.tree_leaves_with_path(grads)
    if not bool(jnp.any(g != 0))
  ]
  assert not zero, f"zero gradients for {zero}"
  assert len(aux["stages"]) == (2 if "cascade" in params else 0)
  if variant == "options":
    chex.assert_shape(aux["stages"][1]["logits"], (B, H, W, 2))


def test_adaptive_lce_flag_reaches_the_cascade():
  """Same parameters and inputs: stage 0 is identical, stage 1's embedding
  differs (its Eq. 3 reads F_mt^1 or F_mt^0)."""
  full, fixed = _run_variant("full")[3], _run_variant("wo_adaptive_lce")[3]
  np.testing.assert_allclose(
    full["stages"][0]["q"], fixed["stages"][0]["q"], atol=1e-6
  )
  diff = full["stages"][1]["q"] - fixed["stages"][1]["q"]
  assert float(jnp.max(jnp.abs(diff))) > 1e-4


def test_bfloat16_forward():
  model = JMCELNDecoder(**TINY, dtype="bfloat16")
  shapes, variables = _variables_for(model, train=False)
  chex.assert_trees_all_equal_dtypes(
    shapes["params"], jax.tree.map(lambda _: jnp.float32, shapes["params"])
  )
  logits, aux = jax.jit(functools.partial(model.apply, train=False))(
    variables, *_features()
  )
  assert logits.dtype == jnp.float32
  assert aux["stages"][-1]["f_mt"].dtype == jnp.bfloat16
  chex.assert_tree_all_finite(logits)


def test_invalid_settings_are_reported():
  features = _features()
  bad = JMCELNDecoder(**dict(TINY, pan_residual="next"))
  with pytest.raises(ValueError, match="pan_residual"):
    jax.eval_shape(
      functools.partial(bad.init, train=False), jax.random.key(0), *features
    )
  with pytest.raises(ValueError, match="Unknown model config"):
    build_model(dict(config_lib.base_config().model, dims=3))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _tiny_model_config():
  """config.model with a tiny CLIP (random weights) and the TINY decoder."""
  config = config_lib.base_config()
  config.model.update(TINY)
  config.model.clip.update(TINY_CLIP)
  return config.model


def test_full_model_non_square():
  model = build_model(_tiny_model_config())
  images = jax.random.normal(jax.random.key(3), (B, H, W, 3))
  tokens = jnp.array([[1, 5, 7, 99, 0, 0, 0, 0], [1, 3, 99, 0, 0, 0, 0, 0]])
  init = functools.partial(model.init_with_output, train=True)
  (logits, aux), variables = jax.jit(init)(jax.random.key(4), images, tokens)
  chex.assert_shape(logits, (B, H, W, 2))
  chex.assert_tree_all_finite(logits)
  chex.assert_shape(aux["f_m"], (B, H // 8, W // 8, TINY["dim"]))
  params = variables["params"]
  assert set(params) == {"clip", "neck", "lsran", "cascade", "head"}
  assert set(params["clip"]) == {"visual", "text"}
  with pytest.raises(ValueError, match="multiples of 32"):
    model.init(jax.random.key(4), images[:, :40], tokens, train=False)


def test_paper_model_shapes():
  """The paper's full model (CLIP RN101, C=1024) at 416x416, by shape only."""
  model = build_model(config_lib.base_config().model)
  images = jax.ShapeDtypeStruct((1, 416, 416, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 30), jnp.int32)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    images,
    tokens,
  )
  logits, aux = jax.eval_shape(
    functools.partial(model.apply, train=False), variables, images, tokens
  )
  chex.assert_shape(logits, (1, 416, 416, 2))
  chex.assert_shape(aux["f_m"], (1, 52, 52, 1024))
  assert len(aux["stages"]) == 6
  chex.assert_shape(aux["stages"][5]["q"], (1, 20, 1024))
  chex.assert_shape(aux["stages"][5]["f_mt"], (1, 52, 52, 1024))
  params = variables["params"]
  chex.assert_shape(
    params["cascade"]["stage_5"]["pan"]["proj_in"]["kernel"],
    (1, 1, 1024, 1792),
  )
  chex.assert_shape(params["cascade"]["query_embed"], (20, 1024))
  chex.assert_shape(
    params["lsran"]["window_attn"]["relative_position_bias"], (625, 8)
  )
  # OpenAI RN101: 56.26M visual + 63.43M text (+ CRIS's `connect` conv/BN).
  assert 56e6 < _count(params["clip"]["visual"]) < 58e6
  assert 63e6 < _count(params["clip"]["text"]) < 64e6
