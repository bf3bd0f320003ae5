"""Optimiser: schedule, regex multipliers, freezing, kernel-only decay."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmceln_jax import config_lib
from jmceln_jax.training import optim


def _cfg(**kw):
  cfg = config_lib.base_config().optim
  cfg.update({"lr": 0.1, "weight_decay": 0.0, **kw})
  return cfg


def _params():
  return {
    "clip": {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"bias": jnp.ones(3)}},
    "head": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
  }


def _first_update(cfg, params):
  tx, _ = optim.make_optimizer(cfg, params, total_steps=100)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(lambda u: float(u.ravel()[0]), updates)


def test_poly_schedule_with_warmup():
  sched = optim.learning_rate_schedule(_cfg(warmup_steps=10), 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(sched(60)), 0.1 * 0.5**0.9, rtol=1e-5)
  assert float(sched(110)) == pytest.approx(0.0)


def test_multipliers_first_match_wins_and_zero_freezes():
  cfg = _cfg(lr_mults=(("clip/conv/.*", 0.0), ("clip/.*", 0.1)))
  params = _params()
  u = _first_update(cfg, params)
  # Adam's first step is lr * sign(g) (up to eps) for unit gradients.
  assert u["clip"]["conv"]["kernel"] == 0.0
  assert u["clip"]["bn"]["bias"] == pytest.approx(-0.01, rel=1e-4)
  assert u["head"]["kernel"] == pytest.approx(-0.1, rel=1e-4)
  tx, _ = optim.make_optimizer(cfg, params, 100)
  state_leaves = jax.tree.leaves(tx.init(params))
  # Frozen parameters carry no Adam moments: 3 trainable leaves x (mu, nu).
  sizes = sorted(x.size for x in state_leaves if x.ndim > 0)
  assert sizes == sorted([3, 2, 2] * 2)


def test_weight_decay_only_on_kernels():
  params = _params()
  cfg = _cfg(weight_decay=0.5, b1=0.0, b2=0.0, eps=1e30)  # Adam step ~ 0.
  u = _first_update(cfg, params)
  assert u["head"]["kernel"] == pytest.approx(-0.1 * 0.5)
  assert u["head"]["bias"] == pytest.approx(0.0, abs=1e-12)
  assert u["clip"]["bn"]["bias"] == pytest.approx(0.0, abs=1e-12)


def test_grad_clip_norm():
  params = {"w": jnp.zeros(4)}
  cfg = _cfg(grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=0.0)
  tx, _ = optim.make_optimizer(cfg, params, 10)
  clipped = tx.update({"w": jnp.full(4, 100.0)}, tx.init(params), params)[0]
  # With b1=b2=0, Adam normalises per element; the sign survives clipping.
  np.testing.assert_allclose(clipped["w"], -0.1, rtol=1e-5)


# The README's recipe for a faster decoder (section "Training"), verbatim.
README_RECIPE = [
  "--config.optim.lr=1e-4",
  '--config.optim.lr_mults=(("clip/.*", 0.1),)',
]


def test_readme_faster_decoder_recipe():
  """Parsed as the command lines parse it: CLIP at 1e-5, the decoder at
  1e-4 (CRIS's rates)."""
  from absl import flags
  from ml_collections import config_flags

  config = os.path.join(
    os.path.dirname(__file__), "..", "configs", "refcoco.py"
  )
  argv = ["prog", f"--config={config}", *README_RECIPE]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file(
    "config", flag_values=values, lock_config=True, sys_argv=argv
  )
  values(argv)
  cfg = values.config.optim
  cfg.weight_decay = 0.0
  first = _first_update(cfg, _params())  # Adam's first step: -lr * mult.
  np.testing.assert_allclose(first["clip"]["conv"]["kernel"], -1e-5, rtol=1e-3)
  np.testing.assert_allclose(first["clip"]["bn"]["bias"], -1e-5, rtol=1e-3)
  np.testing.assert_allclose(first["head"]["kernel"], -1e-4, rtol=1e-3)
