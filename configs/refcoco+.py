"""JMCELN on RefCOCO+ (UNC partition), the paper's setup (§4).

  python -m jmceln_jax.train --config configs/refcoco+.py --workdir runs/refcoco+ \
    --config.input.data_dir=DATA/refcoco+_unc --config.init.clip_dir=WEIGHTS/RN101

Variants as in configs/refcoco.py, e.g. `configs/refcoco+.py:wo_pan`.
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper_config(("testA", "testB"), arg)
