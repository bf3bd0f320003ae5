r"""Table 2 in miniature: every Table 2 variant on the balanced benchmark.

  python -m bench.ablations --workdir runs/ablations --seeds 0,1 \
      --json runs/ablations/ablations.json

trains `configs/balanced.py:VARIANT` (or --config's) for every variant of the
paper's Table 2 (config_lib.VARIANTS) and every seed, with the same data
(generated once under `<workdir>/data`), steps and batch, then scores the test
splits as `python -m jmceln_jax.train` does. One table compares the variants:
mIoU per kind of expression and overall, Pr@0.5, Pr@0.9 (test splits pooled
per expression), mean and spread over seeds, training wall time, and the
change of overall mIoU against the baseline next to the paper's (Table 2,
RefCOCO testB). The seed sets the model's initialisation and the order of
the training batches; the data are the same for every run.

Each run lives in `<workdir>/<variant>-seed<seed>`, a normal training run
(evaluate, predict and summary work on it). Runs that finished (their
results.json exists) are reused, so an interrupted command continues where
it stopped; delete a run's folder to train it again. `--tiny` trains
configs/tiny.py on 24 balanced images for 2 steps (a smoke test).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import flags

from bench import common
from jmceln_jax import config_lib
from jmceln_jax.data import datasets
from jmceln_jax.evaluation import metrics
from jmceln_jax.training import loop
from jmceln_jax.utils import cli_flags, paths, writers

# The paper's Table 2 (RefCOCO testB): mIoU, Pr@0.5, Pr@0.9 per variant.
PAPER_TABLE2 = {
  "baseline": (62.57, 70.11, 23.73),
  "lsran": (68.03, 77.53, 27.36),
  "cascade": (69.23, 78.08, 29.54),
  "wo_pan": (69.46, 78.86, 30.56),
  "full": (70.43, 79.88, 31.54),
  "wo_adaptive_lce": (69.11, 77.60, 29.22),
}
_CONFIGS = {
  False: os.path.join(common.ROOT, "configs", "balanced.py"),
  True: os.path.join(common.ROOT, "configs", "tiny.py"),
}


def pooled(results: dict[str, Any]) -> dict[str, Any]:
  """One run's results.json, test splits pooled per expression.

  Returns:
    {"expressions", "mIoU", "Pr@0.5", "Pr@0.9", "by_kind": {kind: mIoU}}.
  """
  rows = [r["original"] for r in results["results"]]
  n = sum(r["expressions"] for r in rows)
  out = {"expressions": n}
  for key in ("mIoU", "Pr@0.5", "Pr@0.9"):
    out[key] = sum(r[key] * r["expressions"] for r in rows) / n
  kinds: dict[str, list[tuple[float, int]]] = {}
  for table in results.get("by_kind", {}).values():
    for kind, r in table.items():
      kinds.setdefault(kind, []).append((r["mIoU"], r["expressions"]))
  out["by_kind"] = {
    k: sum(m * c for m, c in v) / sum(c for _, c in v)
    for k, v in sorted(kinds.items())
  }
  return out


def train_one(
  spec: str, variant: str, seed: int, run_dir: str, data_dir: str
) -> dict[str, Any]:
  """Trains and tests one variant and seed (or reads a finished run).

  Returns:
    `pooled(results)` plus "variant", "seed", "run" and "wall_s" (training
    and testing, compilation included).
  """
  results_path = os.path.join(run_dir, "results.json")
  timing_path = os.path.join(run_dir, "ablation.json")
  if not (os.path.isfile(results_path) and os.path.isfile(timing_path)):
    config = common.load_config(f"{spec}:{variant}")
    config.seed = seed
    config.input.data_dir = data_dir
    start = time.perf_counter()
    loop.train_and_evaluate(config, run_dir)
    wall = time.perf_counter() - start
    writers.write_json(timing_path, {"wall_s": wall})
  with open(results_path, encoding="utf-8") as f:
    results = json.load(f)
  with open(timing_path, encoding="utf-8") as f:
    wall = json.load(f)["wall_s"]
  return pooled(results) | dict(
    variant=variant, seed=seed, run=run_dir, wall_s=wall
  )


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
  return statistics.fmean(values), statistics.pstdev(values)


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per variant (in run order): mean and spread (population sd) over seeds
  of every score, wall time, and the change of mean mIoU against the
  baseline's (None without a baseline), next to the paper's."""
  variants = list(dict.fromkeys(r["variant"] for r in runs))
  rows = []
  for v in variants:
    mine = [r for r in runs if r["variant"] == v]
    row: dict[str, Any] = {"variant": v, "seeds": [r["seed"] for r in mine]}
    for key in ("mIoU", "Pr@0.5", "Pr@0.9", "wall_s"):
      row[key], row[f"{key}_sd"] = _mean_sd([r[key] for r in mine])
    kinds = sorted({k for r in mine for k in r["by_kind"]})
    row["by_kind"] = {
      k: _mean_sd([r["by_kind"].get(k, 0.0) for r in mine]) for k in kinds
    }
    rows.append(row)
  base = next((r["mIoU"] for r in rows if r["variant"] == "baseline"), None)
  for row in rows:
    row["delta"] = None if base is None else row["mIoU"] - base
    paper = PAPER_TABLE2.get(row["variant"])
    row["paper_delta"] = paper and paper[0] - PAPER_TABLE2["baseline"][0]
  return rows


def table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
  """The comparison as text (or a Markdown table): scores mean +- sd, %."""
  kinds = sorted({k for r in rows for k in r["by_kind"]})
  head = (
    "variant",
    "mIoU",
    "vs baseline",
    "paper",
    "Pr@0.5",
    "Pr@0.9",
    *kinds,
    "train min",
  )

  def pm(mean: float, sd: float) -> str:
    return f"{mean:.1f} ± {sd:.1f}"

  def signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}"

  lines = [
    (
      r["variant"],
      pm(r["mIoU"], r["mIoU_sd"]),
      signed(r["delta"]),
      signed(r["paper_delta"]),
      pm(r["Pr@0.5"], r["Pr@0.5_sd"]),
      pm(r["Pr@0.9"], r["Pr@0.9_sd"]),
      *(pm(*r["by_kind"].get(k, (0.0, 0.0))) for k in kinds),
      f"{r['wall_s'] / 60:.1f}",
    )
    for r in rows
  ]
  if not markdown:
    return metrics.align(head, lines, left=1)
  out = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  return "\n".join(out + ["| " + " | ".join(x) + " |" for x in lines])


def run(args: flags.FlagValues) -> dict[str, Any]:
  """Prepares the data once, trains every run, prints the table."""
  workdir = paths.absolute(args.workdir)
  config = common.load_config(args.config)
  cfg = config.input
  if args.tiny:
    cfg.synthetic_preset = "balanced"
  data_dir = datasets.prepare_synthetic(
    os.path.join(workdir, "data"),
    num_images=cfg.synthetic_images,
    seed=cfg.synthetic_seed,
    splits=[cfg.train_split, cfg.val_split, *cfg.test_splits],
    preset=cfg.get("synthetic_preset", "default"),
    num_workers=min(8, os.cpu_count() or 1),
  )
  spec = args.config.partition(":")[0]
  runs = []
  for seed in args.seeds:
    for variant in args.variants:
      run_dir = os.path.join(workdir, f"{variant}-seed{seed}")
      print(f"\n=== {variant}, seed {seed}: {run_dir}", flush=True)
      runs.append(train_one(spec, variant, seed, run_dir, data_dir))
  rows = summarize(runs)
  print("\nTable 2 in miniature (test splits pooled; mean ± sd over seeds):")
  print(table(rows))
  print("\n" + table(rows, markdown=True))
  return dict(
    settings=cli_flags.values(args, exclude=("json",)),
    data=dict(data_dir=data_dir, preset=cfg.get("synthetic_preset")),
    runs=runs,
    results=rows,
  )


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "config",
    None,
    "Config file taking a variant (default: configs/balanced.py, with "
    "--tiny configs/tiny.py).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "workdir",
    "runs/ablations",
    "Folder of the data and of one training run per variant and seed.",
    flag_values=fv,
  )
  cli_flags.define_choices(
    fv,
    "variants",
    list(config_lib.VARIANTS),
    "Comma-separated Table 2 variants.",
    {v: v for v in config_lib.VARIANTS},
  )
  cli_flags.define_numbers(
    fv, "seeds", [0, 1], "Comma-separated training seeds.", minimum=0
  )


def parse_args(argv: Sequence[str] | None) -> flags.FlagValues:
  """The command-line flags (see the module docstring)."""
  args = common.parse_flags(
    argv,
    _define,
    module="bench.ablations",
    doc=__doc__,
    tiny_help="configs/tiny.py smoke run",
  )
  args.config = args.config or _CONFIGS[args.tiny]
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = parse_args(argv)
  return common.report(
    common.hardware(common.JAX_PACKAGES),
    f"{args.config}: variants {args.variants}, seeds {args.seeds}",
    lambda: run(args),
    args.json,
  )


if __name__ == "__main__":
  sys.exit(main())
