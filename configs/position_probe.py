"""The position probe: does the decoder ground position words where padding
is a weak cue? (docs/benchmarks.md, "Position probe")

  python -m jmceln_jax.train --config configs/position_probe.py[:OPTION] \
      --workdir runs/probe

Three identical shapes per image, told apart only by "left / middle / right"
or "top / middle / bottom" (data_prep/position_probe.py), at 224 x 224: the
decoder map is 28 x 28, most of its cells far from any border, as at the
paper's 416 px (52 x 52). A model blind to position sits near 1/3 mIoU.

OPTION sets the position information of the model (default: the model's
defaults, config_lib.base_config):
  none        no explicit position information
  coord       CoordConv in the neck only
  sine        sine encodings on Eq. 3 keys and Eq. 4 queries only
  lsran_sine  sine encodings in LSRAN's window attention only
  all         all three
"""

from jmceln_jax import config_lib
from jmceln_jax.models import position

OPTIONS = position.OPTIONS


def get_config(arg: str | None = None):
  c = config_lib.small_config(image_size=224, max_len=16, width=8, dim=64)
  config_lib.apply_variant(c, "full")
  if arg:
    if arg not in OPTIONS:
      raise config_lib.ConfigError(
        f"Unknown position option {arg!r}; choose one of {sorted(OPTIONS)}."
      )
    c.model.update(OPTIONS[arg])
  c.model.head_channels = (32, 16, 8)
  c.input.synthetic_preset = "position"
  c.input.synthetic_images = 1000
  c.input.test_splits = ("testA", "testB")
  c.input.global_batch_size = 8
  c.input.eval_batch_size = 32
  c.input.max_eval_size = 288  # ProbeConfig.max_side is 260.
  c.input.num_workers = 1
  c.total_steps = 450
  c.optim.warmup_steps = 50
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000
  c.eval_every_epochs = 100  # Validation only at the end.
  return c
