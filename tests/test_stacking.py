"""Scanned runs of identical blocks (ops/stacking.py): same values,
gradients and batch statistics as the unrolled blocks, layouts convertible
both ways, every iteration counted under unrolled_loops."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmceln_jax import config_lib
from jmceln_jax.models import clip_resnet
from jmceln_jax.models.clip import CLIP
from jmceln_jax.ops import stacking

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

# Runs to scan in both towers: layer2-4 (1, 2, 1 scanned blocks), 3 text layers.
HPARAMS = dict(
  config_lib.CLIP_TINY, vision_layers=(1, 2, 3, 2), transformer_layers=3
)
IMAGES = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
TOKENS = jnp.array([[1, 5, 99, 0, 0, 0, 0, 0], [1, 7, 8, 99, 0, 0, 0, 0]])


@pytest.fixture(scope="module")
def models():
  """(unrolled model, its variables, scanned model, the same variables
  restacked)."""
  unrolled, scanned = CLIP(**HPARAMS), CLIP(**HPARAMS, scan=True)
  variables = jax.device_get(unrolled.init(jax.random.key(1), IMAGES, TOKENS))
  target = jax.eval_shape(scanned.init, jax.random.key(1), IMAGES, TOKENS)
  restacked = stacking.match_layout(variables, target)
  chex.assert_trees_all_equal_shapes_and_dtypes(restacked, target)
  return unrolled, variables, scanned, restacked


def test_layouts():
  variables = jax.eval_shape(
    CLIP(**HPARAMS, scan=True).init, jax.random.key(1), IMAGES, TOKENS
  )["params"]
  layer3 = variables["visual"]["layer3"]
  assert sorted(layer3) == ["0", stacking.SCANNED]  # Block 0 strides.
  chex.assert_shape(
    layer3[stacking.SCANNED]["conv2"]["kernel"], (2, 3, 3, 32, 32)
  )
  assert sorted(variables["visual"]["layer1"]) == ["0"]  # Nothing to scan.
  resblocks = variables["text"]["transformer"]["resblocks"]
  assert list(resblocks) == [stacking.SCANNED]
  chex.assert_shape(resblocks[stacking.SCANNED]["ln_1"]["scale"], (3, 64))


def test_match_layout_round_trip(models):
  _, variables, _, restacked = models
  back = stacking.match_layout(restacked, variables)
  chex.assert_trees_all_equal(back, variables)
  np.testing.assert_array_equal(
    restacked["params"]["visual"]["layer3"][stacking.SCANNED]["bn1"]["bias"][1],
    variables["params"]["visual"]["layer3"]["2"]["bn1"]["bias"],
  )


def test_match_layout_rejects_gaps():
  target = {"0": {"w": 0}, stacking.SCANNED: {"w": 0}}
  tree = {str(i): {"w": np.zeros(2)} for i in (0, 1, 3)}
  with pytest.raises(ValueError, match="not consecutive"):
    stacking.match_layout(tree, target)


@pytest.mark.parametrize("train", [False, True])
def test_scanned_equals_unrolled(models, train):
  unrolled, variables, scanned, restacked = models
  kw = dict(train=train, mutable=["batch_stats"] if train else False)
  out_u = unrolled.apply(variables, IMAGES, TOKENS, **kw)
  out_s = scanned.apply(restacked, IMAGES, TOKENS, **kw)
  if train:  # Updated batch statistics too.
    out_s = (out_s[0], stacking.match_layout(out_s[1], out_u[1]))
  chex.assert_trees_all_close(out_s, out_u, atol=1e-5, rtol=1e-5)


def test_scanned_gradients_equal_unrolled(models):
  unrolled, variables, scanned, restacked = models

  def grads(model, v):
    def loss(params):
      image, text = model.apply(dict(v, params=params), IMAGES, TOKENS)
      return jnp.sum(image["dense"] ** 2) + jnp.sum(text["sentence"] ** 2)

    return jax.grad(loss)(v["params"])

  g_u = grads(unrolled, variables)
  g_s = stacking.match_layout(jax.device_get(grads(scanned, restacked)), g_u)
  chex.assert_trees_all_close(g_s, g_u, atol=1e-4, rtol=1e-4)


def test_unrolled_loops_count_every_block(models):
  """XLA's cost analysis counts a loop body once: the scanned program
  undercounts unless traced under unrolled_loops."""
  unrolled, variables, scanned, restacked = models

  def flops(model, v):
    lowered = jax.jit(model.apply).lower(v, IMAGES, TOKENS)
    return lowered.cost_analysis()["flops"]

  reference = flops(unrolled, variables)
  assert flops(scanned, restacked) < 0.97 * reference
  with stacking.unrolled_loops():
    assert flops(scanned, restacked) == pytest.approx(reference, rel=0.01)


def test_materialize_is_the_identity():
  x = jax.random.normal(jax.random.key(2), (2, 3, 4))
  w = jax.random.normal(jax.random.key(3), (2, 3, 4))
  chex.assert_trees_all_equal(jax.jit(stacking.materialize)(x), x)
  grad = jax.grad(lambda x: (stacking.materialize(x) * w).sum())(x)
  chex.assert_trees_all_equal(grad, w)


def test_residual_stream_computed_once():
  """XLA's CPU fusion would recompute every earlier block's residual tail
  (BatchNorm bn3 + add + ReLU) in each block of an unrolled ResNet stage;
  with the Bottleneck's `materialize` no fusion reads bn3 of two blocks."""
  stage = clip_resnet.ResNetStage(planes=4, blocks=6, stride=1)
  x = jnp.ones((1, 8, 8, 16))
  variables = stage.init(jax.random.key(0), x, use_running_average=True)
  apply = jax.jit(lambda v, x: stage.apply(v, x, use_running_average=True))
  hlo = apply.lower(variables, x).compile().as_text()
  fusions = re.findall(r"= \S+ fusion\((.*?)\), kind=", hlo)
  blocks = [set(re.findall(r"____(\d+)____bn3", args)) for args in fusions]
  assert any(blocks)  # The check sees the bn3 operands at all.
  assert max(map(len, blocks)) == 1, blocks
