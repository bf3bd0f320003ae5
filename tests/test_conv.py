"""The fast convolutions: same values, gradients and parameters as XLA's."""

from __future__ import annotations

import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmceln_jax.ops import conv, stacking

DN = ("NHWC", "HWIO", "NHWC")


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _loss(fn, cotangent):
  return lambda x, k: jnp.sum(fn(x, k).astype(jnp.float32) * cotangent)


def _hlo_convolutions(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().as_text().count(" convolution(")


# (kernel, padding, dilation, strides, groups): fast paths and pass-throughs
# on a [2, 9, 40, 4] input (kernel gradients: flat runs where the padding
# adds at most 1/16 to the 40 columns, else windows).
CASES = [
  ((1, 1), "SAME", 1, 1, 1),  # matmul
  ((1, 1), ((0, 0), (0, 0)), 1, 1, 1),  # matmul
  ((1, 1), ((1, 1), (1, 1)), 1, 1, 1),  # padded 1x1: per-tap kernel grad
  ((3, 3), ((1, 1), (1, 1)), 1, 1, 1),
  ((3, 3), "SAME", 1, 1, 1),
  ((3, 3), ((3, 3), (3, 3)), 3, 1, 1),  # dilated (LSRAN)
  ((3, 2), ((2, 0), (0, 1)), 1, 1, 1),  # asymmetric
  ((3, 3), "VALID", 1, 1, 1),
  ((2, 3), ((2, 2), (1, 1)), (2, 1), 1, 1),  # dilated rows only
  ((4, 3), ((0, 0), (1, 1)), (4, 1), 1, 1),  # taller than the input: empty
  ((3, 3), ((1, 1), (1, 1)), 1, 2, 1),  # strided: XLA's
  ((3, 3), ((1, 1), (1, 1)), 1, 1, 2),  # grouped: XLA's
]


@pytest.mark.parametrize("kernel_size,padding,dilation,stride,groups", CASES)
def test_conv_matches_xla_values_and_gradients(
  kernel_size, padding, dilation, stride, groups
):
  x = _normal(0, (2, 9, 40, 4))
  kernel = _normal(1, (*kernel_size, 4 // groups, 6))
  args = dict(
    window_strides=(stride, stride),
    padding=padding,
    rhs_dilation=np.broadcast_to(dilation, 2).tolist(),
    dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape, DN),
    feature_group_count=groups,
  )
  ours = functools.partial(conv.conv_general_dilated, **args)
  xla = functools.partial(jax.lax.conv_general_dilated, **args)
  want = xla(x, kernel)
  np.testing.assert_allclose(ours(x, kernel), want, atol=1e-5)
  cotangent = _normal(2, want.shape)
  got = jax.jit(jax.grad(_loss(ours, cotangent), (0, 1)))(x, kernel)
  ref = jax.grad(_loss(xla, cotangent), (0, 1))(x, kernel)
  chex.assert_trees_all_close(got, ref, atol=1e-4, rtol=1e-4)


def test_conv_gradient_paths_on_cpu():
  """1x1: no convolution at all; 3x3: XLA's convolutions for the output and
  the input gradient, matmuls for the kernel gradient."""
  x, cotangent = _normal(0, (1, 8, 8, 4)), _normal(2, (1, 8, 8, 6))

  def grad(kernel_size):
    module = conv.Conv(6, kernel_size, use_bias=False)
    return lambda x, p: jax.value_and_grad(
      lambda x, p: jnp.sum(module.apply(p, x) * cotangent), (0, 1)
    )(x, p)

  p1 = conv.Conv(6, (1, 1), use_bias=False).init(jax.random.key(0), x)
  p3 = conv.Conv(6, (3, 3), use_bias=False).init(jax.random.key(0), x)
  assert _hlo_convolutions(grad((1, 1)), x, p1) == 0
  assert _hlo_convolutions(grad((3, 3)), x, p3) == 2  # forward and dx


def test_input_gradient_keeps_an_hwio_kernel_in_loops_on_cpu():
  """In a scan (CLIP's scanned blocks) XLA's own input gradient hands the
  CPU convolution an HWOI kernel (4-5x slower); ours keeps HWIO."""
  x, kernels = _normal(0, (1, 8, 8, 4)), _normal(1, (3, 3, 3, 4, 4))
  dn = jax.lax.conv_dimension_numbers(x.shape, kernels.shape[1:], DN)

  def loss(x, kernels):
    def block(y, kernel):
      y = conv.conv_general_dilated(y, kernel, (1, 1), "SAME", None, None, dn)
      return y, None

    return jnp.sum(jax.lax.scan(block, x, kernels)[0] ** 2)

  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernels).compile().as_text()
  convs = [line for line in hlo.splitlines() if " convolution(" in line]
  assert len(convs) == 2  # forward and dx
  assert all("_01io->" in line for line in convs)


def _lowered(fn, platform, *args) -> str:
  """StableHLO of jit(fn) lowered for `platform` (no device of it needed)."""
  return (
    jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  )


def _convolutions(stablehlo: str) -> list[str]:
  """Each convolution's dimension numbers, window and types, sorted."""
  ops = [
    line for line in stablehlo.splitlines() if "stablehlo.convolution" in line
  ]
  return sorted(re.sub(r"^.*convolution\([^)]*\)", "", op) for op in ops)


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_accelerators_keep_xla_convolutions(platform):
  """Lowered for a GPU or TPU, a convolution's gradients are exactly XLA's
  and the depthwise kernel gradient is a convolution: no tap loops, which
  only the CPU lowering has."""
  x, kernel = _normal(0, (2, 8, 40, 4)), _normal(1, (3, 3, 4, 6))
  dn = jax.lax.conv_dimension_numbers(x.shape, kernel.shape, DN)

  def grads(conv_fn):
    def loss(x, k):
      return jnp.sum(conv_fn(x, k, (1, 1), "SAME", None, None, dn) ** 2)

    return jax.grad(loss, (0, 1))

  ours = _lowered(grads(conv.conv_general_dilated), platform, x, kernel)
  xla = _lowered(grads(jax.lax.conv_general_dilated), platform, x, kernel)
  assert _convolutions(ours) == _convolutions(xla)
  assert "stablehlo.while" not in ours

  depthwise = jax.grad(
    lambda x, k: jnp.sum(conv.depthwise_conv(x, k) ** 2), (0, 1)
  )
  args = x, _normal(1, (7, 7, 1, 4))
  assert len(_convolutions(_lowered(depthwise, platform, *args))) == 3
  assert "stablehlo.while" not in _lowered(depthwise, platform, *args)
  for fn, fn_args in (
    (grads(conv.conv_general_dilated), (x, kernel)),
    (depthwise, args),
  ):
    assert "stablehlo.while" in _lowered(fn, "cpu", *fn_args)


def test_conv_module_has_nn_conv_parameters():
  x = _normal(0, (2, 8, 8, 4))
  for kernel_size in ((1, 1), (3, 3)):
    ours = conv.Conv(6, kernel_size, kernel_dilation=2)
    theirs = nn.Conv(6, kernel_size, kernel_dilation=2)
    params = ours.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(params, theirs.init(jax.random.key(0), x))
    np.testing.assert_allclose(
      ours.apply(params, x), theirs.apply(params, x), atol=1e-5
    )


# (input [B, H, W, Ci], kernel [kh, kw], padding, dilation, flat runs?)
GEOMETRIES = [
  ((2, 9, 9, 5), (3, 3), ((2, 2), (2, 2)), 2, False),  # windows
  ((2, 5, 40, 5), (3, 3), ((1, 1), (1, 1)), 1, True),
  ((2, 7, 64, 5), (3, 3), ((2, 2), (2, 2)), 2, True),  # dilated
  ((2, 7, 40, 5), (2, 3), ((2, 2), (1, 1)), (2, 1), True),  # dilated rows
  ((1, 6, 36, 5), (3, 2), ((2, 0), (0, 1)), 1, True),  # asymmetric
  ((1, 6, 34, 5), (3, 3), ((0, 0), (0, 0)), 1, True),  # 'valid'
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,window,padding,dilation,flat", GEOMETRIES)
def test_gradient_branches_agree(dtype, shape, window, padding, dilation, flat):
  """The CPU gradients (flipped-kernel input gradient; per-tap kernel
  gradient, in windows or flat runs) equal XLA's (the GPU/TPU branch)."""
  x = _normal(0, shape, dtype)
  kernel = _normal(1, (*window, shape[-1], 7), dtype)
  args = dict(
    padding=padding,
    dilation=tuple(np.broadcast_to(dilation, 2).tolist()),
    dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape, DN),
    precision=None,
  )
  out = jax.eval_shape(
    lambda x, k: conv._xla_conv(x, k, **args), x, kernel
  ).shape
  g = _normal(2, out, dtype)
  assert conv.flat_taps(shape[2] + sum(padding[1]), out[2]) == flat
  tol = 1e-4 if dtype == jnp.float32 else 0.1
  for ours, xla in (
    (conv._flipped_dx, conv._xla_dx),
    (conv._tap_dk, conv._xla_dk),
  ):
    got = ours(x, g, kernel, **args)
    assert got.dtype == dtype
    np.testing.assert_allclose(
      np.asarray(got, np.float32),
      np.asarray(xla(x, g, kernel, **args), np.float32),
      atol=tol,
      rtol=tol,
    )


def _grouped_conv(x, kernel):
  """Reference: XLA's native depthwise convolution, 'same' padding."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((3, 3), (3, 3)),
    dimension_numbers=DN,
    feature_group_count=x.shape[-1],
  )


def test_depthwise_conv_matches_grouped_conv():
  x, kernel = _normal(30, (2, 9, 10, 6)), _normal(31, (7, 7, 1, 6))
  cotangent = _normal(32, (2, 9, 10, 6))
  want = _grouped_conv(x, kernel)
  np.testing.assert_allclose(conv.depthwise_conv(x, kernel), want, atol=1e-5)
  got = jax.jit(jax.grad(_loss(conv.depthwise_conv, cotangent), (0, 1)))(
    x, kernel
  )
  ref = jax.grad(_loss(_grouped_conv, cotangent), (0, 1))(x, kernel)
  chex.assert_trees_all_close(got, ref, atol=1e-4, rtol=1e-4)
  # The branches the CPU does not take (GPU/TPU) agree too.
  np.testing.assert_allclose(conv._grouped(x, kernel), want, atol=1e-5)
  xp = conv._same_pad(x, kernel)
  np.testing.assert_allclose(
    conv._grouped_dk(xp, cotangent, kernel),
    conv._tap_depthwise_dk(xp, cotangent, kernel),
    atol=1e-4,
    rtol=1e-4,
  )


def test_depthwise_conv_is_cheap_and_convolution_free_on_cpu():
  big = jax.ShapeDtypeStruct((1, 16, 16, 256), jnp.float32)
  kern = jax.ShapeDtypeStruct((7, 7, 1, 256), jnp.float32)

  def grads(x, k):
    return jax.grad(lambda x, k: jnp.sum(conv.depthwise_conv(x, k)), (0, 1))(
      x, k
    )

  compiled = jax.jit(grads).lower(big, kern).compile()
  assert " convolution(" not in compiled.as_text()
  analysis = compiled.cost_analysis()
  flops = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
  # Forward + two gradients, each 2 * 49 FLOPs per output element (XLA's
  # grouped kernel gradient costs C = 256 times more).
  assert flops < 10 * 2 * 49 * 16 * 16 * 256


def test_depthwise_bf16_accumulates_in_float32():
  x, kernel = _normal(0, (1, 8, 8, 4)), _normal(1, (7, 7, 1, 4))
  got = conv.depthwise_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
    np.asarray(got, np.float32), _grouped_conv(x, kernel), atol=0.15, rtol=0.05
  )


def test_unrolled_loops_let_cost_analysis_count_every_tap():
  """XLA counts a loop body once; traced under unrolled_loops, the CPU
  kernel gradients cost what XLA's own convolution gradients cost."""
  x, kernel = _normal(0, (2, 16, 16, 8)), _normal(1, (3, 3, 8, 8))
  args = dict(
    window_strides=(1, 1),
    padding=((1, 1), (1, 1)),
    dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, kernel.shape, DN),
  )

  def flops(conv_fn):
    loss = lambda x, k: jnp.sum(conv_fn(x, k, **args) ** 2)  # noqa: E731
    lowered = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel)
    return lowered.cost_analysis()["flops"]

  xla = flops(jax.lax.conv_general_dilated)
  looped = flops(conv.conv_general_dilated)
  with stacking.unrolled_loops():
    unrolled = flops(conv.conv_general_dilated)
  assert looped < 0.8 * xla
  assert unrolled == pytest.approx(xla, rel=0.05)
