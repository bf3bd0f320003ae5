"""JMCELN on RefCOCOg (UMD partition: val/test), the paper's setup (§4).

  python -m jmceln_jax.train --config configs/refcocog_umd.py \
    --workdir runs/refcocog_umd --config.input.data_dir=DATA/refcocog_umd \
    --config.init.clip_dir=WEIGHTS/RN101

Variants as in configs/refcoco.py, e.g. `configs/refcocog_umd.py:wo_pan`.
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper_config(("test",), arg)
