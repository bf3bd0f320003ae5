"""Scoring a prepared split: every expression once, jitted and sharded.

Used by validation during training and by `python -m jmceln_jax.evaluate`.
Per-expression intersections and unions are computed on device in both
conventions (jmceln_jax.metrics); the host only accumulates and summarises.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jmceln_jax import metrics, sharding, train_lib, xla_options
from jmceln_jax.data import pipeline

# Fields of an evaluation batch that go to the device.
DEVICE_FIELDS = ("image", "tokens", "target", "box", "gt", "valid", "index")


def _eval_fn(state, batch, *, model, with_logits):
  out = train_lib.eval_step(state, batch, model=model, with_logits=with_logits)
  out["valid"], out["index"] = batch["valid"], batch["index"]
  return out


class Evaluator:
  """Runs the jitted evaluation step over splits of a prepared dataset.

  Args:
    model: the JMCELN module.
    mesh: device mesh; batches are split over all its devices.
    state_shardings: shardings of the TrainState (from the trainer).
    input_cfg: `config.input` (image_size, max_len, eval_batch_size,
      max_eval_size, vocab, num_workers).
    with_logits: also return network-resolution logits to `on_batch`.
  """

  def __init__(
    self,
    model,
    mesh: Mesh,
    state_shardings: Any,
    input_cfg: ml_collections.ConfigDict,
    *,
    with_logits: bool = False,
  ):
    self.mesh = mesh
    self.cfg = input_cfg
    self._step = jax.jit(
      functools.partial(_eval_fn, model=model, with_logits=with_logits),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
      compiler_options=xla_options.for_dtype(model.dtype),
    )

  def run(
    self,
    state: train_lib.TrainState,
    data_dir: str,
    split: str,
    *,
    sentences: np.ndarray | None = None,
    on_batch: Callable[[dict, dict], None] | None = None,
    progress: bool = True,
  ) -> dict[str, Any]:
    """Scores every expression of `split` once.

    Args:
      state: the train state to evaluate.
      data_dir: prepared data directory.
      split: e.g. "val", "testA".
      sentences: optional expression index (pipeline.expression_index
        layout), e.g. shuffled sentences for the language ablation.
      on_batch: called with (host batch, host outputs) for every batch, e.g.
        to save predictions; outputs hold I/U per convention, "valid",
        "index" and (with_logits) "logits", all global.
      progress: show a progress bar (process 0 only).

    Returns:
      {"split", "expressions", "original": summary, "network": summary,
       "per_expression": {"index", "original_i", ... } host arrays}.
    """
    cfg = self.cfg
    batch = cfg.eval_batch_size
    if batch % self.mesh.devices.size:
      raise ValueError(
        f"input.eval_batch_size={batch} is not divisible by the "
        f"{self.mesh.devices.size} devices."
      )
    dataset, n = pipeline.eval_dataset(
      data_dir,
      split,
      image_size=cfg.image_size,
      max_len=cfg.max_len,
      global_batch_size=batch,
      canvas=cfg.max_eval_size,
      vocab=cfg.vocab,
      num_workers=cfg.num_workers,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      sentences=sentences,
    )
    collected: dict[str, list[np.ndarray]] = {}
    bar = tqdm(
      total=n,
      desc=f"eval {split}",
      unit="expr",
      disable=not progress or jax.process_index() != 0,
      leave=False,
    )
    iterator = iter(dataset)
    try:
      for host_batch in iterator:
        device_batch = {k: host_batch[k] for k in DEVICE_FIELDS}
        out = jax.device_get(
          self._step(state, sharding.host_to_global(device_batch, self.mesh))
        )
        keep = np.asarray(out["valid"], bool)
        for key in (
          "index",
          "original_i",
          "original_u",
          "network_i",
          "network_u",
        ):
          collected.setdefault(key, []).append(np.asarray(out[key])[keep])
        if on_batch is not None:
          on_batch(host_batch, out)
        bar.update(int(keep.sum()))
    finally:
      bar.close()
      close = getattr(iterator, "close", None)
      if close is not None:
        close()
    arrays = {k: np.concatenate(v) for k, v in collected.items()}
    result: dict[str, Any] = {"split": split, "expressions": n}
    for convention in metrics.CONVENTIONS:
      acc = metrics.IoUAccumulator(split, convention)
      acc.update(arrays[f"{convention}_i"], arrays[f"{convention}_u"])
      result[convention] = acc.result()
    result["per_expression"] = arrays
    return result


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, object]]:
  """Flattens Evaluator.run results into metrics.format_table rows."""
  return [r[c] for r in results for c in metrics.CONVENTIONS]
