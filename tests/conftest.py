"""Shared test setup: 8 simulated CPU devices and parsed absl flags.

XLA_FLAGS must be set before jax is imported anywhere, so this file does it at
import time (pytest imports conftest.py before any test module).
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
# XLA CPU compiles the model graphs 2-3x faster without most optimisations;
# tests check values and shapes, not speed.
jax.config.update("jax_disable_most_optimizations", True)
