"""A tiny JMCELN for tests and smoke runs (seconds per step on a laptop CPU).

  python -m jmceln_jax.train --config configs/tiny.py --workdir /tmp/tiny \
    --config.input.synthetic_images=24

Variants as in configs/refcoco.py, e.g. `configs/tiny.py:wo_pan`.
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.small_config(image_size=64, max_len=16, width=8, dim=32)
  config_lib.apply_variant(c, arg or "full")
  c.input.synthetic_images = 24
  c.input.global_batch_size = 8
  c.input.eval_batch_size = 8
  c.input.num_workers = 0
  c.total_steps = 2
  c.log_every_steps = 1
  c.checkpoint_every_steps = 1
  return c
