"""Referring-segmentation metrics (design.md §5): the project's only copy.

On device (jittable), per expression: I = |pred & gt|, U = |pred | gt|, with
pred = argmax of the 2-class logits (ties -> background):
  network_iu   at network resolution against the letterboxed mask (LAVT-like);
  original_iu  after the inverse letterbox, against the original-size mask on
               an M x M canvas, counting only pixels inside the image (CRIS).

On host: IoUAccumulator collects I and U (padding rows dropped by a validity
mask) and summarises, in percent:
  oIoU = sum I / sum U;  mIoU = mean(I / U) with IoU = 0 where U = 0;
  Pr@X = share of expressions with IoU > X ("original", as CRIS) or IoU >= X
         ("network", as LAVT), X in 0.5..0.9, compared exactly in integers
         (10 * I vs k * U), so I=1, U=2 passes Pr@0.5 only under "network".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jmceln_jax.data import preprocess

# Convention -> whether Pr@X needs IoU strictly above X.
CONVENTIONS = {"original": True, "network": False}
PR_TENTHS = (5, 6, 7, 8, 9)  # Pr@0.5 ... Pr@0.9.
COLUMNS = ("oIoU", "mIoU", *(f"Pr@0.{k}" for k in PR_TENTHS))


def _iu(pred: jax.Array, gt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-row intersection and union sizes of boolean [B, ...] maps."""
  axes = tuple(range(1, pred.ndim))
  inter = jnp.sum(pred & gt, axis=axes, dtype=jnp.int32)
  return inter, jnp.sum(pred | gt, axis=axes, dtype=jnp.int32)


def _foreground(logits: jax.Array) -> jax.Array:
  """[B, ..., 2] logits -> [B, ...] bool, argmax == 1."""
  if logits.shape[-1] != 2:
    raise ValueError(f"Expected 2-class logits [..., 2], got {logits.shape}.")
  return jnp.argmax(logits, axis=-1) == 1


def network_iu(
  logits: jax.Array, target: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Intersection and union at network resolution.

  Args:
    logits: [B, S, S, 2].
    target: [B, S, S] letterboxed mask, nonzero = object.

  Returns:
    (I, U): [B] int32 each.
  """
  return _iu(_foreground(logits), target != 0)


def original_iu(
  logits: jax.Array, boxes: jax.Array, gt_canvas: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Intersection and union at the original image resolution.

  Args:
    logits: [B, S, S, 2] at network resolution.
    boxes: [B, 6] int32 Letterbox rows (preprocess.Letterbox order).
    gt_canvas: [B, M, M] original-size masks at the top-left of an M x M
      canvas (M >= every image side), nonzero = object; outside is ignored.

  Returns:
    (I, U): [B] int32 each, over the h x w image pixels only.
  """
  maps, valid = preprocess.unletterbox(logits, boxes, gt_canvas.shape[1])
  return _iu(_foreground(maps) & valid, (gt_canvas != 0) & valid)


def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(
      f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}."
    )


def _concat(parts: list[np.ndarray]) -> np.ndarray:
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def summarize(
  intersection: np.ndarray, union: np.ndarray, convention: str
) -> dict[str, object]:
  """Summary metrics (percent) of per-expression I and U.

  Args:
    intersection: [N] non-negative integers.
    union: [N] integers >= intersection.
    convention: "original" (Pr with >) or "network" (Pr with >=).

  Returns:
    JSON-able dict: convention, expressions, oIoU, mIoU, Pr@0.5 ... Pr@0.9
    (all 0.0 when there are no expressions).
  """
  _check_convention(convention)
  i = np.asarray(intersection, np.int64).ravel()
  u = np.asarray(union, np.int64).ravel()
  out: dict[str, object] = {"convention": convention, "expressions": i.size}
  if i.size == 0:
    return out | dict.fromkeys(COLUMNS, 0.0)
  iou = np.where(u > 0, i / np.maximum(u, 1), 0.0)
  out["oIoU"] = 100.0 * float(i.sum() / max(u.sum(), 1))
  out["mIoU"] = 100.0 * float(iou.mean())
  strict = CONVENTIONS[convention]
  for k in PR_TENTHS:
    hit = (10 * i > k * u) if strict else (10 * i >= k * u)
    out[f"Pr@0.{k}"] = 100.0 * float(np.mean(hit & (u > 0)))
  return out


class IoUAccumulator:
  """Collects per-expression I and U of one split under one convention."""

  def __init__(self, split: str, convention: str):
    """Starts empty.

    Args:
      split: name shown in results, e.g. "val".
      convention: "original" or "network" (see module docstring).
    """
    _check_convention(convention)
    self.split = split
    self.convention = convention
    self._inter: list[np.ndarray] = []
    self._union: list[np.ndarray] = []

  def update(
    self,
    intersection: np.ndarray,
    union: np.ndarray,
    valid: np.ndarray | None = None,
  ) -> None:
    """Adds one batch; rows with valid == False (padding) are dropped.

    Args:
      intersection: [B] ints (device or host array).
      union: [B] ints.
      valid: [B] bool, or None for all rows.
    """
    i, u = np.asarray(intersection).ravel(), np.asarray(union).ravel()
    if valid is not None:
      keep = np.asarray(valid, bool).ravel()
      i, u = i[keep], u[keep]
    self._inter.append(i.astype(np.int64))
    self._union.append(u.astype(np.int64))

  def result(self) -> dict[str, object]:
    """Returns {"split": ..., **summarize(...)} over everything added."""
    res = summarize(_concat(self._inter), _concat(self._union), self.convention)
    return {"split": self.split} | res


def align(head: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> str:
  """Lines of an aligned text table: the first `left` columns left-aligned,
  the rest right-aligned, two spaces apart."""
  widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
  return "\n".join(
    "  ".join(
      x.ljust(n) if j < left else x.rjust(n)
      for j, (x, n) in enumerate(zip(row, widths, strict=True))
    )
    for row in (head, *rows)
  )


def format_table(results: Sequence[Mapping[str, object]]) -> str:
  """Formats result dicts (IoUAccumulator.result) as an aligned text table.

  Args:
    results: one dict per (split, convention).

  Returns:
    A multi-line string: header, then one row per result, metrics in percent.
  """
  head = ("split", "convention", "exprs", *COLUMNS)
  rows = [
    (
      str(r["split"]),
      str(r["convention"]),
      str(r["expressions"]),
      *(f"{float(r[c]):.2f}" for c in COLUMNS),
    )
    for r in results
  ]
  return align(head, rows, left=2)
