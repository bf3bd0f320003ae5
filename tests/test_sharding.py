"""Mesh construction and the FSDP parameter rule (8 simulated devices)."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jmceln_jax.training import sharding


def _mesh(data, fsdp):
  return sharding.create_mesh(
    ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))
  )


def test_mesh_sizes_and_errors():
  assert dict(_mesh(-1, 1).shape) == {"data": 8, "fsdp": 1}
  assert dict(_mesh(-1, 4).shape) == {"data": 2, "fsdp": 4}
  assert dict(_mesh(2, -1).shape) == {"data": 2, "fsdp": 4}
  with pytest.raises(ValueError, match="cannot be split"):
    _mesh(-1, 3)
  with pytest.raises(ValueError, match="needs 4 devices"):
    _mesh(2, 2)


def test_fsdp_rule_picks_largest_divisible_dim():
  assert sharding.array_spec((1024, 512), 4, 100) == P("fsdp", None)
  assert sharding.array_spec((3, 3, 6, 512), 4, 100) == P(
    None, None, None, "fsdp"
  )
  assert sharding.array_spec((7, 9), 4, 10) == P()  # Nothing divisible.
  assert sharding.array_spec((64,), 4, 100) == P()  # Too small.
  assert sharding.array_spec((1024, 512), 1, 100) == P()  # No fsdp axis.


def test_host_to_global_splits_batch_over_all_devices():
  mesh = _mesh(2, 4)
  batch = {"x": np.arange(16 * 3).reshape(16, 3)}
  out = sharding.host_to_global(batch, mesh)
  assert out["x"].shape == (16, 3)
  assert {s.data.shape for s in out["x"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
  with pytest.raises(ValueError, match="not divisible"):
    sharding.per_process_batch_size(12, mesh)
  assert sharding.per_process_batch_size(16, mesh) == 16 // jax.process_count()
