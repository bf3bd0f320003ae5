"""XLA compile options of the project's programs.

- `FAST_COMPILE`, for programs that run once (random initialisation): XLA's
  CPU compiler spends most of a default compile optimising the many random
  initialisers.
- `for_dtype(dtype)`, for every other program (training, evaluation and
  prediction steps, the benchmarks). On the CPU, in float32, it leaves
  convolutions to XLA's own CPU kernels (Eigen) instead of YNNPACK, and
  keeps YNNPACK for matmuls and reductions. Measured on 2 cores
  (docs/benchmarks.md): the stride-1 3x3 convolutions of CLIP's ResNet run
  up to 1.5x faster, its image encoder's forward pass in 0.90-0.97x the
  time, the paper config's training step in 0.96x and its prediction in
  0.95x. bfloat16 programs keep XLA's defaults: with Eigen's bfloat16
  convolutions the paper model's logits (random weights, scale 2) moved by
  up to 1.05, against 2e-4 in float32, for no clear gain in speed.

Options apply per compiled program: nothing global changes. A user's own
`--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS wins (`for_dtype` then
adds nothing), and a jaxlib that no longer knows the option gets XLA's
defaults.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}

YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
# XLA's CPU default (jaxlib 0.10) is REDUCE, INDIVIDUAL_DOT and
# INDIVIDUAL_CONVOLUTION; without the last, convolutions run in Eigen.
CPU_FLOAT32 = {
  YNN_FUSIONS: "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
}


def for_dtype(dtype: Any = None) -> dict[str, Any]:
  """Compile options for a program computing in `dtype`.

  Args:
    dtype: the compute dtype (None: float32).

  Returns:
    `CPU_FLOAT32` when the default backend is the CPU, `dtype` is float32,
    XLA_FLAGS does not set the YNNPACK fusion types and this jaxlib accepts
    them; else {} (XLA's defaults).
  """
  float32 = jnp.dtype(dtype or jnp.float32) == jnp.float32
  return dict(CPU_FLOAT32) if float32 and _cpu_takes_options() else {}


@functools.cache
def _cpu_takes_options() -> bool:
  """Whether CPU_FLOAT32 applies: the default backend is the CPU, XLA_FLAGS
  leaves the YNNPACK fusion types alone and this jaxlib accepts them."""
  if jax.default_backend() != "cpu":
    return False
  if YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
    return False
  try:
    jax.jit(jnp.negative).lower(jnp.float32(0)).compile(
      compiler_options=CPU_FLOAT32
    )
  except jax.errors.JaxRuntimeError as e:
    logging.info("XLA's default compile options: %s", e)
    return False
  return True
