"""resize.py equals torch.nn.functional.interpolate (antialias=False)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jmceln_jax.ops import resize

SIZES = [
  ((7, 7), (13, 13)),  # Upsampling, odd ratio.
  ((7, 7), (2, 2)),  # Downsampling.
  ((13, 13), (26, 26)),  # 2x.
  ((5, 9), (11, 4)),  # Non-square, up in H and down in W.
  ((6, 5), (1, 3)),  # Output side 1 (align_corners scale 0).
  ((1, 4), (3, 2)),  # Input side 1.
]
MODES = [
  ("bicubic", False),
  ("bicubic", True),
  ("bilinear", False),
  ("bilinear", True),
]


def _torch_resize(x, size, method, align_corners):
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(
    t, size=size, mode=method, align_corners=align_corners, antialias=False
  )
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("method,align_corners", MODES)
def test_matches_torch(method, align_corners):
  rng = np.random.default_rng(0)
  for in_size, out_size in SIZES:
    x = rng.normal(size=(2, *in_size, 3)).astype(np.float32)
    want = _torch_resize(x, out_size, method, align_corners)
    got = resize.resize(x, out_size, method, align_corners=align_corners)
    chex.assert_shape(got, want.shape)
    np.testing.assert_allclose(
      got, want, atol=1e-5, err_msg=f"{in_size}->{out_size}"
    )


def test_upsample2x_and_jit():
  x = np.random.default_rng(1).normal(size=(2, 5, 3, 4)).astype(np.float32)
  for align_corners in (False, True):
    want = _torch_resize(x, (10, 6), "bilinear", align_corners)
    fn = jax.jit(
      lambda v, a=align_corners: resize.upsample2x(v, align_corners=a)
    )
    np.testing.assert_allclose(fn(x), want, atol=1e-5)


def test_identity_dtype_and_rows():
  x = jnp.ones((3, 4, 2), jnp.bfloat16)  # HWC works too.
  assert resize.resize(x, (3, 4)) is x
  y = resize.resize(x, (5, 7), "bicubic")
  assert y.dtype == jnp.bfloat16 and y.shape == (5, 7, 2)
  np.testing.assert_allclose(np.asarray(y, np.float32), 1.0, atol=1e-2)
  m = resize.interp_matrix(9, 4, "bicubic")
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="method"):
    resize.interp_matrix(3, 4, "area")


def test_linear_weights_traced():
  src = jnp.array([[-0.2, 0.0, 1.25, 2.0]])
  w = jax.jit(lambda s: resize.linear_weights(jnp.clip(s, 0, 2), 3))(src)
  want = [[1, 0, 0], [1, 0, 0], [0, 0.75, 0.25], [0, 0, 1]]
  np.testing.assert_allclose(w[0], want, atol=1e-6)
