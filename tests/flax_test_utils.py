"""Helpers for the model tests that need no torch."""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

from jmceln_jax import config_lib

# OpenAI's RN50: RN101's hyperparameters but for these two.
RN50 = dict(config_lib.CLIP_RN101, embed_dim=1024, vision_layers=(3, 4, 6, 3))
# A tiny CLIP (random weights) for fast tests.
TINY_CLIP = config_lib.CLIP_TINY


def random_variables(abstract: Any, seed: int, scale: float = 0.3) -> Any:
  """Random float32 numpy values for an abstract variables tree.

  Avoids compiling `init` (every random initialiser is slow to compile on
  CPU). BatchNorm variances ("var" leaves) are drawn from U(0.5, 1.5), all
  other leaves from N(0, scale^2).

  Args:
    abstract: tree of jax.ShapeDtypeStruct, e.g. from jax.eval_shape(init).
    seed: numpy seed.
    scale: standard deviation of the non-variance leaves.

  Returns:
    The same tree of numpy float32 arrays.
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return (scale * rng.normal(size=x.shape)).astype(np.float32)

  return jax.tree.map_with_path(fill, abstract)


def ynnpack_ops(compiled: str) -> set[str]:
  """Opcodes inside the YNNPACK fusions of a compiled program's text."""
  bodies = dict(
    re.findall(r"\n%?([\w.-]+) [^\n]*\{\n(.*?)\n\}", compiled, re.S)
  )
  called = re.findall(r"calls=%?([\w.-]+)[^\n]*__ynn_fusion", compiled)
  return {
    op
    for name in called
    for op in re.findall(r"= \S+ ([a-z-]+)\(", bodies.get(name, ""))
  }
