"""A saved run's evaluation: a checkpoint scored on whole splits, with JSON,
per-expression records and pictures.
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from jmceln_jax.data import datasets, pipeline, preprocess, records
from jmceln_jax.evaluation import metrics, scoring, visualize
from jmceln_jax.training import model_state
from jmceln_jax.utils import paths, writers

CONVENTION_NOTE = (
  "original: masks mapped back to each image's own size and scored against "
  "the original masks, Pr@X counts IoU > X (CRIS); network: scored at the "
  "network input against the letterboxed masks, Pr@X counts IoU >= X (LAVT)."
)


def split_records(data_dir: str, split: str) -> list[dict[str, Any]]:
  """Per-record metadata of a split (no image bytes), in record order."""
  return [
    {
      "ref_id": int(r["ref_id"]),
      "image_id": int(r["image_id"]),
      "file_name": r["file_name"],
      "size": tuple(int(v) for v in r["mask"]["size"]),
      "sentences": list(r["sentences"]),
    }
    for r in records.iter_records(data_dir, split)
  ]


class _Collector:
  """Evaluator.run's on_batch callback for one split: writes each predicted
  mask (optional) and keeps the k best and worst predictions' logits."""

  def __init__(
    self,
    metas: list[dict[str, Any]],
    index: np.ndarray,
    image_size: int,
    out_dir: str | None,
    k: int,
  ):
    self.metas, self.index, self.size = metas, index, image_size
    self.out_dir, self.k = out_dir, k
    # (rank key, tie-break, index, logits [S, S, 2]) min-heaps of size k.
    self.best: list[tuple[float, int, int, np.ndarray]] = []
    self.worst: list[tuple[float, int, int, np.ndarray]] = []
    self.rows: list[dict[str, Any]] = []

  def describe(self, i: int) -> dict[str, Any]:
    """Expression i of the split: ref, sentence, image, record position."""
    rec, sent_rec, sent_idx = (int(v) for v in self.index[i])
    meta = self.metas[rec]
    return {
      "index": i,
      "ref_id": meta["ref_id"],
      "sent_idx": sent_idx,
      "sentence": self.metas[sent_rec]["sentences"][sent_idx],
      "image_id": meta["image_id"],
      "file_name": meta["file_name"],
      "height": meta["size"][0],
      "width": meta["size"][1],
      "record": rec,
    }

  def mask(self, i: int, logits: np.ndarray) -> np.ndarray:
    """[h, w] bool at original resolution, as metrics.original_iu decides."""
    d = self.describe(i)
    box = preprocess.letterbox_params(d["height"], d["width"], self.size)
    return np.argmax(preprocess.unletterbox_numpy(logits, box), -1) == 1

  def __call__(self, host_batch: dict, out: dict) -> None:
    del host_batch  # Global outputs carry everything (multi-process too).
    if jax.process_index() != 0:
      return
    inter, union = out["original_i"], out["original_u"]
    for row in np.flatnonzero(np.asarray(out["valid"], bool)):
      i = int(out["index"][row])
      iou = float(inter[row]) / max(int(union[row]), 1)
      logits = out.get("logits")
      logits = None if logits is None else np.asarray(logits[row])
      if self.k:
        # Ties: the best are the first expressions, the worst the last.
        for heap, key in ((self.best, (iou, -i)), (self.worst, (-iou, i))):
          item = (*key, i, logits)
          if len(heap) < self.k:
            heapq.heappush(heap, item)
          elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)
      if self.out_dir is not None:
        d = self.describe(i)
        del d["record"]
        d["file"] = f"ref{d['ref_id']}_sent{d['sent_idx']}.png"
        d["original_i"], d["original_u"] = int(inter[row]), int(union[row])
        mask = self.mask(i, logits).astype(np.uint8) * 255
        visualize.save_png(mask, os.path.join(self.out_dir, d["file"]))
        self.rows.append(d)

  def _panel(self, source, item: tuple) -> Image.Image:
    *_, i, logits = item
    d = self.describe(i)
    record = records.decode_record(source[d["record"]])
    mask = self.mask(d["index"], logits)
    gt = records.decode_mask(record) != 0
    union = (mask | gt).sum()
    iou = (mask & gt).sum() / union if union else 0.0
    caption = f"IoU {100 * iou:.1f}: {d['sentence']}"
    image = preprocess.load_image(record["image"])
    return visualize.panel(image, mask, caption, gt=gt, size=256)

  def picture(self, data_dir: str, split: str) -> Image.Image:
    """The best predictions (IoU descending) above the worst (ascending)
    that are not among the best."""
    source = grain.sources.ArrayRecordDataSource(
      records.shard_paths(data_dir, split)
    )
    best = sorted(self.best, key=lambda t: t[:2], reverse=True)
    shown = {t[2] for t in best}
    worst = sorted(
      (t for t in self.worst if t[2] not in shown),
      key=lambda t: t[:2],
      reverse=True,
    )
    titles = [
      f"{split}: best {len(best)} by IoU (original convention); magenta = "
      "prediction, cyan = ground-truth outline"
    ]
    if worst:
      titles.append(f"{split}: worst {len(worst)}")
    return visualize.grid(
      [self._panel(source, t) for t in best + worst],
      columns=len(best),
      titles=titles,
    )


def _summary(
  result: dict[str, Any], collect: _Collector, data_dir: str
) -> dict[str, Any]:
  """JSON-able split results with per-expression I and U in split order."""
  per = result["per_expression"]
  order = np.argsort(per["index"])
  rows = collect.index[per["index"][order]]
  return {
    "data_dir": data_dir,
    "split": result["split"],
    "expressions": result["expressions"],
    **{c: result[c] for c in metrics.CONVENTIONS},
    **({"by_kind": result["by_kind"]} if "by_kind" in result else {}),
    "per_expression": {
      "ref_id": [collect.metas[r]["ref_id"] for r in rows[:, 0]],
      "sent_idx": rows[:, 2].tolist(),
      **{k: per[k][order].tolist() for k in per if k != "index"},
    },
  }


def evaluate_workdir(
  workdir: str,
  *,
  config: ml_collections.ConfigDict | None = None,
  splits: Sequence[str] | None = None,
  checkpoint: str | int = "best",
  save_predictions: str | None = None,
  num_examples: int = 4,
  progress: bool = True,
) -> dict[str, Any]:
  """Restores one checkpoint and scores splits (see the module docstring).

  Args:
    workdir: a training run's directory (paths may be relative, see
      paths.absolute).
    config: the run's config (default `<workdir>/config.json`).
    splits: prepared splits (default input.val_split + input.test_splits).
    checkpoint: "best", "latest" or a step (model_state.restore_state).
    save_predictions: directory for every predicted mask, or None.
    num_examples: best and worst predictions drawn per split (0: none).
    progress: show progress bars.

  Returns:
    {"checkpoint": {"which", "step"}, "dataset": Table 1 name or None,
     "results": Evaluator.run results (per split), "files": written paths,
     "warnings": what makes the scores suspect (also in each split's JSON),
     e.g. an image size other than the training one}.
  """
  workdir = paths.absolute(workdir)
  model_state.checkpoints_dir(workdir, checkpoint)  # Fails before any work.
  trained = model_state.load_config(workdir)
  config = paths.absolute_config(trained if config is None else config)
  sizes = {
    "evaluated": config.input.image_size,
    "trained": trained.input.image_size,
  }
  warnings = []
  if sizes["evaluated"] != sizes["trained"]:
    warnings.append(
      f"input.image_size is {sizes['evaluated']}, but the run was trained "
      f"at {sizes['trained']}: these scores are not the model's own."
    )
  if save_predictions:
    save_predictions = paths.absolute(save_predictions)
  data_dir = datasets.resolve_data_dir(config, workdir)
  cfg_in = config.input
  splits = list(splits or [cfg_in.val_split, *cfg_in.test_splits])
  for split in splits:  # Unknown splits fail here, before any work.
    records.read_manifest(data_dir, split)
  setup = model_state.build_setup(config, num_train_refs=1)
  state, step, which = model_state.restore_state(
    workdir, setup.abstract_state, checkpoint
  )
  evaluator = scoring.Evaluator(
    setup.model,
    setup.mesh,
    setup.state_shardings,
    cfg_in,
    with_logits=bool(save_predictions or num_examples > 0),
  )
  is_main = jax.process_index() == 0
  results, files = [], []
  for split in splits:
    index = pipeline.expression_index(data_dir, split)
    out_dir = (
      os.path.join(save_predictions, split) if save_predictions else None
    )
    collect = _Collector(
      split_records(data_dir, split),
      index,
      cfg_in.image_size,
      out_dir,
      max(num_examples, 0),
    )
    result = evaluator.run(
      state, data_dir, split, on_batch=collect, progress=progress
    )
    results.append(result)
    if not is_main:
      continue
    stem = os.path.join(workdir, "eval", f"{split}-{step}")
    summary = _summary(result, collect, data_dir)
    writers.write_json(
      stem + ".json",
      {
        "checkpoint": {"which": which, "step": step},
        "image_size": sizes,
        "warnings": warnings,
      }
      | summary,
      indent=1,
    )
    files.append(stem + ".json")
    if num_examples > 0:
      picture = collect.picture(data_dir, split)
      visualize.save_png(picture, stem + "-examples.png")
      files.append(stem + "-examples.png")
    if out_dir is not None:
      writers.write_json(
        os.path.join(out_dir, "index.json"),
        {
          "split": split,
          "checkpoint": {
            "which": which,
            "step": step,
            "workdir": workdir,
          },
          "format": "8-bit grey PNG at the original image size; 255 = "
          "object. The mask is the argmax of the 2-class logits mapped "
          "back with preprocess.unletterbox_numpy (convention 'original').",
          "predictions": sorted(collect.rows, key=lambda d: d["index"]),
        },
        indent=1,
      )
      files.append(os.path.join(out_dir, "index.json"))
  return {
    "checkpoint": {"which": which, "step": step},
    "dataset": scoring.dataset_name(data_dir, splits[0]),
    "results": results,
    "files": files,
    "warnings": warnings,
  }
