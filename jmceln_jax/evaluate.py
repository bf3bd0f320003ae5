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

import jax
from absl import app, flags
from ml_collections import config_flags

from jmceln_jax import cli
from jmceln_jax.evaluation import metrics, offline, scoring
from jmceln_jax.training import model_state


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
  del argv  # cli.parse_flags refuses positional arguments.
  f = flags.FLAGS
  with cli.user_errors():
    config = f.config
    if f.data_dir:
      config = config or model_state.load_config(f.workdir)
      config.input.data_dir = f.data_dir
    out = offline.evaluate_workdir(
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
  print(metrics.format_table(scoring.table_rows(out["results"])))
  print(offline.CONVENTION_NOTE)
  kinds = {r["split"]: r["by_kind"] for r in out["results"] if "by_kind" in r}
  if kinds:
    print("\nBy kind of expression (convention 'original'):")
    print(scoring.format_by_kind(kinds))
  if len(out["results"]) > 1:
    print("\n" + scoring.table1(out["results"], out["dataset"]))
  print("\nWrote:\n  " + "\n  ".join(out["files"]))
  for warning in out["warnings"]:
    print(f"warning: {warning}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
