"""The balanced grounding benchmark: the main job's model and budget
(configs/synthetic.py) on synthetic data whose six kinds of expression
(colour, shape, colour + shape, size, position, relation) come in equal
shares, with shapes that share colours (data_prep.synthetic, preset
"balanced"). Evaluation reports every kind separately.

  python -m jmceln_jax.train --config configs/balanced.py[:VARIANT] \
      --workdir runs/balanced

VARIANT is a Table 2 variant (config_lib.VARIANTS, default "full");
`python -m bench.ablations` trains them all (docs/benchmarks.md).
"""

from jmceln_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.synthetic_job(arg or "full", preset="balanced")
