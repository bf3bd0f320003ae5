"""The main job: JMCELN trained from scratch on the embedded synthetic
referring dataset, on CPU, in minutes (README, set-up command 1).

  python -m jmceln_jax.train --config configs/synthetic.py --workdir runs/synthetic

The dataset (raw refer format -> data_prep.refcoco -> ArrayRecord) is
generated under the workdir on first use. After training, the test split is
scored, and scored again with sentences shuffled across expressions.
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  c = config_lib.small_config(image_size=64, max_len=16, width=16, dim=64)
  config_lib.apply_variant(c, arg or "full")
  c.input.synthetic_images = 3000
  c.input.test_splits = ("testA", "testB")
  c.input.global_batch_size = 32
  c.input.eval_batch_size = 64
  c.input.num_workers = 1
  c.num_epochs = 12
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval_every_epochs = 4
  c.language_check = True
  return c
