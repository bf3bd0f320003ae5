"""How alike the Q contextual embeddings are after one Eq. 3 update, by the
std of q^0's initialisation (model.query_init_std) and the width C.

  python -m bench.query_init [--stds 0.02,0.1,1.0] [--dims 64,1024]

At initialisation (random weights; seed 0), on non-negative features of the
paper's 52 x 52 map (the neck ends in LeakyReLU), it prints the mean pairwise
cosine similarity of the rows of q^1 (models/cascade.py `mean_cosine`, the
"query_cosine" that training logs). Near 1, the Q embeddings have collapsed
into one. No timing: a property of the initialisation.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from bench import common
from jmceln_jax.models.cascade import Cascade
from jmceln_jax.utils import cli_flags


def query_cosine(std: float, dim: int, side: int, seed: int = 0) -> float:
  """mean_cosine(q^1) of a one-stage cascade (Q = 20, 8 heads) at init."""
  cascade = Cascade(
    num_stages=1, num_queries=20, num_heads=8, query_init_std=std, use_pan=False
  )
  keys = jax.random.split(jax.random.key(seed))
  f = jnp.abs(jax.random.normal(keys[0], (2, side, side, dim)))
  (_, stages), _ = jax.jit(
    lambda k, x: cascade.init_with_output(k, x, x, train=False)
  )(keys[1], f)
  return float(stages[0]["query_cosine"])


def _define(fv: flags.FlagValues) -> None:
  cli_flags.define_numbers(
    fv, "stds", [0.02, 0.1, 1.0], "q^0 stds.", kind=float, minimum=1e-9
  )
  cli_flags.define_numbers(fv, "dims", [64, 1024], "Channel widths C.")
  flags.DEFINE_integer(
    "side", 52, "Feature map side.", lower_bound=1, flag_values=fv
  )


def main(argv: Sequence[str] | None = None) -> int:
  args = common.parse_flags(
    argv,
    _define,
    module="bench.query_init",
    doc=__doc__,
    tiny_help="Smoke test: C 16, 4x4",
    tiny=dict(dims=[16], side=4),
  )

  def run() -> dict[str, Any]:
    table = common.Table(
      [("std", "q^0 std", "g"), ("dim", "C", "d"), ("cosine", "cos q^1", ".3f")]
    )
    table.header()
    rows = []
    for dim in args.dims:
      for std in args.stds:
        row = dict(std=std, dim=dim, cosine=query_cosine(std, dim, args.side))
        table.row(row)
        rows.append(row)
    settings = dict(side=args.side, tiny=args.tiny)
    return dict(settings=settings, results=rows)

  info = common.hardware(common.JAX_PACKAGES)
  return common.report(
    info, "mean cosine of q^1's rows at init", run, args.json
  )


if __name__ == "__main__":
  sys.exit(main())
