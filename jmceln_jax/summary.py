"""Model summary: parameters per module, forward GFLOPs, training-step memory.

  python -m jmceln_jax.summary --config configs/refcoco.py [--devices=2]

Nothing is executed: parameters come from `jax.eval_shape`, FLOPs from XLA's
cost analysis of the compiled forward pass (batch 1, eval mode), memory from
the compiled training step (loss, gradients, AdamW update) for one device's
share of `input.global_batch_size`. So the full paper model can be
summarised on a laptop CPU (compiling it takes a few minutes there).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from jmceln_jax import losses
from jmceln_jax.models import jmceln

PyTree = Any
MODULE_ORDER = ("clip/visual", "clip/text", "neck", "lsran", "cascade", "head")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/refcoco.py[:variant].",
  lock_config=True,
)
flags.DEFINE_integer(
  "devices",
  None,
  "Devices sharing input.global_batch_size in the memory estimate "
  "(default: all local devices; the paper used 2).",
)
flags.DEFINE_integer(
  "depth",
  1,
  "Module nesting depth of the parameter table (clip counts as "
  "one level deeper: clip/visual, clip/text).",
)
flags.DEFINE_bool(
  "train_memory", True, "Also compile the training step for its memory."
)


def abstract_inputs(batch: int, config: ml_collections.ConfigDict) -> dict:
  """ShapeDtypeStructs of one batch: image, tokens, target."""
  size, length = config.input.image_size, config.input.max_len
  return {
    "image": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
    "tokens": jax.ShapeDtypeStruct((batch, length), jnp.int32),
    "target": jax.ShapeDtypeStruct((batch, size, size), jnp.int32),
  }


def abstract_variables(model: nn.Module, inputs: Mapping[str, Any]) -> PyTree:
  """The model's variables as ShapeDtypeStructs (nothing is computed)."""
  init = functools.partial(model.init, train=False)
  return jax.eval_shape(
    init, jax.random.key(0), inputs["image"], inputs["tokens"]
  )


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


def _train_step(
  params: PyTree,
  batch_stats: PyTree,
  opt_state: PyTree,
  batch: Mapping[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  loss_config: ml_collections.ConfigDict,
) -> tuple[PyTree, PyTree, PyTree, jax.Array]:
  """A minimal training step: loss, gradients, one AdamW update."""

  def loss_fn(p: PyTree) -> tuple[jax.Array, PyTree]:
    (logits, aux), updates = model.apply(
      {"params": p, "batch_stats": batch_stats},
      batch["image"],
      batch["tokens"],
      train=True,
      mutable=["batch_stats"],
    )
    loss, _ = losses.segmentation_loss(
      logits,
      batch["target"],
      class_weights=loss_config.class_weights,
      stage_logits=[s["logits"] for s in aux["stages"] if "logits" in s],
      stage_weight=loss_config.stage_weight,
    )
    return loss, updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), batch_stats, opt_state, loss


def _cost(compiled: Any, key: str) -> float:
  """One entry of XLA's cost analysis (a dict, or a list of one dict)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):
    analysis = analysis[0]
  return float(analysis.get(key, 0.0))


def _compile(fn: Any, *args: Any, what: str, **jit_kwargs: Any) -> Any:
  """AOT-compiles `fn` on abstract arguments, logging the time taken."""
  logging.info("Compiling the %s...", what)
  start = time.perf_counter()
  compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
  logging.info("Compiled the %s in %.1f s.", what, time.perf_counter() - start)
  return compiled


def forward_gflops(
  model: nn.Module, config: ml_collections.ConfigDict
) -> float:
  """GFLOPs of one image's forward pass (eval mode), from XLA."""
  inputs = abstract_inputs(1, config)
  variables = abstract_variables(model, inputs)
  apply = functools.partial(model.apply, train=False)
  compiled = _compile(
    apply, variables, inputs["image"], inputs["tokens"], what="forward pass"
  )
  return _cost(compiled, "flops") / 1e9


def train_step_memory(
  model: nn.Module, config: ml_collections.ConfigDict, batch: int
) -> dict[str, float]:
  """Memory (GiB) and GFLOPs of the compiled training step at `batch`.

  The memory figures are XLA's static buffer assignment for this backend
  (CPU when run on a laptop); a GPU compile assigns buffers differently.

  Parameters and optimiser state are donated, as in a real training loop.
  """
  inputs = abstract_inputs(batch, config)
  variables = abstract_variables(model, inputs)
  optim = config.optim
  tx = optax.adamw(
    optim.lr, optim.b1, optim.b2, optim.eps, weight_decay=optim.weight_decay
  )
  opt_state = jax.eval_shape(tx.init, variables["params"])
  step = functools.partial(
    _train_step, model=model, tx=tx, loss_config=config.loss
  )
  compiled = _compile(
    step,
    variables["params"],
    variables.get("batch_stats", {}),
    opt_state,
    inputs,
    what=f"training step (batch {batch})",
    donate_argnums=(0, 1, 2),
  )
  mem = compiled.memory_analysis()
  gib = 2.0**30
  sizes = {
    "arguments (GiB)": mem.argument_size_in_bytes / gib,
    "outputs (GiB)": mem.output_size_in_bytes / gib,
    "temporaries (GiB)": mem.temp_size_in_bytes / gib,
    "aliased (GiB)": mem.alias_size_in_bytes / gib,
  }
  sizes["peak estimate (GiB)"] = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  ) / gib
  sizes["GFLOPs per step"] = _cost(compiled, "flops") / 1e9
  sizes["GFLOPs per image"] = sizes["GFLOPs per step"] / batch
  return sizes


def format_table(title: str, rows: Mapping[str, Any], fmt: str) -> str:
  """A two-column text table."""
  width = max(len(k) for k in rows)
  lines = [title, "-" * len(title)]
  lines += [f"{k:<{width}}  {v:{fmt}}" for k, v in rows.items()]
  return "\n".join(lines)


def summarize(
  config: ml_collections.ConfigDict,
  *,
  devices: int,
  depth: int = 1,
  train_memory: bool = True,
) -> str:
  """The summary report for `config` as text."""
  model = jmceln.build_model(config.model)
  variables = abstract_variables(model, abstract_inputs(1, config))
  counts = param_counts(variables["params"], depth)
  counts["total"] = sum(counts.values())
  size = config.input.image_size
  parts = [
    format_table(
      f"Parameters (M) at {size}x{size}",
      {k: v / 1e6 for k, v in counts.items()},
      "10.2f",
    ),
    format_table(
      "Forward pass, 1 image, eval",
      {"GFLOPs": forward_gflops(model, config)},
      "10.3f",
    ),
  ]
  if train_memory:
    batch = max(config.input.global_batch_size // devices, 1)
    sizes = train_step_memory(model, config, batch)
    title = (
      f"Training step on one device: batch {batch} "
      f"(= {config.input.global_batch_size} / {devices} devices), "
      f"dtype {config.model.dtype}, remat {config.model.remat}"
    )
    parts.append(format_table(title, sizes, "10.2f"))
  return "\n\n".join(parts)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. configs/refcoco.py.")
  devices = FLAGS.devices or jax.local_device_count()
  print(
    summarize(
      FLAGS.config,
      devices=devices,
      depth=FLAGS.depth,
      train_memory=FLAGS.train_memory,
    )
  )


if __name__ == "__main__":
  app.run(main)
