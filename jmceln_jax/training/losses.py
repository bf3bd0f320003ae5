"""The training loss (§3.5): 2-class pixel-wise cross-entropy, in float32.

Weighted-mean convention of torch's `CrossEntropyLoss(weight=w)`: with class
weights w and per-example validity weights v,

  CE = sum_{b,p} v_b * w_{y_bp} * nll_bp / sum_{b,p} v_b * w_{y_bp},

which is the plain mean over pixels when w and v are all ones (LAVT uses
w = (0.9, 1.1)). With deep supervision the total adds stage_weight times the
cross-entropy of every per-stage prediction.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jmceln_jax.typing import Array


def cross_entropy(
  logits: Array,
  targets: Array,
  *,
  class_weights: Sequence[float] | Array | None = None,
  example_weights: Array | None = None,
) -> Array:
  """Weighted-mean pixel-wise cross-entropy.

  Args:
    logits: [B, H, W, K] class scores (any float dtype).
    targets: [B, H, W] integer class ids in [0, K).
    class_weights: optional [K] weights per target class.
    example_weights: optional [B] weights per example (e.g. 0 for padding
      examples of an incomplete batch).

  Returns:
    A float32 scalar; 0 when every weight is 0.
  """
  if logits.shape[:-1] != targets.shape:
    raise ValueError(
      f"logits {logits.shape} and targets {targets.shape} disagree; expected "
      "logits [B, H, W, K] and targets [B, H, W]."
    )
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = targets.astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  weights = jnp.ones_like(nll)
  if class_weights is not None:
    weights = jnp.asarray(class_weights, jnp.float32)[targets]
  if example_weights is not None:
    weights = weights * example_weights.astype(jnp.float32)[:, None, None]
  total = jnp.sum(weights)
  return jnp.sum(weights * nll) / jnp.where(total > 0, total, 1.0)


def segmentation_loss(
  logits: Array,
  targets: Array,
  *,
  class_weights: Sequence[float] | Array | None = None,
  example_weights: Array | None = None,
  stage_logits: Sequence[Array] = (),
  stage_weight: float = 0.0,
) -> tuple[Array, dict[str, Array]]:
  """Final cross-entropy plus optional deep-supervision terms.

  Args:
    logits: [B, H, W, 2] final prediction.
    targets: [B, H, W] in {0, 1}.
    class_weights: optional per-class weights (config.loss.class_weights).
    example_weights: optional [B] per-example weights.
    stage_logits: per-stage predictions, each [B, H, W, 2] (from
      aux["stages"][i]["logits"] with model.deep_supervision=True).
    stage_weight: weight of each stage term (config.loss.stage_weight).

  Returns:
    (total loss, {"ce": final term, "stage_ce": sum of stage terms}), all
    float32 scalars.
  """
  if stage_weight and not stage_logits:
    raise ValueError(
      "loss.stage_weight > 0 needs per-stage logits: set "
      "model.deep_supervision=True and model.num_stages > 0."
    )
  ce = functools.partial(
    cross_entropy,
    targets=targets,
    class_weights=class_weights,
    example_weights=example_weights,
  )
  final = ce(logits)
  stages = sum((ce(x) for x in stage_logits), jnp.zeros((), jnp.float32))
  total = final + stage_weight * stages if stage_weight else final
  return total, {"ce": final, "stage_ce": stages}
