"""Convolutions that run fast on every backend, with nn.Conv's parameters.

XLA's GPU/TPU convolutions are fast in both directions. Its CPU backend
(YNNPACK) runs forward convolutions near its matmul speed but lowers three
things badly (measured in the paper's train step on 2 cores, bench/):
- 1x1 convolutions: about half as fast as the same matmul;
- kernel gradients of dense convolutions, lowered as a convolution over the
  batch: 10-45 GFLOP/s against ~100 GFLOP/s for the forward pass;
- depthwise (grouped) convolutions: ~1 GFLOP/s forward and backward.

So, with the same parameters and results:
- `conv_general_dilated` (the hook `Conv` gives `nn.Conv`) runs channels-last
  1x1 convolutions as matmuls on every backend, and computes the kernel
  gradient of stride-1 convolutions on the CPU as one matmul per kernel tap;
- `depthwise_conv` runs as a sum of shifted products on the CPU and as a
  grouped convolution elsewhere, with a kernel gradient that costs what the
  forward pass costs on every backend.

`jax.lax.platform_dependent` picks the CPU form when the program is lowered
for a CPU, so one model definition serves every device.

The CPU kernel gradients loop over the taps. XLA's cost analysis counts a
loop body once, so FLOP counts are taken from a program traced under
`stacking.unrolled_loops()` (see `summary.train_step_flops`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmceln_jax.models import stacking

Array = jax.Array
Padding = tuple[tuple[int, int], ...]


def _channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """Whether lax dimension numbers are NH..C / H..IO / NH..C (flax's)."""
  lhs = (0, ndim - 1, *range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
  return isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers) and (
    dimension_numbers == jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)
  )


def _tap_loop(
  xp: Array,
  g: Array,
  kernel_shape: Sequence[int],
  dilation: Sequence[int],
  reduce: Callable[[Array, Array], Array],
) -> Array:
  """[kh * kw, *kernel_shape[2:]] float32: reduce(window, g) for every tap's
  window of the padded input, one tap per loop step (one window alive at a
  time: faster on the CPU, and ~4x less memory, than all taps side by
  side)."""
  (kh, kw), (dh, dw) = kernel_shape[:2], dilation
  size = (*g.shape[:-1], xp.shape[-1])

  def tap(t, out):
    window = jax.lax.dynamic_slice(xp, (0, t // kw * dh, t % kw * dw, 0), size)
    return out.at[t].set(reduce(window, g))

  out = jnp.zeros((kh * kw, *kernel_shape[2:]), jnp.float32)
  return jax.lax.fori_loop(0, kh * kw, tap, out, unroll=stacking.unroll())


# ----------------------------------------------------------------- dense ---


def _xla_conv(x, kernel, *, padding, dilation, dimension_numbers, precision):
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1,) * (x.ndim - 2),
    padding,
    rhs_dilation=dilation,
    dimension_numbers=dimension_numbers,
    precision=precision,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dense_conv(x, kernel, padding, dilation, dimension_numbers, precision):
  """A stride-1 channels-last 2-D convolution, explicit non-negative padding."""
  return _xla_conv(
    x,
    kernel,
    padding=padding,
    dilation=dilation,
    dimension_numbers=dimension_numbers,
    precision=precision,
  )


def _dense_fwd(x, kernel, padding, dilation, dimension_numbers, precision):
  out = _dense_conv(x, kernel, padding, dilation, dimension_numbers, precision)
  return out, (x, kernel)


def _xla_dk(x, g, kernel, **conv_args):
  """Kernel gradient of `_xla_conv` as XLA derives it."""
  return jax.vjp(lambda k: _xla_conv(x, k, **conv_args), kernel)[1](g)[0]


def _tap_dk(x, g, kernel, *, padding, dilation, **unused):
  """Kernel gradient as one matmul per tap, float32 accumulation:
  dk[i, j] = sum_{b,h,w} x_pad[b, h + i*dh, w + j*dw]^T g[b, h, w]."""
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  dk = _tap_loop(
    xp,
    g,
    kernel.shape,
    dilation,
    functools.partial(
      jnp.einsum, "bhwi,bhwo->io", preferred_element_type=jnp.float32
    ),
  )
  return dk.reshape(kernel.shape).astype(kernel.dtype)


def _dense_bwd(padding, dilation, dimension_numbers, precision, res, g):
  x, kernel = res
  conv_args = dict(
    padding=padding,
    dilation=dilation,
    dimension_numbers=dimension_numbers,
    precision=precision,
  )
  (dx,) = jax.vjp(lambda x_: _xla_conv(x_, kernel, **conv_args), x)[1](g)
  dk = jax.lax.platform_dependent(
    x,
    g,
    kernel,
    cpu=functools.partial(_tap_dk, **conv_args),
    default=functools.partial(_xla_dk, **conv_args),
  )
  return dx, dk


_dense_conv.defvjp(_dense_fwd, _dense_bwd)


def conv_general_dilated(
  lhs: Array,
  rhs: Array,
  window_strides: Sequence[int],
  padding: str | Sequence[tuple[int, int]],
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers: Any = None,
  feature_group_count: int = 1,
  precision: Any = None,
) -> Array:
  """`lax.conv_general_dilated` for `nn.Conv`, faster where XLA is slow.

  Channels-last, ungrouped, stride-1 convolutions without input dilation
  take the fast paths (see the module doc): 1x1 ones without padding become
  matmuls, 2-D ones with explicit non-negative padding get the per-tap
  kernel gradient on the CPU. Everything else is passed through unchanged.
  """
  fast = (
    _channels_last(dimension_numbers, lhs.ndim)
    and all(s == 1 for s in window_strides)
    and all(d == 1 for d in lhs_dilation or ())
    and feature_group_count == 1
  )
  if fast and isinstance(padding, str):
    dilation = rhs_dilation or (1,) * (rhs.ndim - 2)
    dilated = [
      (k - 1) * d + 1 for k, d in zip(rhs.shape[:-2], dilation, strict=True)
    ]
    padding = jax.lax.padtype_to_pads(
      lhs.shape[1:-1], dilated, window_strides, padding
    )
  if fast:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if all(k == 1 for k in rhs.shape[:-2]) and not any(sum(padding, ())):
      kernel = rhs.reshape(rhs.shape[-2:])
      return jnp.einsum("...i,io->...o", lhs, kernel, precision=precision)
    if lhs.ndim == 4 and min(sum(padding, ())) >= 0:
      dilation = tuple(rhs_dilation or (1, 1))
      return _dense_conv(
        lhs, rhs, padding, dilation, dimension_numbers, precision
      )
  return jax.lax.conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
  )


# nn.Conv with the fast paths: same parameters, names and results.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


# ------------------------------------------------------------- depthwise ---


def _grouped(x: Array, kernel: Array) -> Array:
  """'Same'-padded depthwise conv as XLA's grouped convolution."""
  kh, kw = kernel.shape[:2]
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(1, 1),
    padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


def _same_pad(x: Array, kernel: Array) -> Array:
  kh, kw = kernel.shape[:2]
  return jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))


def _shifted_sum(x: Array, kernel: Array) -> Array:
  """'Same'-padded depthwise conv as a sum of shifted products (one fused
  elementwise loop; float32 accumulation)."""
  (kh, kw), (h, w) = kernel.shape[:2], x.shape[1:3]
  xp, k = _same_pad(x, kernel).astype(jnp.float32), kernel.astype(jnp.float32)
  out = sum(
    xp[:, i : i + h, j : j + w, :] * k[i, j, 0]
    for i in range(kh)
    for j in range(kw)
  )
  return out.astype(x.dtype)


def _depthwise(x: Array, kernel: Array) -> Array:
  return jax.lax.platform_dependent(
    x, kernel, cpu=_shifted_sum, default=_grouped
  )


@jax.custom_vjp
def depthwise_conv(x: Array, kernel: Array) -> Array:
  """'Same'-padded depthwise convolution whose kernel gradient costs what it
  should.

  XLA differentiates a grouped convolution's kernel through a
  `batch_group_count` convolution that CPU (and, per jax-ml/jax#13800, GPU)
  backends lower like a dense one: C times the FLOPs. Here the kernel
  gradient is, on the CPU, one product-and-reduce per tap, elsewhere a
  feature-grouped convolution of the padded input with the output gradient
  as filter (batch moved into the channels, float32 accumulation). The
  input gradient is the same convolution of the output gradient with the
  flipped kernel.

  Args:
    x: [B, H, W, C].
    kernel: [kh, kw, 1, C], odd sides ('same' padding).

  Returns:
    [B, H, W, C].
  """
  return _depthwise(x, kernel)


def _depthwise_fwd(x: Array, kernel: Array) -> tuple[Array, tuple]:
  return _depthwise(x, kernel), (x, kernel)


def _tap_depthwise_dk(xp: Array, g: Array, kernel: Array) -> Array:
  """dk[i, j, c] = sum_{b,h,w} xp[b, h+i, w+j, c] g[b, h, w, c] (3x faster on
  the CPU looped than as 49 reductions side by side)."""

  def reduce(window: Array, g: Array) -> Array:
    f32 = jnp.float32
    return jnp.sum(window.astype(f32) * g.astype(f32), axis=(0, 1, 2))

  return _tap_loop(xp, g, kernel.shape, (1, 1), reduce).reshape(kernel.shape)


def _grouped_dk(xp: Array, g: Array, kernel: Array) -> Array:
  # dk[i, j, c] = sum_{b,h,w} xp[b, h+i, w+j, c] * g[b, h, w, c]: a 'valid'
  # convolution with C feature groups of B channels each (xp's features
  # ordered (c, b)) and g as the [H, W, B, C] filter.
  b, hp, wp, c = xp.shape
  dk = jax.lax.conv_general_dilated(
    xp.transpose(1, 2, 3, 0).reshape(1, hp, wp, c * b),
    g.transpose(1, 2, 0, 3),
    window_strides=(1, 1),
    padding="VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
    preferred_element_type=jnp.float32,
  )
  return dk.reshape(kernel.shape)


def _depthwise_bwd(residuals: tuple, g: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  dx = _depthwise(g, kernel[::-1, ::-1])
  dk = jax.lax.platform_dependent(
    _same_pad(x, kernel),
    g,
    kernel,
    cpu=_tap_depthwise_dk,
    default=_grouped_dk,
  )
  return dx, dk.astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


class DepthwiseConv(nn.Module):
  """'Same'-padded depthwise convolution with bias (see `depthwise_conv`).

  Parameters match `nn.Conv(C, k, feature_group_count=C)`: kernel
  [k, k, 1, C] (LeCun normal) and bias [C].

  Attributes:
    kernel_size: odd square kernel side.
    dtype: compute dtype.
  """

  kernel_size: int = 7
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    dtype = self.dtype or x.dtype
    y = depthwise_conv(x.astype(dtype), kernel.astype(dtype))
    return y + bias.astype(dtype)
