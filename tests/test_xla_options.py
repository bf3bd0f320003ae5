"""Compile options: which programs get which, and what they change."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax_test_utils import ynnpack_ops

from jmceln_jax.ops import xla_options


def _conv_and_dot(x, kernel, a, b):
  """A 3x3 convolution [1, 32, 32, 64] and a [256, 256] matmul."""
  y = jax.lax.conv_general_dilated(
    x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return y, a @ b


@pytest.fixture(autouse=True)
def _fresh_cache():
  xla_options._cpu_takes_options.cache_clear()
  yield
  xla_options._cpu_takes_options.cache_clear()


def test_options_by_dtype():
  assert jax.default_backend() == "cpu"
  assert xla_options.for_dtype() == xla_options.CPU_FLOAT32
  assert xla_options.for_dtype("float32") == xla_options.CPU_FLOAT32
  assert xla_options.for_dtype(jnp.bfloat16) == {}
  assert xla_options.for_dtype("bfloat16") == {}


def test_float32_moves_only_convolutions_out_of_ynnpack():
  lowered = jax.jit(_conv_and_dot).lower(
    jnp.ones((1, 32, 32, 64)),
    jnp.ones((3, 3, 64, 64)),
    jnp.ones((256, 256)),
    jnp.ones((256, 256)),
  )
  default = ynnpack_ops(lowered.compile().as_text())
  float32 = ynnpack_ops(
    lowered.compile(compiler_options=xla_options.for_dtype()).as_text()
  )
  assert {"convolution", "dot"} <= default
  assert "dot" in float32
  assert "convolution" not in float32


def test_users_xla_flags_win(monkeypatch):
  monkeypatch.setenv(
    "XLA_FLAGS", f"--{xla_options.YNN_FUSIONS}=LIBRARY_FUSION_TYPE_DOT"
  )
  assert xla_options.for_dtype() == {}
