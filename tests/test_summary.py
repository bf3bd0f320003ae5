"""The summary CLI's parameter table (by shape only; no compilation)."""

import jax

from jmceln_jax import config_lib, summary
from jmceln_jax.models import jmceln


def test_param_counts_group_and_order():
  config = config_lib.small_config(image_size=64, max_len=8, width=8, dim=32)
  model = jmceln.build_model(config.model)
  variables = summary.abstract_variables(
    model, summary.abstract_inputs(1, config)
  )
  params = variables["params"]
  counts = summary.param_counts(params)
  assert list(counts) == [
    "clip/visual",
    "clip/text",
    "neck",
    "lsran",
    "cascade",
    "head",
  ]
  assert sum(counts.values()) == sum(x.size for x in jax.tree.leaves(params))
  assert counts["cascade"] == sum(
    x.size for x in jax.tree.leaves(params["cascade"])
  )
  deeper = summary.param_counts(params, depth=2)
  # Parameters held directly by a module (query_embed) stay with it.
  assert {"cascade", "cascade/stage_1", "cascade/stage_0"} <= set(deeper)
  assert sum(deeper.values()) == sum(counts.values())


def test_format_table():
  table = summary.format_table("T", {"a": 1.5, "long name": 20.0}, "6.1f")
  assert table.splitlines() == [
    "T",
    "-",
    "a             1.5",
    "long name    20.0",
  ]
