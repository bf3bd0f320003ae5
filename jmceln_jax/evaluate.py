r"""Scores a trained workdir on prepared splits, in both metric conventions.

  python -m jmceln_jax.evaluate --workdir runs/refcoco \
      [--splits val,testA,testB | --split testA] [--checkpoint best|latest|STEP]
      [--save_predictions OUT] [--config configs/refcoco.py --config.FIELD=V]

Without --config the run's own `<workdir>/config.json` is used (field
overrides need --config, e.g. --config.input.data_dir=... when the prepared
data moved). The data come from `input.data_dir`, or the workdir's synthetic
set. Without --splits: `input.val_split` and `input.test_splits`.

The checkpoint is restored once; every expression of each split is scored
exactly once (jitted, batches sharded over all devices). Printed and written
to `<workdir>/eval/<split>-<step>.json` (with per-expression I and U):
oIoU, mIoU and Pr@0.5..0.9 in both conventions, "original" (prediction mapped
back to the image's own size, scored against the original mask, Pr with
IoU > X, as CRIS) and "network" (at the S x S network input against the
letterboxed mask, Pr with IoU >= X, LAVT-like). `<split>-<step>-examples.png`
shows the best and worst predictions by original-convention IoU.
`--save_predictions OUT` writes every predicted mask at original resolution
to `OUT/<split>/` (8-bit PNG, 255 = object) with `index.json`. With several
splits, the mIoUs are also printed in the layout of the paper's Table 1, next
to the paper's JMCELN row for the dataset.
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
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from jmceln_jax import (
  cli,
  evaluation,
  metrics,
  paths,
  predict,
  preprocess,
  trainer,
  visualize,
  writers,
)
from jmceln_jax.data import datasets, pipeline, records

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
    checkpoint: "best", "latest" or a step (predict.restore_state).
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
  predict.checkpoints_dir(workdir, checkpoint)  # Fails before any work.
  trained = predict.load_config(workdir)
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
  setup = trainer.build_setup(config, num_train_refs=1)
  state, step, which = predict.restore_state(
    workdir, setup.abstract_state, checkpoint
  )
  evaluator = evaluation.Evaluator(
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
    "dataset": evaluation.dataset_name(data_dir, splits[0]),
    "results": results,
    "files": files,
    "warnings": warnings,
  }


def define_flags() -> None:
  """Defines the command-line flags. Called only when run as a program, so
  that importing this module next to other CLIs (which define --config and
  --workdir too) is harmless."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/refcoco.py[:variant]; default: the run's "
    "<workdir>/config.json (then --config.FIELD overrides are unavailable).",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_string(
    "data_dir",
    None,
    "Prepared data to score (sets input.data_dir of the run's config or of "
    "--config), e.g. when the data moved since training.",
  )
  flags.DEFINE_list(
    "splits",
    None,
    "Comma-separated prepared splits to score, e.g. val,testA,testB "
    "(default: input.val_split and input.test_splits).",
  )
  flags.DEFINE_alias("split", "splits")
  cli.define_checkpoint_flag()
  flags.DEFINE_string(
    "save_predictions",
    None,
    "Directory to write every predicted mask to (OUT/<split>/*.png at "
    "original resolution, plus index.json).",
  )
  flags.DEFINE_integer(
    "num_examples",
    4,
    "Best and worst predictions drawn per split in "
    "<workdir>/eval/<split>-<step>-examples.png (0: no picture).",
  )
  flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    # Orbax logs every checkpoint operation at INFO; --verbosity=0 shows it.
    logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  with cli.user_errors():
    config = f.config
    if f.data_dir:
      config = config or predict.load_config(f.workdir)
      config.input.data_dir = f.data_dir
    out = evaluate_workdir(
      f.workdir,
      config=config,
      splits=f.splits,
      checkpoint=f.checkpoint,
      save_predictions=f.save_predictions,
      num_examples=f.num_examples,
    )
  if jax.process_index() != 0:
    return
  ckpt = out["checkpoint"]
  print(f"\n{f.workdir}: {ckpt['which']} checkpoint, step {ckpt['step']}")
  print(metrics.format_table(evaluation.table_rows(out["results"])))
  print(CONVENTION_NOTE)
  kinds = {r["split"]: r["by_kind"] for r in out["results"] if "by_kind" in r}
  if kinds:
    print("\nBy kind of expression (convention 'original'):")
    print(evaluation.format_by_kind(kinds))
  if len(out["results"]) > 1:
    print("\n" + evaluation.table1(out["results"], out["dataset"]))
  print("\nWrote:\n  " + "\n  ".join(out["files"]))
  for warning in out["warnings"]:
    print(f"warning: {warning}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
