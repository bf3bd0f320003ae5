"""Pure, jittable training and evaluation steps and the train state.

The loop (jmceln_jax.training.loop) binds the static collaborators (model, optimiser,
loss settings) with functools.partial and jits these functions with explicit
shardings; nothing here touches the host.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jmceln_jax.data import preprocess
from jmceln_jax.evaluation import metrics
from jmceln_jax.training import losses
from jmceln_jax.typing import PyTree

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds besides the data iterator's position.

  Attributes:
    step: int32 scalar, optimiser steps taken.
    params: model parameters (float32).
    batch_stats: BatchNorm/SwitchNorm running statistics.
    opt_state: optax state.
    rng: uint32 [2] raw PRNG key data (orbax-friendly); per-step keys are
      `fold_in(rng, step)`.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  rng: jax.Array


def model_images(images: jax.Array) -> jax.Array:
  """uint8 letterboxed pixels -> CLIP-normalised float32 (on device); float
  inputs are taken as already normalised."""
  if images.dtype == jnp.uint8:
    return preprocess.normalize(images)
  return images


def dummy_inputs(
  batch: int, image_size: int, max_len: int
) -> tuple[jax.Array, jax.Array]:
  """Zero images [B, S, S, 3] and tokens [B, L] for initialisation."""
  return (
    jnp.zeros((batch, image_size, image_size, 3), jnp.float32),
    jnp.zeros((batch, max_len), jnp.int32),
  )


def init_state(
  rng: jax.Array,
  *,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  image_size: int,
  max_len: int,
) -> TrainState:
  """Fresh parameters, statistics and optimiser state (jit with shardings)."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(
    init_rng, *dummy_inputs(1, image_size, max_len), train=False
  )
  return state_from_variables(variables, state_rng, tx=tx)


def state_from_variables(
  variables: PyTree, rng: jax.Array, *, tx: optax.GradientTransformation
) -> TrainState:
  """The step-0 state around model variables ({"params"[, "batch_stats"]})
  with a fresh optimiser state; `rng` is a typed PRNG key."""
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(params),
    rng=jax.random.key_data(rng),
  )


def _loss_and_stats(
  params: PyTree,
  batch_stats: PyTree,
  batch: Batch,
  *,
  model: flax.linen.Module,
  loss_cfg: ml_collections.ConfigDict,
) -> tuple[jax.Array, tuple[PyTree, dict[str, jax.Array]]]:
  """Forward in training mode; returns (loss, (new batch_stats, terms))."""
  (logits, aux), updates = model.apply(
    {"params": params, "batch_stats": batch_stats},
    model_images(batch["image"]),
    batch["tokens"],
    train=True,
    mutable=["batch_stats"],
  )
  stages = aux.get("stages", ())
  # Stage logits exist with model.deep_supervision only; loss.stage_weight
  # (default 0.5) applies to them alone.
  stage_logits = [s["logits"] for s in stages if "logits" in s]
  loss, terms = losses.segmentation_loss(
    logits,
    batch["target"],
    class_weights=loss_cfg.class_weights,
    stage_logits=stage_logits,
    stage_weight=loss_cfg.stage_weight if stage_logits else 0.0,
  )
  if stages:  # How alike the Q embeddings are after the first Eq. 3.
    terms["query_cosine"] = stages[0]["query_cosine"]
  return loss, (updates.get("batch_stats", {}), terms)


def _microbatches(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...], micro-batch k = examples k, k+n, k+2n, ...

  Interleaving keeps every micro-batch spread over all devices (each device
  holds a contiguous block of the global batch).
  """

  def split(x):
    if x.shape[0] % n:
      raise ValueError(
        f"Batch {x.shape[0]} is not divisible by grad_accum_steps={n}."
      )
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  loss_cfg: ml_collections.ConfigDict,
  accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step on a global batch (optionally accumulated).

  Args:
    state: the train state (donated by the caller's jit).
    batch: global batch with "image", "tokens", "target".
    accum_steps: split the batch into this many micro-batches whose
      gradients are averaged (BatchNorm statistics update sequentially).

  Returns:
    (new state, metrics): loss terms, learning rate, grad/param norms and,
    with a cascade, "query_cosine" (models/cascade.py, stage 1).
  """
  grad_fn = jax.value_and_grad(_loss_and_stats, has_aux=True)

  def micro(carry, mb):
    stats, grad_sum = carry
    (loss, (stats, terms)), grads = grad_fn(
      state.params, stats, mb, model=model, loss_cfg=loss_cfg
    )
    grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
    return (stats, grad_sum), dict(terms, loss=loss)

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  if accum_steps == 1:
    (stats, grads), terms = micro((state.batch_stats, zeros), batch)
  else:
    (stats, grads), terms = jax.lax.scan(
      micro, (state.batch_stats, zeros), _microbatches(batch, accum_steps)
    )
    terms = jax.tree.map(jnp.mean, terms)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    batch_stats=stats,
    opt_state=opt_state,
  )
  out = dict(terms)
  out["lr"] = schedule(state.step)
  out["grad_norm"] = optax.tree.norm(grads)
  out["param_norm"] = optax.tree.norm(params)
  return new_state, out


def predict(
  state: TrainState, images: jax.Array, tokens: jax.Array, *, model
) -> jax.Array:
  """Inference logits [B, S, S, 2] float32 (running statistics).

  Args:
    images: [B, S, S, 3] uint8 letterboxed, or float32 CLIP-normalised.
    tokens: [B, L] int32.
  """
  logits, _ = model.apply(
    {"params": state.params, "batch_stats": state.batch_stats},
    model_images(images),
    tokens,
    train=False,
  )
  return logits.astype(jnp.float32)


def eval_step(
  state: TrainState,
  batch: Batch,
  *,
  model: flax.linen.Module,
  with_logits: bool = False,
) -> dict[str, jax.Array]:
  """Per-expression intersections and unions in both conventions.

  Returns:
    "original_i", "original_u", "network_i", "network_u": [B] int32, and the
    logits [B, S, S, 2] when `with_logits`.
  """
  logits = predict(state, batch["image"], batch["tokens"], model=model)
  out = {}
  out["network_i"], out["network_u"] = metrics.network_iu(
    logits, batch["target"]
  )
  out["original_i"], out["original_u"] = metrics.original_iu(
    logits, batch["box"], batch["gt"]
  )
  if with_logits:
    out["logits"] = logits
  return out
