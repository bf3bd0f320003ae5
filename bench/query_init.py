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

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bench import common
from jmceln_jax.models.cascade import Cascade


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


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
    prog="python -m bench.query_init", description=__doc__.split("\n\n")[0]
  )
  p.add_argument(
    "--stds",
    type=common.number_list("--stds", float, 1e-9),
    default=[0.02, 0.1, 1.0],
    help="q^0 stds",
  )
  p.add_argument(
    "--dims", type=common.int_list("--dims"), default=[64, 1024], help="C"
  )
  p.add_argument("--side", type=int, default=52, help="feature map side")
  p.add_argument("--tiny", action="store_true", help="smoke test: C 16, 4x4")
  p.add_argument("--json", default=None, help="also write results here")
  args = p.parse_args(argv)
  if args.tiny:
    args.dims, args.side = [16], 4

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
