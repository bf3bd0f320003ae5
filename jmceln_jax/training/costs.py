"""The model's size and cost without running it: parameters per module from
`jax.eval_shape`, FLOPs and memory from XLA's cost analysis of the forward
pass and of the compiled training step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from jmceln_jax.models import jmceln
from jmceln_jax.ops import stacking
from jmceln_jax.training import model_state, sharding, steps
from jmceln_jax.typing import PyTree

MODULE_ORDER = ("clip/visual", "clip/text", "neck", "lsran", "cascade", "head")
GIB = 2.0**30


def abstract_batch(
  batch: int,
  config: ml_collections.ConfigDict,
  batch_sharding: jax.sharding.Sharding | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
  """A training batch as the input pipeline delivers it, by shape only.

  Args:
    batch: B, the (global) batch size.
    config: the run's config (input.image_size S, input.max_len L).
    batch_sharding: optional sharding of every field.

  Returns:
    "image" [B, S, S, 3] uint8, "tokens" [B, L] int32, "target" [B, S, S]
    uint8 as ShapeDtypeStructs.
  """
  size, length = config.input.image_size, config.input.max_len
  shapes = {
    "image": ((batch, size, size, 3), jnp.uint8),
    "tokens": ((batch, length), jnp.int32),
    "target": ((batch, size, size), jnp.uint8),
  }
  return {
    k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    for k, (shape, dtype) in shapes.items()
  }


def abstract_model_variables(
  model: nn.Module, config: ml_collections.ConfigDict
) -> PyTree:
  """The model's variables as ShapeDtypeStructs (nothing is computed)."""
  dummy = steps.dummy_inputs(1, config.input.image_size, config.input.max_len)
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(init, jax.random.key(0), *dummy)


def param_counts(params: PyTree, depth: int = 1) -> dict[str, int]:
  """Parameter counts grouped by path prefix.

  Args:
    params: the "params" collection (arrays or ShapeDtypeStructs).
    depth: prefix length in modules; "clip" always adds one level, so
      depth 1 gives clip/visual, clip/text, neck, lsran, cascade, head, ...

  Returns:
    {prefix: count}, in data-flow order (encoders, neck, LSRAN, cascade,
    head, then anything else).
  """
  counts: dict[str, int] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    keep = depth + (names[0] == "clip")
    prefix = "/".join(names[: min(keep, len(names) - 1) or 1])
    counts[prefix] = counts.get(prefix, 0) + int(leaf.size)

  def order(prefix: str) -> tuple[int, str]:
    rank = [i for i, m in enumerate(MODULE_ORDER) if prefix.startswith(m)]
    return (rank[0] if rank else len(MODULE_ORDER), prefix)

  return {k: counts[k] for k in sorted(counts, key=order)}


def xla_cost(compiled: Any, key: str) -> float:
  """One entry of XLA's cost analysis (a dict, or a list of one dict)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  return float(analysis.get(key, 0.0))


def _compile(jitted: Any, *args: Any, what: str) -> tuple[Any, float]:
  """AOT-compiles a jitted function on abstract arguments (never runs it).

  Returns:
    (the compiled executable, compile seconds).
  """
  logging.info("Compiling the %s...", what)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  logging.info("Compiled the %s in %.1f s.", what, seconds)
  return compiled, seconds


def unrolled_flops(jitted: Any, *args: Any) -> float:
  """FLOPs from XLA's cost analysis of `jitted` lowered on `args` with every
  loop unrolled (nothing compiles). XLA counts a loop body once: the
  scanned block runs (ops/stacking.py) and the CPU convolution
  gradients' per-tap loops (ops/conv.py) are unrolled so that every
  iteration counts. `jitted` must be a fresh jit: a trace cached outside
  would keep its loops."""
  with stacking.unrolled_loops():
    lowered = jitted.lower(*args)
  return xla_cost(lowered, "flops")


def forward_gflops(
  model: nn.Module, config: ml_collections.ConfigDict
) -> float:
  """GFLOPs of one image's forward pass (eval mode), from XLA's cost
  analysis of the pass lowered with every loop unrolled (unrolled_flops)."""
  batch = abstract_batch(1, config)
  apply = jax.jit(
    lambda variables, images, tokens: model.apply(
      variables, steps.model_images(images), tokens, train=False
    )
  )
  variables = abstract_model_variables(model, config)
  return unrolled_flops(apply, variables, batch["image"], batch["tokens"]) / 1e9


def select_devices(count: int | None) -> list[jax.Device]:
  """The first `count` devices (all for None), with a clear error if short."""
  devices = jax.devices()
  if count is None:
    return devices
  if count < 1:
    raise ValueError(f"--devices={count}: give at least 1.")
  if count > len(devices):
    hint = (
      "(or set jax_num_cpu_devices before JAX starts, as the CLIs do)"
      if devices[0].platform == "cpu"
      else "(JAX_PLATFORMS=cpu simulates any number of CPU devices)"
    )
    raise ValueError(
      f"--devices={count}, but {len(devices)} {devices[0].platform} "
      f"device(s) are available: ask for at most that many {hint}."
    )
  return devices[:count]


def _step_batch(
  config: ml_collections.ConfigDict, setup: model_state.Setup
) -> dict[str, jax.ShapeDtypeStruct]:
  """The abstract global training batch, sharded over the setup's mesh."""
  return abstract_batch(
    config.input.global_batch_size,
    config,
    sharding.batch_sharding(setup.mesh),
  )


def compile_train_step(
  config: ml_collections.ConfigDict, devices: Sequence[jax.Device]
) -> tuple[model_state.Setup, Any, float]:
  """AOT-compiles the trainer's step (`model_state.jit_train_step`) for the
  global batch `input.global_batch_size` on a mesh of `devices`.

  Returns:
    (the trainer Setup, the compiled step (state, batch) -> (state, metrics)
    with the state donated, compile seconds).
  """
  global_batch = config.input.global_batch_size
  # Steps per epoch only set the schedule's length: irrelevant to the cost.
  setup = model_state.build_setup(config, global_batch, devices)
  sharding.per_process_batch_size(global_batch, setup.mesh)  # Checks it.
  compiled, seconds = _compile(
    model_state.jit_train_step(config, setup),
    setup.abstract_state,
    _step_batch(config, setup),
    what=f"training step (global batch {global_batch})",
  )
  return setup, compiled, seconds


def train_step_flops(
  config: ml_collections.ConfigDict, setup: model_state.Setup
) -> float:
  """FLOPs of one training step (whole global batch), from XLA's cost
  analysis of the step lowered with every loop unrolled (unrolled_flops)."""
  return unrolled_flops(
    model_state.jit_train_step(config, setup),  # A fresh jit.
    setup.abstract_state,
    _step_batch(config, setup),
  )


def train_step_cost(
  config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device],
  compiled: tuple[model_state.Setup, Any, float] | None = None,
) -> dict[str, float]:
  """Per-device memory and FLOPs of the compiled training step.

  Compiles exactly the step the trainer runs (`model_state.jit_train_step`) for
  the global batch `input.global_batch_size` on a mesh of `devices`
  (config.mesh with -1 resolved against them), state donated. Nothing runs.

  The memory figures are XLA's static buffer assignment for this backend
  (CPU on a laptop); a GPU compile assigns buffers differently.

  Args:
    config: the run's config.
    devices: the mesh's devices.
    compiled: `compile_train_step`'s (setup, compiled step, compile
      seconds) for this config and devices; compiled here when None.

  Returns:
    {name: value}: argument/output/temporary/aliased memory and a peak
    estimate (GiB per device), GFLOPs per step (whole global batch) and per
    image, and the compile time (s).
  """
  global_batch = config.input.global_batch_size
  if compiled is None:
    compiled = compile_train_step(config, devices)
  setup, compiled, seconds = compiled
  mem = compiled.memory_analysis()
  sizes = {
    "arguments (GiB)": mem.argument_size_in_bytes / GIB,
    "outputs (GiB)": mem.output_size_in_bytes / GIB,
    "temporaries (GiB)": mem.temp_size_in_bytes / GIB,
    "aliased (GiB)": mem.alias_size_in_bytes / GIB,
  }
  sizes["peak estimate (GiB)"] = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  ) / GIB
  per_step = train_step_flops(config, setup) / 1e9
  sizes["GFLOPs per step"] = per_step
  sizes["GFLOPs per image"] = per_step / global_batch
  sizes["compile time (s)"] = seconds
  return sizes


def two_column_table(title: str, rows: Mapping[str, Any], fmt: str) -> str:
  """A two-column text table."""
  width = max(len(k) for k in rows)
  lines = [title, "-" * len(title)]
  lines += [f"{k:<{width}}  {v:{fmt}}" for k, v in rows.items()]
  return "\n".join(lines)


def summarize(
  config: ml_collections.ConfigDict,
  *,
  devices: int | None = None,
  depth: int = 1,
  train_memory: bool = True,
) -> str:
  """The summary report for `config` as text.

  Args:
    config: the run's config.
    devices: devices sharing the global batch in the training-step estimate
      (None: all of `jax.devices()`).
    depth: module depth of the parameter table (see `param_counts`).
    train_memory: also compile the training step.
  """
  model = jmceln.build_model(config.model)
  variables = abstract_model_variables(model, config)
  counts = param_counts(variables["params"], depth)
  counts["total"] = sum(counts.values())
  size = config.input.image_size
  parts = [
    two_column_table(
      f"Parameters (M) at {size}x{size}",
      {k: v / 1e6 for k, v in counts.items()},
      "10.2f",
    ),
    two_column_table(
      "Forward pass, 1 image, eval",
      {"GFLOPs": forward_gflops(model, config)},
      "10.3f",
    ),
  ]
  if train_memory:
    mesh_devices = select_devices(devices)
    sizes = train_step_cost(config, mesh_devices)
    n = len(mesh_devices)
    gb = config.input.global_batch_size
    title = (
      f"Training step per device: global batch {gb} over {n} "
      f"{mesh_devices[0].platform} device(s) ({gb // n} each), "
      f"mesh {dict(config.mesh)}, accum {config.optim.grad_accum_steps}, "
      f"dtype {config.model.dtype}, remat {config.model.remat}"
    )
    parts.append(two_column_table(title, sizes, "10.2f"))
  return "\n\n".join(parts)
