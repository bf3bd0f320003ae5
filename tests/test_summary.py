"""The summary CLI: parameter table by shape, and the compiled training step.

The training-step test compiles the trainer's real step once (never runs it)
for a tiny baseline model on 2 of the simulated CPU devices.
"""

import jax
import pytest
from flax_test_utils import ynnpack_ops

from jmceln_jax import config_lib
from jmceln_jax.models import jmceln
from jmceln_jax.ops import stacking
from jmceln_jax.training import costs, model_state, sharding

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.


def _tiny_config(variant="full"):
  config = config_lib.small_config(image_size=32, max_len=8, width=8, dim=32)
  config_lib.apply_variant(config, variant)
  config.model.clip.transformer_layers = 1
  config.input.global_batch_size = 4
  return config


def test_param_counts_group_and_order():
  config = _tiny_config()
  model = jmceln.build_model(config.model)
  params = costs.abstract_model_variables(model, config)["params"]
  counts = costs.param_counts(params)
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
  deeper = costs.param_counts(params, depth=2)
  # Parameters held directly by a module (query_embed) stay with it.
  assert {"cascade", "cascade/stage_1", "cascade/stage_0"} <= set(deeper)
  assert sum(deeper.values()) == sum(counts.values())


def _nbytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_train_step_cost_compiles_the_trainer_step():
  config = _tiny_config("baseline")
  devices = costs.select_devices(2)
  cost = costs.train_step_cost(config, devices)
  with stacking.unrolled_loops():
    compiled = costs.compile_train_step(config, devices[:1])[1]
  # Lowered (all devices) = compiled for one device, loops unrolled in both.
  assert cost["GFLOPs per step"] == pytest.approx(
    costs.xla_cost(compiled, "flops") / 1e9, rel=0.05
  )
  # float32 on the CPU: compiled with xla_options.for_dtype.
  assert " convolution(" in compiled.as_text()
  assert "convolution" not in ynnpack_ops(compiled.as_text())
  state = model_state.build_setup(config, 4, devices).abstract_state
  batch = costs.abstract_batch(config.input.global_batch_size, config)
  # Per device: the whole (replicated) state, donated, and half the batch.
  assert cost["aliased (GiB)"] * costs.GIB == _nbytes(state)
  assert cost["arguments (GiB)"] * costs.GIB == (
    _nbytes(state) + _nbytes(batch) // 2
  )
  assert batch["image"].dtype == "uint8" and batch["target"].dtype == "uint8"
  assert cost["GFLOPs per step"] == pytest.approx(4 * cost["GFLOPs per image"])
  assert cost["GFLOPs per image"] > 0 and cost["compile time (s)"] > 0
  assert costs.select_devices(None) == jax.devices()
  with pytest.raises(ValueError, match="--devices=99, but 8 cpu"):
    costs.select_devices(99)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_step_lowers_for_accelerators(platform):
  """The trainer's sharded step of the full model lowers for a GPU or TPU on
  this CPU-only machine, without the CPU's convolution-gradient loops."""
  config = _tiny_config()
  setup = model_state.build_setup(config, 4, costs.select_devices(2))
  batch = costs.abstract_batch(4, config, sharding.batch_sharding(setup.mesh))
  step = model_state.jit_train_step(config, setup).trace(
    setup.abstract_state, batch
  )
  loops = {
    p: step.lower(lowering_platforms=(p,)).as_text().count("stablehlo.while")
    for p in (platform, "cpu")
  }
  # No scanned stack of more than one block at this size: no loop at all.
  assert loops[platform] == 0 and loops["cpu"] > 0


def test_summarize_without_training_step():
  report = costs.summarize(_tiny_config("baseline"), train_memory=False)
  assert report.startswith("Parameters (M) at 32x32")
  title = "Forward pass, 1 image, eval"
  assert f"{title}\n{'-' * len(title)}\nGFLOPs" in report
  assert "Training step" not in report


def test_two_column_table():
  table = costs.two_column_table("T", {"a": 1.5, "long name": 20.0}, "6.1f")
  assert table.splitlines() == [
    "T",
    "-",
    "a             1.5",
    "long name    20.0",
  ]
