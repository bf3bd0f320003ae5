"""Type aliases shared by the package (defined once)."""

from typing import Any

import jax

Array = jax.Array
Dtype = Any  # A jnp dtype, a dtype name ("bfloat16") or None.
PyTree = Any
