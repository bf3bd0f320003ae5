"""AdamW with polynomial decay, regex learning-rate multipliers, kernel-only
weight decay and optional gradient clipping.

Parameters are addressed by their '/'-joined path in the params tree, e.g.
`clip/visual/layer3/0/conv2/kernel` (with model.scan_layers, blocks 1.. of
a stage share one stacked `clip/visual/layer3/scanned/conv2/kernel`).
`config.optim.lr_mults` is a sequence of `(regex, multiplier)` pairs; the
first regex that fully matches a path decides its multiplier (default 1). A
multiplier of 0 freezes the parameter: it gets no optimiser state and is
never updated.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

from jmceln_jax.typing import PyTree


def param_paths(params: PyTree) -> PyTree:
  """A tree like `params` whose leaves are their '/'-joined paths."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({k: k for k in flat}, sep="/")


def path_multipliers(
  params: PyTree, lr_mults: Sequence[tuple[str, float]]
) -> PyTree:
  """Learning-rate multiplier of every parameter (first full regex match)."""
  rules = [(re.compile(pattern), float(mult)) for pattern, mult in lr_mults]

  def mult(path: str) -> float:
    for pattern, value in rules:
      if pattern.fullmatch(path):
        return value
    return 1.0

  return jax.tree.map(mult, param_paths(params))


def learning_rate_schedule(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.Schedule:
  """Linear warm-up, then `lr * (1 - t/T)^power` decay to `end_lr`, per step.

  This is the LAVT/paper schedule ("polynomial learning rate decay with power
  0.9", stepped every iteration).
  """
  warmup = int(cfg.warmup_steps)
  decay = optax.polynomial_schedule(
    init_value=cfg.lr,
    end_value=cfg.end_lr,
    power=cfg.poly_power,
    transition_steps=max(total_steps - warmup, 1),
  )
  if warmup <= 0:
    return decay
  ramp = optax.linear_schedule(0.0, cfg.lr, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def _scale_by_tree(scales: PyTree) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter scalar."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def make_optimizer(
  cfg: ml_collections.ConfigDict, params: PyTree, total_steps: int
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """Builds the optimiser and its base learning-rate schedule.

  Args:
    cfg: `config.optim` (see config_lib).
    params: the params tree (arrays or ShapeDtypeStructs; only paths are used).
    total_steps: number of optimiser steps of the whole run.

  Returns:
    (tx, schedule): the optax transformation and step -> base learning rate.
  """
  schedule = learning_rate_schedule(cfg, total_steps)
  mults = path_multipliers(params, cfg.lr_mults)
  steps = []
  if cfg.grad_clip_norm:
    steps.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  steps += [
    optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    optax.add_decayed_weights(cfg.weight_decay, mask=_kernel_mask),
    optax.scale_by_learning_rate(schedule),
  ]
  tx = optax.chain(*steps)
  labels = jax.tree.map(lambda m: "frozen" if m == 0 else "train", mults)
  if "frozen" in jax.tree.leaves(labels):
    tx = optax.multi_transform(
      {"train": tx, "frozen": optax.set_to_zero()}, labels
    )
  if any(m not in (0.0, 1.0) for m in jax.tree.leaves(mults)):
    tx = optax.chain(tx, _scale_by_tree(jax.tree.map(jnp.float32, mults)))
  return tx, schedule


def _kernel_mask(params: PyTree) -> PyTree:
  """Weight decay applies to conv/dense kernels only (not norms, biases,
  embeddings or positional embeddings)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: getattr(path[-1], "key", None) == "kernel", params
  )
