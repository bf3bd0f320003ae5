"""The 2-class cross-entropy against torch and a hand computation."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jmceln_jax.training import losses

RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(3, 4, 5, 2)).astype(np.float32)
TARGETS = RNG.integers(0, 2, size=(3, 4, 5))


def _torch_ce(logits, targets, weight=None):
  loss = torch.nn.CrossEntropyLoss(
    weight=None if weight is None else torch.tensor(weight)
  )
  return float(
    loss(
      torch.from_numpy(logits).permute(0, 3, 1, 2),
      torch.from_numpy(targets).long(),
    )
  )


@pytest.mark.parametrize("weights", [None, (0.9, 1.1)])
def test_matches_torch(weights):
  got = losses.cross_entropy(LOGITS, TARGETS, class_weights=weights)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
    got, _torch_ce(LOGITS, TARGETS, weights), rtol=1e-6
  )


def test_hand_computation():
  logits = np.array([[[[0.0, 0.0], [2.0, 0.0]]]], np.float32)  # [1, 1, 2, 2]
  targets = np.array([[[1, 1]]])
  nll = [np.log(2.0), np.log1p(np.exp(2.0))]
  np.testing.assert_allclose(
    losses.cross_entropy(logits, targets), np.mean(nll), rtol=1e-6
  )


def test_example_weights_drop_examples():
  weights = np.array([1.0, 0.0, 1.0], np.float32)
  got = losses.cross_entropy(
    LOGITS, TARGETS, class_weights=(0.9, 1.1), example_weights=weights
  )
  keep = [0, 2]
  want = _torch_ce(LOGITS[keep], TARGETS[keep], (0.9, 1.1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  zero = losses.cross_entropy(LOGITS, TARGETS, example_weights=np.zeros(3))
  assert float(zero) == 0.0


def test_bfloat16_logits_computed_in_float32():
  got = losses.cross_entropy(jnp.asarray(LOGITS, jnp.bfloat16), TARGETS)
  assert got.dtype == jnp.float32
  want = _torch_ce(
    np.asarray(jnp.asarray(LOGITS, jnp.bfloat16), np.float32), TARGETS
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_deep_supervision_terms():
  stage = [LOGITS * 0.5, LOGITS * 2.0]
  total, terms = losses.segmentation_loss(
    LOGITS, TARGETS, stage_logits=stage, stage_weight=0.4
  )
  stage_ce = sum(_torch_ce(s, TARGETS) for s in stage)
  np.testing.assert_allclose(terms["ce"], _torch_ce(LOGITS, TARGETS), rtol=1e-6)
  np.testing.assert_allclose(terms["stage_ce"], stage_ce, rtol=1e-6)
  np.testing.assert_allclose(total, terms["ce"] + 0.4 * stage_ce, rtol=1e-6)
  plain, _ = losses.segmentation_loss(LOGITS, TARGETS)
  np.testing.assert_allclose(plain, terms["ce"], rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match="deep_supervision"):
    losses.segmentation_loss(LOGITS, TARGETS, stage_weight=0.5)
  with pytest.raises(ValueError, match="disagree"):
    losses.cross_entropy(LOGITS, TARGETS[:, :-1])
