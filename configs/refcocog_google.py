"""JMCELN on RefCOCOg (Google partition: train/val only), the paper's setup.

  python -m jmceln_jax.train --config configs/refcocog_google.py \
    --workdir runs/refcocog_google --config.input.data_dir=DATA/refcocog_google \
    --config.init.clip_dir=WEIGHTS/RN101

The Google partition has no test split; the final scores are on val.
Variants as in configs/refcoco.py.
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.paper_config(("val",), arg)
