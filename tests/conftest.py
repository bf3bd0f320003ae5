"""Shared test setup: 8 simulated CPU devices, fast compiles, a per-session
compilation cache and parsed absl flags.

XLA_FLAGS must be set before jax is imported anywhere, so this file does it at
import time (pytest imports conftest.py before any test module).
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8"
  # XLA CPU's newer fusion emitters double the compile time of the model
  # graphs (measured on the tiny JMCELN train step: 21 s -> 9 s).
  + " --xla_cpu_use_fusion_emitters=false"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import flags  # noqa: E402

# grain's worker processes read absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()
# XLA CPU compiles the model graphs 2-3x faster without most optimisations;
# tests check values and shapes, not speed.
jax.config.update("jax_disable_most_optimizations", True)
# Identical programs compiled again in this session (every train_and_evaluate
# call jits its steps anew) or in subprocesses of tests load from this cache.
_CACHE = tempfile.mkdtemp(prefix="jax_compilation_cache_")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
