r"""Evaluation throughput: the Evaluator's expressions/s next to the input
pipeline's evaluation samples/s.

  python -m bench.evaluation --config configs/synthetic.py --num_images 1000 \
      --repeats 3 --json bench_evaluation.json

generates the synthetic referring dataset (data_prep.synthetic converted by
data_prep.refcoco, as the synthetic training run does) in a temporary
directory, or uses a prepared --data_dir, and builds the model and a random
state as the trainer does (`model_state.build_setup` + `model_state.initial_state`).
Then it scores the split (default `input.val_split`) with
`jmceln_jax.evaluation.scoring.Evaluator`, the validation and test path itself
(pipeline, jitted sharded evaluation step, I/U in both conventions, host
accumulation): the first pass (compile included), then the median of
--repeats passes, as expressions/s. Next to it, full passes of the input
pipeline alone (`pipeline.eval_dataset` with the same batch, canvas and
workers) as samples/s. When the pipeline is not much faster than the
evaluator, evaluation is input-bound. `--tiny` runs configs/tiny.py in
under a minute.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import flags

from bench import common
from jmceln_jax.data import datasets, pipeline
from jmceln_jax.evaluation import scoring
from jmceln_jax.training import costs, model_state
from jmceln_jax.utils import cli_flags

_PACKAGES = (*common.JAX_PACKAGES, "grain", "array-record")
_CONFIGS = {
  False: os.path.join(common.ROOT, "configs", "synthetic.py"),
  True: os.path.join(common.ROOT, "configs", "tiny.py"),
}
_TINY = dict(num_images=24, repeats=1)


def eval_config(
  args: flags.FlagValues, devices: int
) -> ml_collections.ConfigDict:
  """The --config with the flags' overrides of its `input` section."""
  config = common.load_config(args.config)
  cfg = config.input
  cfg.eval_batch_size = args.batch or cfg.eval_batch_size
  cfg.num_workers = cfg.num_workers if args.workers is None else args.workers
  if cfg.eval_batch_size % devices:
    raise ValueError(
      f"The evaluation batch {cfg.eval_batch_size} is not divisible by "
      f"{devices} devices; pass --batch or --devices."
    )
  return config


def pipeline_pass(
  data_dir: str, split: str, cfg: ml_collections.ConfigDict
) -> int:
  """One full pass over the evaluation pipeline (workers started anew, as
  in every Evaluator.run); returns the number of batches."""
  dataset, _ = pipeline.eval_dataset(
    data_dir,
    split,
    image_size=cfg.image_size,
    max_len=cfg.max_len,
    global_batch_size=cfg.eval_batch_size,
    canvas=cfg.max_eval_size,
    vocab=cfg.vocab,
    num_workers=cfg.num_workers,
  )
  iterator = iter(dataset)
  try:
    return sum(1 for _ in iterator)
  finally:
    iterator.close()


def measure(
  config: ml_collections.ConfigDict,
  data_dir: str,
  split: str,
  devices: Sequence[jax.Device],
  *,
  repeats: int,
  progress: bool,
) -> dict[str, Any]:
  """Times Evaluator.run and the bare pipeline on one split.

  Returns:
    {"expressions", "batches", "first_pass_s", "evaluator": time_calls
    stats of a pass, "pipeline": the same for the pipeline alone,
    "expressions_per_s", "pipeline_samples_per_s"}.
  """
  setup = model_state.build_setup(
    config, config.input.global_batch_size, devices
  )
  state = model_state.initial_state(config, setup)
  evaluator = scoring.Evaluator(
    setup.model, setup.mesh, setup.state_shardings, config.input
  )

  def evaluate() -> dict[str, Any]:
    return evaluator.run(state, data_dir, split, progress=progress)

  start = time.perf_counter()
  n = evaluate()["expressions"]
  first = time.perf_counter() - start
  stats = common.time_calls(evaluate, warmup=0, repeats=repeats)
  batches = pipeline_pass(data_dir, split, config.input)
  alone = common.time_calls(
    lambda: pipeline_pass(data_dir, split, config.input),
    warmup=0,
    repeats=repeats,
  )
  return dict(
    expressions=n,
    batches=batches,
    first_pass_s=first,
    evaluator=stats,
    pipeline=alone,
    expressions_per_s=1e3 * n / stats["median_ms"],
    # Padded examples of the last batch count: the pipeline makes them.
    pipeline_samples_per_s=(
      1e3 * batches * config.input.eval_batch_size / alone["median_ms"]
    ),
  )


def run(args: flags.FlagValues, work_dir: str) -> dict[str, Any]:
  """Prepares the data (unless --data_dir) and measures; see module doc."""
  devices = costs.select_devices(args.devices)
  config = eval_config(args, len(devices))
  cfg = config.input
  split = args.split or cfg.val_split
  data_dir = args.data_dir or datasets.prepare_synthetic(
    work_dir,
    num_images=args.num_images,
    seed=cfg.synthetic_seed,
    splits=[split],
    num_workers=cfg.num_workers,
  )
  r = measure(
    config,
    data_dir,
    split,
    devices,
    repeats=args.repeats,
    progress=not args.tiny,
  )
  table = common.Table(
    [
      ("split", "split", "s"),
      ("expressions", "expressions", "d"),
      ("batch", "batch", "d"),
      ("workers", "workers", "d"),
      ("first_pass_s", "1st pass s", ".2f"),
      ("expressions_per_s", "Evaluator expr/s", ".1f"),
      ("pipeline_samples_per_s", "pipeline samples/s", ".1f"),
    ]
  )
  table.header()
  table.row(
    dict(r, split=split, batch=cfg.eval_batch_size, workers=cfg.num_workers)
  )
  return dict(
    settings=cli_flags.values(args, exclude=("json",)),
    data=dict(data_dir=args.data_dir or "synthetic (temporary)", split=split),
    model=dict(
      image_size=cfg.image_size,
      max_len=cfg.max_len,
      eval_batch_size=cfg.eval_batch_size,
      canvas=cfg.max_eval_size,
      num_workers=cfg.num_workers,
      devices=len(devices),
    ),
    results=r,
  )


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "config",
    None,
    "Config file[:variant] (default: configs/synthetic.py, with --tiny "
    "configs/tiny.py).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "data_dir",
    None,
    "A prepared data directory to score instead of generated data.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_images",
    1000,
    "Synthetic images to generate (8% of them form each eval split).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_string(
    "split", None, "Split to score (default: input.val_split).", flag_values=fv
  )
  flags.DEFINE_integer(
    "batch",
    None,
    "Global eval batch (default: the config's).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "workers",
    None,
    "Grain workers (default: the config's).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "devices",
    None,
    "Devices of the mesh (default: all).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "repeats", 3, "Timed passes.", lower_bound=1, flag_values=fv
  )


def parse_args(argv: Sequence[str] | None) -> flags.FlagValues:
  """The command-line flags (see the module docstring)."""
  args = common.parse_flags(
    argv,
    _define,
    module="bench.evaluation",
    doc=__doc__,
    tiny_help="configs/tiny.py smoke run",
    tiny=_TINY,
  )
  args.config = args.config or _CONFIGS[args.tiny]
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = parse_args(argv)

  def bench() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_evaluation_") as work_dir:
      return run(args, work_dir)

  return common.report(
    common.hardware(_PACKAGES) | common.jax_devices(),
    f"{args.config}; median of {args.repeats} passes",
    bench,
    args.json,
  )


if __name__ == "__main__":
  sys.exit(main())
