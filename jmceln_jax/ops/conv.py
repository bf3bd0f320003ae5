"""Convolutions that run fast on every backend, with nn.Conv's parameters.

XLA's GPU/TPU convolutions are fast in both directions. Its CPU backend
runs forward convolutions near its matmul speed but lowers four things badly
(measured in the paper's train step on 2 cores, bench/):
- 1x1 convolutions: about half as fast as the same matmul;
- input gradients: XLA hands its CPU convolution the kernel with input and
  output features swapped in place (HWOI), 4-5x slower than HWIO;
- kernel gradients of dense convolutions, lowered as a convolution over the
  batch: 10-45 GFLOP/s against ~100 GFLOP/s for the forward pass;
- depthwise (grouped) convolutions: ~1 GFLOP/s forward and backward.

So, with the same parameters and results:
- `conv_general_dilated` (the hook `Conv` gives `nn.Conv`) runs channels-last
  1x1 convolutions as matmuls on every backend, and computes the gradients
  of stride-1 convolutions on the CPU in its own forms: the input gradient
  as a convolution with an explicitly flipped kernel, the kernel gradient as
  one matmul per kernel tap;
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

from jmceln_jax.ops import stacking
from jmceln_jax.typing import Array

Padding = tuple[tuple[int, int], ...]


def _channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """Whether lax dimension numbers are NH..C / H..IO / NH..C (flax's)."""
  lhs = (0, ndim - 1, *range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2, *range(ndim - 2))
  return isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers) and (
    dimension_numbers == jax.lax.ConvDimensionNumbers(lhs, rhs, lhs)
  )


def _tap_loop(
  taps: int, shape: Sequence[int], body: Callable[[Array], Array]
) -> Array:
  """[taps, *shape] float32: body(t) for every kernel tap t, one tap per loop
  step (one tap's operands alive at a time: faster on the CPU, and ~4x less
  memory, than all taps side by side)."""
  out = jnp.zeros((taps, *shape), jnp.float32)
  return jax.lax.fori_loop(
    0,
    taps,
    lambda t, out: out.at[t].set(body(t)),
    out,
    unroll=stacking.unroll(),
  )


def _window(
  xp: Array, t: Array, size: Sequence[int], kw: int, dilation: Sequence[int]
) -> Array:
  """[*size]: tap t's window of the padded input xp [B, Hp, Wp, C]."""
  dh, dw = dilation
  return jax.lax.dynamic_slice(xp, (0, t // kw * dh, t % kw * dw, 0), size)


def flat_taps(padded_width: int, out_width: int) -> bool:
  """Whether the CPU kernel gradient takes flat runs rather than windows.

  A flat run covers the padded width, so it does (padded - out) / out more
  work than a window, all of it on zeros. Runs are taken while that waste
  is at most 1/16, i.e. for the large, lightly padded maps where they pay
  (1.4-2.2x faster alone at 104-416 pixels wide with 1-pixel padding,
  1.05-1.2x at 52).
  """
  return 16 * (padded_width - out_width) <= out_width


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
  dk[i, j] = sum_{b,h,w} x_pad[b, h + i*dh, w + j*dw]^T g[b, h, w].

  Where `flat_taps` allows, each tap reads one contiguous run instead of a
  strided window: with g zero-padded to the padded width Wp and both
  flattened over (h, w), tap (i, j) is rows [i*dh*Wp + j*dw, + Ho*Wp) of
  the flat input (columns past the window meet g's zeros), a plain
  [Co, B*Ho*Wp] @ [B*Ho*Wp, Ci] matmul with g transposed once. The windowed
  form makes XLA copy and transpose every window first.
  """
  (kh, kw), (dh, dw) = kernel.shape[:2], dilation
  (b, _, w, ci), (ho, wo, co) = x.shape, g.shape[1:]
  wp = w + sum(padding[1])
  f32 = jnp.float32
  if flat_taps(wp, wo):
    rows = ho * wp
    # One spare padded row: the last tap's run ends (kw - 1) * dw past the
    # padded input.
    (top, bottom), sides = padding
    flat = jnp.pad(x, ((0, 0), (top, bottom + 1), sides, (0, 0)))
    flat = flat.reshape(b, -1, ci)
    g_t = jnp.pad(g, ((0, 0), (0, 0), (0, wp - wo), (0, 0)))
    g_t = g_t.reshape(b, rows, co).transpose(2, 0, 1)  # [Co, B, Ho*Wp]

    def body(t):
      start = t // kw * dh * wp + t % kw * dw
      run = jax.lax.dynamic_slice_in_dim(flat, start, rows, axis=1)
      return jnp.einsum("obq,bqi->oi", g_t, run, preferred_element_type=f32)

    # [Co, Ci] per tap: transposed in the loop, the product would become a
    # dot XLA's CPU runtime cannot run in bfloat16.
    dk = _tap_loop(kh * kw, (co, ci), body).transpose(0, 2, 1)
  else:
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    size = (*g.shape[:-1], ci)

    def body(t):
      window = _window(xp, t, size, kw, dilation)
      return jnp.einsum("bhwi,bhwo->io", window, g, preferred_element_type=f32)

    dk = _tap_loop(kh * kw, (ci, co), body)
  return dk.reshape(kernel.shape).astype(kernel.dtype)


def _xla_dx(x, g, kernel, **conv_args):
  """Input gradient of `_xla_conv` as XLA derives it."""
  return jax.vjp(lambda x_: _xla_conv(x_, kernel, **conv_args), x)[1](g)[0]


def _flipped_dx(x, g, kernel, *, padding, dilation, **conv_args):
  """Input gradient as a forward convolution of g with the flipped kernel,
  its input and output features swapped (HWIO again).

  XLA's own derivation hands its CPU convolution the kernel as HWOI, which
  runs 4-5x slower than the same convolution with an HWIO kernel (3x3, 64-256
  channels, 26-104 pixels, 2 cores); here the swap is done on the kernel.
  """
  if 0 in g.shape:  # a kernel wider than the padded input: no output
    return jnp.zeros_like(x)
  pads = tuple(
    ((k - 1) * d - lo, (k - 1) * d - hi)
    for k, d, (lo, hi) in zip(kernel.shape[:2], dilation, padding, strict=True)
  )
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  return _xla_conv(g, flipped, padding=pads, dilation=dilation, **conv_args)


def _dense_bwd(padding, dilation, dimension_numbers, precision, res, g):
  x, kernel = res
  conv_args = dict(
    padding=padding,
    dilation=dilation,
    dimension_numbers=dimension_numbers,
    precision=precision,
  )

  def per_platform(cpu, default):
    return jax.lax.platform_dependent(
      x,
      g,
      kernel,
      cpu=functools.partial(cpu, **conv_args),
      default=functools.partial(default, **conv_args),
    )

  return per_platform(_flipped_dx, _xla_dx), per_platform(_tap_dk, _xla_dk)


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
  matmuls, 2-D ones with explicit non-negative padding get the CPU's own
  gradients (flipped-kernel input gradient, per-tap kernel gradient).
  Everything else is passed through unchanged.
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
  (kh, kw), size = kernel.shape[:2], (*g.shape[:-1], xp.shape[-1])

  def body(t):
    window = _window(xp, t, size, kw, (1, 1)).astype(jnp.float32)
    return jnp.sum(window * g.astype(jnp.float32), axis=(0, 1, 2))

  return _tap_loop(kh * kw, kernel.shape[3:], body).reshape(kernel.shape)


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
