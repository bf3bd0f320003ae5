"""Tests of the JMCELN decoder parts: attention, windows, neck, LSRAN, PAN,
cascade, head. Tiny non-square maps (8x12 at H/8) where window 3 does not
divide the height."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jmceln_jax.models import layers, lsran
from jmceln_jax.models.cascade import Cascade, CascadeStage
from jmceln_jax.models.head import Head
from jmceln_jax.models.neck import Neck
from jmceln_jax.models.pan import PAN

B, H, W, C = 2, 8, 12, 32


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape)


def _init(module, *args, **kwargs):
  """Jitted init_with_output: one compile instead of eager op-by-op ones."""
  init = functools.partial(module.init_with_output, **kwargs)
  return jax.jit(init)(jax.random.key(0), *args)


def _apply(module, variables, *args, **kwargs):
  """Jitted module.apply."""
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


@pytest.mark.parametrize("window", [3, 5, 8, 13])
def test_window_partition_round_trip(window):
  x = _normal(0, (B, H, W, 5))
  windows = lsran.window_partition(x, window)
  nh, nw = -(-H // window), -(-W // window)
  chex.assert_shape(windows, (B, nh * nw, window * window, 5))
  # Window (0, 1) holds rows 0.. and columns window..2*window (zero-padded).
  if nw > 1:
    want = jnp.pad(
      x[:, :window, window : 2 * window],
      ((0, 0), (0, max(0, window - H)), (0, max(0, 2 * window - W)), (0, 0)),
    )[:, :window, :window]
    np.testing.assert_array_equal(
      windows[:, 1].reshape(B, window, window, 5), want
    )
  np.testing.assert_array_equal(lsran.window_merge(windows, window, H, W), x)
  padded = nh * nw * window * window - H * W
  assert int(jnp.sum(jnp.all(windows == 0, axis=-1))) == B * padded


def _mha_reference(tokens_q, tokens_kv, p, heads, bias=None):
  """numpy multi-head attention with the module's parameters."""
  q = np.einsum("nc,chd->nhd", tokens_q, p["query"]["kernel"])
  q = q + p["query"]["bias"]
  k = np.einsum("nc,chd->nhd", tokens_kv, p["key"]["kernel"])
  v = np.einsum("nc,chd->nhd", tokens_kv, p["value"]["kernel"])
  v = v + p["value"]["bias"]
  logits = np.einsum("nhd,mhd->hnm", q, k) / np.sqrt(q.shape[-1])
  if bias is not None:
    logits = logits + bias
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("hnm,mhd->nhd", probs, v)
  return np.einsum("nhd,hdc->nc", out, p["out"]["kernel"]) + p["out"]["bias"]


def test_window_attention_matches_per_window_reference():
  """Padded keys are masked: each clipped window attends only to its pixels,
  with the Swin relative position bias."""
  window, heads = 3, 4
  x = _normal(1, (1, H, W, C))
  module = lsran.WindowAttention(window, heads)
  params = _init(module, x)[1]["params"]
  params = jax.tree.map(lambda a: a + 0.1 * _normal(3, a.shape), params)
  out = np.asarray(_apply(module, {"params": params}, x))
  p = jax.tree.map(np.asarray, params)
  table, want = p["relative_position_bias"], np.zeros_like(out)
  for y0 in range(0, H, window):
    for x0 in range(0, W, window):
      coords = [
        (y, xx)
        for y in range(y0, min(y0 + window, H))
        for xx in range(x0, min(x0 + window, W))
      ]
      ys, xs = np.array(coords).T
      dy = ys[:, None] - ys[None, :] + window - 1
      dx = xs[:, None] - xs[None, :] + window - 1
      bias = table[dy * (2 * window - 1) + dx].transpose(2, 0, 1)
      tokens = np.asarray(x)[0, ys, xs]
      want[0, ys, xs] = _mha_reference(tokens, tokens, p["attn"], heads, bias)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


def test_attention_matches_torch_with_key_padding_mask():
  heads, tq, tk = 4, 5, 7
  query, kv = _normal(4, (B, tq, C)), _normal(5, (B, tk, C))
  pad = np.zeros((B, tk), bool)
  pad[0, -3:] = True
  mask = jnp.asarray(~pad)[:, None, None, :]
  module = layers.MultiHeadAttention(heads)
  params = _init(module, query, kv, kv)[1]["params"]
  out = _apply(module, {"params": params}, query, kv, kv, mask=mask)

  p = jax.tree.map(lambda a: torch.from_numpy(np.array(a)), params)
  ref = torch.nn.MultiheadAttention(C, heads, batch_first=True)
  with torch.no_grad():
    ref.in_proj_weight.copy_(
      torch.cat(
        [p[n]["kernel"].reshape(C, C).T for n in ("query", "key", "value")]
      )
    )
    ref.in_proj_bias.copy_(
      torch.cat(
        [
          p["query"]["bias"].reshape(C),
          torch.zeros(C),
          p["value"]["bias"].reshape(C),
        ]
      )
    )
    ref.out_proj.weight.copy_(p["out"]["kernel"].reshape(C, C).T)
    ref.out_proj.bias.copy_(p["out"]["bias"])
    want, _ = ref(
      *(torch.from_numpy(np.array(a)) for a in (query, kv, kv)),
      key_padding_mask=torch.from_numpy(pad),
    )
  np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_core_matches_jax_nn(dtype):
  """The shared core = jax.nn.dot_product_attention's XLA path (float32
  logits and softmax), here with extra leading dims and broadcast bias/mask."""
  heads, t, d = 2, 6, 8
  q, k, v = (_normal(i, (B, 3, t, heads, d)).astype(dtype) for i in (1, 2, 3))
  bias = _normal(4, (heads, t, t))
  mask = jax.random.bernoulli(jax.random.key(5), 0.7, (1, 3, 1, 1, t))
  mask = mask.at[..., 0].set(True)
  out = jax.jit(layers.dot_product_attention)(q, k, v, bias=bias, mask=mask)
  assert out.dtype == dtype
  flat = lambda x: x.reshape(B * 3, *x.shape[2:])  # noqa: E731
  want = jax.nn.dot_product_attention(
    flat(q),
    flat(k),
    flat(v),
    bias=bias[None],
    mask=flat(jnp.broadcast_to(mask, (B, 3, 1, 1, t))),
  ).reshape(out.shape)
  np.testing.assert_allclose(
    out.astype(jnp.float32), want.astype(jnp.float32), rtol=1e-5, atol=1e-6
  )


def test_attention_bfloat16_keeps_float32_softmax():
  heads = 4
  x = _normal(7, (B, 6, C))
  module = layers.MultiHeadAttention(heads, dtype=jnp.bfloat16)
  params = _init(module, x, x, x)[1]
  chex.assert_trees_all_equal_dtypes(
    params, jax.tree.map(lambda a: a.astype(jnp.float32), params)
  )
  out = _apply(module, params, x, x, x)
  ref = _apply(layers.MultiHeadAttention(heads), params, x, x, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1, rtol=0.1)


def test_neck_shapes_and_pyramid_check():
  c3, c4 = _normal(9, (B, H, W, 16)), _normal(10, (B, H // 2, W // 2, 24))
  c5, sentence = _normal(11, (B, H // 4, W // 4, 12)), _normal(12, (B, 10))
  neck = Neck(C)
  f_m, _ = _init(neck, c3, c4, c5, sentence, train=False)
  chex.assert_shape(f_m, (B, H, W, C))
  with pytest.raises(ValueError, match="multiples of 32"):
    neck.init(jax.random.key(13), c3, c4[:, :-1], c5, sentence, train=False)


def test_lsran_non_square_window_not_dividing():
  f_m = _normal(14, (B, H, W, C))
  module = lsran.LSRAN(window=3, num_heads=4, dilations=(1, 2, 3, 4))
  out, variables = _init(module, f_m, train=True)
  chex.assert_shape(out, (B, H, W, C))
  chex.assert_tree_all_finite(out)
  assert set(variables["params"]) == {
    "norm",
    "window_attn",
    "branch_0",
    "branch_1",
    "branch_2",
    "branch_3",
    "mix",
    "boundary",
  }
  chex.assert_shape(
    variables["params"]["branch_2"]["conv"]["kernel"], (3, 3, C, C // 4)
  )


@pytest.mark.slow
@pytest.mark.parametrize("residual", ["previous", "input"])
def test_pan_zero_gate_passes_residual(residual):
  """With a zero previous-stage projection g the gated path is exactly zero;
  SwitchNorm maps zero to its bias (training mode), so out = residual + bias.
  In eval mode the BN branch's running statistics shift that constant."""
  x, prev = _normal(16, (B, H, W, C)), _normal(17, (B, H, W, C))
  module = PAN(residual)
  variables = _init(module, x, prev, train=True)[1]
  params = jax.tree.map(lambda a: a + 0.1, variables["params"])
  params["proj_prev"]["kernel"] = jnp.zeros_like(params["proj_prev"]["kernel"])
  base = prev if residual == "previous" else x
  (out, state) = _apply(
    module,
    {**variables, "params": params},
    x,
    prev,
    train=True,
    mutable=["batch_stats", "intermediates"],
  )
  (gated,) = state["intermediates"]["gated"]
  np.testing.assert_array_equal(gated, 0.0)
  norm = params["norm"]
  np.testing.assert_allclose(out, base + norm["bias"], atol=1e-6)

  stats = {"norm": {"mean": jnp.full((C,), 0.5), "var": jnp.full((C,), 2.0)}}
  out_eval = _apply(
    module, {"params": params, "batch_stats": stats}, x, prev, train=False
  )
  wm = jax.nn.softmax(norm["mean_weight"])[2]
  wv = jax.nn.softmax(norm["var_weight"])[2]
  shift = -wm * 0.5 / jnp.sqrt(wv * 2.0 + 1e-5) * norm["scale"] + norm["bias"]
  np.testing.assert_allclose(out_eval, base + shift, atol=1e-5)

  # A nonzero gate does change the output.
  out_gated = _apply(module, variables, x, prev, train=False)
  assert float(jnp.max(jnp.abs(out_gated - base))) > 1e-3


def _perturb_stage_output(stage_name, delta):
  """Interceptor adding `delta` to the F_mt output of one CascadeStage."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, CascadeStage) and module.name == stage_name:
      return out[0], out[1] + delta
    return out

  return interceptor


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [True, False])
def test_cascade_feedback_only_with_adaptive_lce(adaptive):
  """Perturbing F_mt^1 (stage 0's output) changes q^2 only with adaptive
  LCE; the feature path (F_mt^2) changes either way."""
  f_m, f_mt0 = _normal(19, (B, H, W, C)), _normal(20, (B, H, W, C))
  delta = _normal(22, (B, H, W, C))
  module = Cascade(
    num_stages=2, num_queries=4, num_heads=4, adaptive_lce=adaptive
  )
  variables = jax.eval_shape(
    functools.partial(module.init, train=False), jax.random.key(0), f_m, f_mt0
  )
  variables = jax.tree.map(lambda v: _normal(21, v.shape) * 0.3, variables)

  def reference_and_perturbed(variables):
    run = functools.partial(
      module.apply, variables, f_m, f_mt0, train=True, mutable=["batch_stats"]
    )
    with nn.intercept_methods(_perturb_stage_output("stage_0", delta)):
      moved = run()[0][1]
    return run()[0][1], moved

  ref, moved = jax.jit(reference_and_perturbed)(variables)
  np.testing.assert_array_equal(moved[0]["q"], ref[0]["q"])
  q_change = float(jnp.max(jnp.abs(moved[1]["q"] - ref[1]["q"])))
  assert (q_change > 1e-4) == adaptive, q_change
  assert float(jnp.max(jnp.abs(moved[1]["f_mt"] - ref[1]["f_mt"]))) > 1e-3


@pytest.mark.slow
def test_cascade_words_and_query_init():
  f_m = _normal(23, (B, H, W, C))
  words = _normal(24, (B, 5, 16))
  pad_mask = jnp.array([[False] * 3 + [True] * 2, [False] * 5])
  module = Cascade(num_stages=1, num_queries=4, num_heads=4, use_words=True)
  (f_mt, stages), variables = _init(
    module, f_m, f_m, words, pad_mask, train=True
  )
  chex.assert_shape(f_mt, (B, H, W, C))
  chex.assert_shape(stages[0]["q"], (B, 4, C))
  chex.assert_shape(variables["params"]["word_proj"]["kernel"], (16, C))
  q0 = variables["params"]["query_embed"]
  assert 0.8 < float(jnp.std(q0)) < 1.2  # N(0, 1), the default std
  # Padded words are ignored: changing them leaves the outputs unchanged.
  words2 = words.at[0, 3:].set(100.0)
  (f_mt2, _), _ = _apply(
    module,
    variables,
    f_m,
    f_m,
    words2,
    pad_mask,
    train=True,
    mutable=["batch_stats"],
  )
  np.testing.assert_allclose(f_mt2, f_mt, atol=1e-5)
  with pytest.raises(ValueError, match="use_words"):
    module.init(jax.random.key(25), f_m, f_m, train=True)


def test_head_upsamples_by_eight():
  x = _normal(26, (B, H, W, C))
  logits, variables = _init(Head((8, 8, 8)), x, train=False)
  chex.assert_shape(logits, (B, 8 * H, 8 * W, 2))
  assert logits.dtype == jnp.float32
  assert sorted(variables["params"]) == [
    "classifier",
    "up0_conv0",
    "up0_conv1",
    "up1_conv0",
    "up1_conv1",
    "up2_conv0",
    "up2_conv1",
  ]
