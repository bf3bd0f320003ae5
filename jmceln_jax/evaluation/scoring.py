"""Scoring a prepared split: every expression once, jitted and sharded.

Used by validation during training and by `python -m jmceln_jax.evaluate`.
Per-expression intersections and unions are computed on device in both
conventions (jmceln_jax.evaluation.metrics); the host only accumulates and summarises.
`table1` lays the mIoUs out like the paper's Table 1, next to its row;
`by_kind` splits the scores by kind of expression when the data records
kinds (the synthetic data does, RefCOCO does not); `final_evaluation` scores a
finished run's test splits.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jmceln_jax.data import pipeline, records
from jmceln_jax.evaluation import metrics
from jmceln_jax.ops import xla_options
from jmceln_jax.training import checkpoints, sharding, steps
from jmceln_jax.utils import writers

# Fields of an evaluation batch that go to the device.
DEVICE_FIELDS = ("image", "tokens", "target", "box", "gt", "valid", "index")

# Scores reported per kind of expression (convention "original").
KIND_COLUMNS = ("mIoU", "oIoU", "Pr@0.5")

# JMCELN's row of the paper's Table 1 (mIoU, %).
PAPER_TABLE1 = {
  "RefCOCO": {"val": 74.40, "testA": 77.69, "testB": 70.43},
  "RefCOCO+": {"val": 66.99, "testA": 72.69, "testB": 57.34},
  "RefCOCOg (UMD)": {"val": 64.08, "test": 64.99},
}
# Manifest provenance -> Table 1 dataset: (dataset, split_by) of
# data_prep.refcoco or the tfds config of data_prep.tfds_refcoco.
_DATASETS = {
  ("refcoco", "unc"): "RefCOCO",
  ("refcoco+", "unc"): "RefCOCO+",
  ("refcocog", "umd"): "RefCOCOg (UMD)",
  "ref_coco/refcoco_unc": "RefCOCO",
  "ref_coco/refcocoplus_unc": "RefCOCO+",
  "ref_coco/refcocog_umd": "RefCOCOg (UMD)",
}


def _eval_fn(state, batch, *, model, with_logits, previews):
  out = steps.eval_step(
    state, batch, model=model, with_logits=with_logits or previews > 0
  )
  out["valid"], out["index"] = batch["valid"], batch["index"]
  if previews:  # Only the first rows' masks leave the device.
    out["preview"] = jnp.argmax(out["logits"][:previews], -1).astype(jnp.uint8)
    if not with_logits:
      del out["logits"]
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
    previews: return the predicted masks of this many expressions of the
      first batch (`run`'s "previews"), for TensorBoard.
  """

  def __init__(
    self,
    model,
    mesh: Mesh,
    state_shardings: Any,
    input_cfg: ml_collections.ConfigDict,
    *,
    with_logits: bool = False,
    previews: int = 0,
  ):
    self.mesh = mesh
    self.cfg = input_cfg
    self.previews = min(previews, input_cfg.eval_batch_size)
    self._step = jax.jit(
      functools.partial(
        _eval_fn,
        model=model,
        with_logits=with_logits,
        previews=self.previews,
      ),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=sharding.replicated(mesh),
      compiler_options=xla_options.for_dtype(model.dtype),
    )

  def run(
    self,
    state: steps.TrainState,
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
       "per_expression": {"index", "original_i", ... } host arrays}, and
      "by_kind" (see `by_kind`) when the split's records carry kinds and
      `sentences` is None, and "previews" (with `previews`): the first
      expressions' [S, S, 3] uint8 input images, [S, S] bool predicted
      masks, [S, S] bool targets and sentences.
    """
    cfg = self.cfg
    batch = cfg.eval_batch_size
    if batch % self.mesh.devices.size:
      raise ValueError(
        f"input.eval_batch_size={batch} is not divisible by the "
        f"{self.mesh.devices.size} devices."
      )
    index = sentences
    if index is None:
      index = pipeline.expression_index(data_dir, split)
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
      sentences=index,
    )
    previews = None
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
        if previews is None and self.previews:
          previews = self._previews(data_dir, split, index, host_batch, out)
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
    kinds = (
      None
      if sentences is not None
      else pipeline.expression_kinds(data_dir, split)
    )
    if kinds is not None:
      result["by_kind"] = by_kind(arrays, kinds)
    if previews is not None:
      result["previews"] = previews
    return result

  def _previews(self, data_dir, split, index, host_batch, out) -> dict:
    """The first batch's first expressions: inputs, masks and sentences."""
    k = min(self.previews, len(host_batch["image"]))  # This process's rows.
    source = pipeline.split_source(data_dir, split)
    sentences = []
    for row in index[np.asarray(out["index"][:k])]:
      record = records.decode_record(source[int(row[1])])
      sentences.append(record["sentences"][int(row[2])])
    return dict(
      image=np.asarray(host_batch["image"][:k]),
      mask=np.asarray(out["preview"][:k], bool),
      target=np.asarray(host_batch["target"][:k], bool),
      sentence=sentences,
    )


def by_kind(
  per_expression: dict[str, np.ndarray], kinds: Sequence[str]
) -> dict[str, dict[str, float]]:
  """Scores per kind of expression, convention "original".

  Args:
    per_expression: Evaluator.run's arrays ("index", "original_i",
      "original_u"), in any order.
    kinds: kind of every expression, indexed by "index"
      (pipeline.expression_kinds).

  Returns:
    {kind: {"expressions": n, "mIoU", "oIoU", "Pr@0.5"}}, scores in % like
    the other results, kinds sorted by name.
  """
  of = np.asarray(kinds, object)[per_expression["index"]]
  out = {}
  for kind in sorted(set(of)):
    keep = of == kind
    s = metrics.summarize(
      per_expression["original_i"][keep],
      per_expression["original_u"][keep],
      "original",
    )
    out[kind] = {"expressions": s["expressions"]} | {
      c: s[c] for c in KIND_COLUMNS
    }
  return out


def format_by_kind(tables: dict[str, dict[str, dict[str, float]]]) -> str:
  """{split: by_kind(...)} as an aligned text table, one row per kind and
  split."""
  head = ("split", "kind", "exprs", *KIND_COLUMNS)
  rows = [
    (split, kind or "-", str(r["expressions"]))
    + tuple(f"{float(r[c]):.2f}" for c in KIND_COLUMNS)
    for split, table in tables.items()
    for kind, r in table.items()
  ]
  return metrics.align(head, rows, left=2)


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, object]]:
  """Flattens Evaluator.run results into metrics.format_table rows."""
  return [r[c] for r in results for c in metrics.CONVENTIONS]


def dataset_name(data_dir: str, split: str) -> str | None:
  """The paper's name of a prepared dataset (None: not in Table 1)."""
  source = records.read_manifest(data_dir, split).get("source", {})
  key = source.get("tfds") or (source.get("dataset"), source.get("split_by"))
  return _DATASETS.get(key)


def table1(results: Sequence[dict[str, Any]], dataset: str | None) -> str:
  """mIoU per split in the layout of the paper's Table 1, with its row.

  Args:
    results: Evaluator.run results.
    dataset: a PAPER_TABLE1 key, or None (then only this run's row).

  Returns:
    A few lines of text.
  """
  paper = PAPER_TABLE1.get(dataset, {})
  ours = {r["split"]: float(r["original"]["mIoU"]) for r in results}
  columns = list(paper) or list(ours)
  rows = [("this run", [ours.get(c) for c in columns])]
  if paper:
    rows.append(("paper (JMCELN)", [paper[c] for c in columns]))
  name = dataset or "this dataset (not in the paper's Table 1)"
  lines = [
    f'Table 1 layout, {name}: mIoU %, convention "original" (the paper '
    "reports mIoU at 416x416 input)."
  ]
  width = max(len(label) for label, _ in rows)
  lines.append(" " * width + "".join(f"{c:>8}" for c in columns))
  for label, values in rows:
    cells = "".join("       -" if v is None else f"{v:8.2f}" for v in values)
    lines.append(label.ljust(width) + cells)
  return "\n".join(lines)


def final_evaluation(
  config: ml_collections.ConfigDict,
  workdir: str,
  abstract_state: Any,
  ckpt: checkpoints.Checkpointer,
  evaluator: Evaluator,
  data_dir: str,
) -> dict[str, Any]:
  """Scores the test splits with the best (or latest) checkpoint, prints the
  table and writes `<workdir>/results.json`. With
  `config.language_check`, also scores the first test split with sentences
  shuffled across expressions: the drop shows the model uses the language."""
  which = "best" if ckpt.best_step() is not None else "latest"
  step = ckpt.resolve(which)
  state, _ = ckpt.restore(step, abstract_state)
  results = [
    evaluator.run(state, data_dir, s) for s in config.input.test_splits
  ]
  out: dict[str, Any] = {
    "checkpoint": {"which": which, "step": step},
    "results": [{c: r[c] for c in metrics.CONVENTIONS} for r in results],
  }
  print(f"\nTest results ({which} checkpoint, step {step}):")
  print(metrics.format_table(table_rows(results)))
  kinds = {r["split"]: r["by_kind"] for r in results if "by_kind" in r}
  if kinds:
    out["by_kind"] = kinds
    print("\nBy kind of expression (convention 'original'):")
    print(format_by_kind(kinds))
  if config.get("language_check"):
    split = config.input.test_splits[0]
    index = pipeline.shuffle_sentences(
      pipeline.expression_index(data_dir, split), config.seed
    )
    shuffled = evaluator.run(state, data_dir, split, sentences=index)
    shuffled["split"] = f"{split} (shuffled sentences)"
    for c in metrics.CONVENTIONS:
      shuffled[c]["split"] = shuffled["split"]
    drop = results[0]["original"]["mIoU"] - shuffled["original"]["mIoU"]
    out["language_check"] = {
      "split": split,
      "mIoU": results[0]["original"]["mIoU"],
      "mIoU_shuffled_sentences": shuffled["original"]["mIoU"],
      "drop": drop,
    }
    print(metrics.format_table(table_rows([shuffled])))
    print(
      f"Shuffling sentences across expressions lowers mIoU by {drop:.2f} points."
    )
  if jax.process_index() == 0:
    writers.write_json(os.path.join(workdir, "results.json"), out)
    if kinds:
      writers.write_json(
        os.path.join(workdir, "eval", f"by_kind-{step}.json"),
        {"checkpoint": out["checkpoint"], "by_kind": kinds},
        indent=1,
      )
  return out
