"""SwitchNorm against a numpy transcription of the reference SwitchNorm2d
(IN/LN/BN statistics, unbiased IN variance, softmax mixing, running
statistics with momentum 0.9, eval mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmceln_jax.models.switchnorm import SwitchNorm

B, H, W, C = 3, 4, 6, 5
EPS, MOMENTUM = 1e-5, 0.9


def _softmax(z):
  e = np.exp(z - z.max())
  return e / e.sum()


def _reference(x, p, running_mean, running_var, train):
  """numpy SwitchNorm2d on NHWC; returns (y, new_mean, new_var)."""
  flat = x.reshape(B, H * W, C)
  mean_in = flat.mean(1, keepdims=True)  # [B, 1, C]
  var_in = flat.var(1, ddof=1, keepdims=True)
  temp = var_in + mean_in**2
  mean_ln = mean_in.mean(2, keepdims=True)
  var_ln = temp.mean(2, keepdims=True) - mean_ln**2
  if train:
    mean_bn = mean_in.mean(0, keepdims=True)
    var_bn = temp.mean(0, keepdims=True) - mean_bn**2
    running_mean = MOMENTUM * running_mean + (1 - MOMENTUM) * mean_bn.ravel()
    running_var = MOMENTUM * running_var + (1 - MOMENTUM) * var_bn.ravel()
  else:
    mean_bn, var_bn = running_mean, running_var
  wm, wv = _softmax(p["mean_weight"]), _softmax(p["var_weight"])
  mean = wm[0] * mean_in + wm[1] * mean_ln + wm[2] * mean_bn
  var = wv[0] * var_in + wv[1] * var_ln + wv[2] * var_bn
  y = (flat - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]
  return y.reshape(x.shape), running_mean, running_var


@pytest.fixture(scope="module")
def setup():
  x = np.random.default_rng(0).normal(2.0, 3.0, (B, H, W, C))
  module = SwitchNorm()
  variables = module.init(jax.random.key(0), jnp.asarray(x), train=True)
  rng = np.random.default_rng(1)
  params = {k: rng.normal(size=v.shape) for k, v in variables["params"].items()}
  params["scale"] += 1.0
  return module, x.astype(np.float32), jax.tree.map(np.float32, params)


def test_initial_state():
  variables = SwitchNorm().init(
    jax.random.key(0), jnp.ones((2, 3, 3, 4)), train=True
  )
  np.testing.assert_array_equal(variables["params"]["mean_weight"], np.ones(3))
  np.testing.assert_array_equal(variables["params"]["scale"], np.ones(4))
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(4))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.zeros(4))


def test_train_mode_and_running_update(setup):
  module, x, params = setup
  stats = {
    "mean": np.full(C, 0.3, np.float32),
    "var": np.full(C, 1.7, np.float32),
  }
  apply = jax.jit(
    functools.partial(module.apply, train=True, mutable=["batch_stats"])
  )
  y, state = apply({"params": params, "batch_stats": stats}, x)
  want, mean, var = _reference(x, params, stats["mean"], stats["var"], True)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(state["batch_stats"]["mean"], mean, rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], var, rtol=1e-5)


def test_eval_mode_uses_running_stats(setup):
  module, x, params = setup
  stats = {
    "mean": np.linspace(-1, 1, C).astype(np.float32),
    "var": np.linspace(0.5, 2, C).astype(np.float32),
  }
  y = jax.jit(functools.partial(module.apply, train=False))(
    {"params": params, "batch_stats": stats}, x
  )
  want, _, _ = _reference(x, params, stats["mean"], stats["var"], False)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  # Eval statistics are per sample (IN/LN) + running (BN): no batch coupling.
  y0 = module.apply(
    {"params": params, "batch_stats": stats}, x[:1], train=False
  )
  np.testing.assert_allclose(y0, y[:1], rtol=1e-5, atol=1e-5)


def test_zero_input_gives_bias(setup):
  module, _, params = setup
  y, _ = module.apply(
    {
      "params": params,
      "batch_stats": {"mean": np.zeros(C), "var": np.zeros(C)},
    },
    jnp.zeros((B, H, W, C)),
    train=True,
    mutable=["batch_stats"],
  )
  np.testing.assert_array_equal(y, np.broadcast_to(params["bias"], y.shape))


def test_bfloat16_output_dtype(setup):
  module, x, params = setup
  stats = {"mean": np.zeros(C, np.float32), "var": np.ones(C, np.float32)}
  y = SwitchNorm(dtype=jnp.bfloat16).apply(
    {"params": params, "batch_stats": stats}, x, train=False
  )
  ref = module.apply({"params": params, "batch_stats": stats}, x, train=False)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(np.float32), ref, rtol=2e-2, atol=2e-2)


def test_single_pixel_map_rejected():
  with pytest.raises(ValueError, match="2 spatial positions"):
    SwitchNorm().init(jax.random.key(0), jnp.ones((2, 1, 1, 4)), train=True)
