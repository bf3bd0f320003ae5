"""JMCELN on RefCOCO (UNC partition), the paper's setup (§4).

  python -m jmceln_jax.train --config configs/refcoco.py --workdir runs/refcoco \
    --config.input.data_dir=DATA/refcoco_unc --config.init.clip_dir=WEIGHTS/RN101

Table 2 ablations: `configs/refcoco.py:VARIANT` with VARIANT one of baseline,
lsran, cascade, wo_pan, full (default), wo_adaptive_lce.
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper_config(("testA", "testB"), arg)
