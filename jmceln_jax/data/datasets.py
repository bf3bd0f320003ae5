"""Where a run's prepared data comes from: an explicit directory, or the
embedded synthetic dataset generated on first use."""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from jmceln_jax import config_lib
from jmceln_jax.data import records

SYNTHETIC_NAME = "synthetic"


def _prepared(data_dir: str, splits: list[str]) -> bool:
  return all(
    os.path.isfile(os.path.join(data_dir, s, records.MANIFEST_NAME))
    for s in splits
  )


def prepare_synthetic(
  root: str,
  *,
  num_images: int,
  seed: int,
  splits: list[str],
  preset: str = "default",
  num_workers: int = 0,
) -> str:
  """Generates the synthetic raw refer files under `root/raw` and converts
  them with the RefCOCO path into `root/prepared` (skipped when present).

  Returns:
    The prepared data directory.
  """
  from data_prep import refcoco, synthetic  # noqa: PLC0415

  prepared = os.path.join(root, "prepared")
  if _prepared(prepared, splits):
    return prepared
  raw = os.path.join(root, "raw")
  print(
    f"Generating the synthetic dataset ({num_images} images, preset "
    f"{preset!r}) in {raw}"
  )
  synthetic.generate(
    raw,
    num_images=num_images,
    seed=seed,
    name=SYNTHETIC_NAME,
    preset=preset,
    num_workers=num_workers,
  )
  refcoco.convert(
    raw,
    os.path.join(raw, "images"),
    SYNTHETIC_NAME,
    "unc",
    prepared,
    num_workers=num_workers,
  )
  return prepared


def resolve_data_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared data directory of a run (see module docstring).

  `config.input.data_dir` wins; otherwise `config.input.synthetic_images`
  (> 0) generates that many synthetic images under `<workdir>/data` once.
  Only process 0 writes; the others wait for it.
  """
  cfg = config.input
  splits = [cfg.train_split, cfg.val_split, *cfg.test_splits]
  if cfg.data_dir:
    if not os.path.isdir(cfg.data_dir):
      raise FileNotFoundError(
        f"input.data_dir={cfg.data_dir} does not exist. Prepare data with "
        "`python -m data_prep.refcoco ... --out DIR` first (if it moved: "
        "`python -m jmceln_jax.evaluate --data_dir NEW`, or "
        "--config.input.data_dir=NEW)."
      )
    return cfg.data_dir
  if cfg.synthetic_images <= 0:
    raise config_lib.ConfigError(
      "No data: set --config.input.data_dir to a directory prepared by "
      "`python -m data_prep.refcoco` (see README, 'Data')."
    )
  root = os.path.join(workdir, "data")
  if jax.process_index() == 0:
    prepare_synthetic(
      root,
      num_images=cfg.synthetic_images,
      seed=cfg.synthetic_seed,
      splits=splits,
      preset=cfg.get("synthetic_preset", "default"),  # Older configs lack it.
      # Nothing else runs yet: draw and convert on every core.
      num_workers=min(8, os.cpu_count() or 1),
    )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("synthetic data prepared")
  return os.path.join(root, "prepared")
