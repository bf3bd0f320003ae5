"""Checkpointer retention/resolution and the strict pretrained merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmceln_jax.training.checkpoints import (
  Checkpointer,
  MismatchError,
  merge_params,
)


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def test_keeps_latest_and_best_and_survives_restart(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2, best_metric="miou")
  state = {"w": jnp.arange(4.0), "step": jnp.int32(0)}
  for step, miou in [(1, 0.2), (2, 0.9), (3, 0.1), (4, None), (5, 0.3)]:
    metrics = None if miou is None else {"miou": miou}
    ckpt.save(
      step, dict(state, step=jnp.int32(step)), {"i": step}, metrics=metrics
    )
  ckpt.close()
  again = Checkpointer(str(tmp_path), keep=2, best_metric="miou")
  assert again.all_steps() == [2, 4, 5]
  assert again.resolve("best") == 2
  assert again.resolve("latest") == 5
  restored, data = again.restore(2, _abstract(state))
  assert int(restored["step"]) == 2 and data == {"i": 2}
  with pytest.raises(FileNotFoundError, match="No checkpoint at step 3"):
    again.resolve(3)


def test_best_unknown_before_any_evaluation(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=1, best_metric="miou")
  ckpt.save(1, {"w": jnp.zeros(2)}, {})
  ckpt.wait()
  with pytest.raises(FileNotFoundError, match="validation metrics"):
    ckpt.resolve("best")


def test_restore_refuses_another_models_checkpoint(tmp_path):
  """A state of other shapes or paths fails before reading, naming them."""
  ckpt = Checkpointer(str(tmp_path), keep=1)
  ckpt.save(1, {"w": jnp.zeros((8, 32)), "b": jnp.zeros(2)}, {})
  ckpt.close()
  ckpt = Checkpointer(str(tmp_path), read_only=True)
  other = {"w": jnp.zeros((8, 16)), "c": jnp.zeros(2)}
  with pytest.raises(MismatchError) as error:
    ckpt.restore(1, _abstract(other))
  assert "w: checkpoint (8, 32) vs model (8, 16)" in str(error.value)
  assert "missing (not loaded, not declared new): 1\n    c" in str(error.value)
  assert "unexpected (in checkpoint, not in model): 1\n    b" in str(
    error.value
  )


def test_relative_directory_and_quiet_readers(tmp_path, monkeypatch, caplog):
  """A relative directory works (orbax itself refuses one), and a read-only
  Checkpointer logs no warning (orbax warns about each option it sets)."""
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer("run/checkpoints", keep=1)
  ckpt.save(1, {"w": jnp.ones(2)}, {"i": 1})
  ckpt.close()
  caplog.set_level("WARNING")
  reader = Checkpointer("run/checkpoints", read_only=True)
  restored, data = reader.restore(1, _abstract({"w": jnp.ones(2)}))
  reader.close()
  np.testing.assert_array_equal(restored["w"], np.ones(2))
  assert data == {"i": 1}
  assert [r.getMessage() for r in caplog.records] == []


def test_merge_params_strict():
  inited = {
    "clip": {"a": {"k": jnp.zeros(3)}, "connect": {"k": jnp.zeros(1)}},
    "neck": {"x": jnp.zeros(2)},
  }
  loaded = {"a": {"k": np.ones(3, np.float16)}}
  merged = merge_params(
    loaded, inited, [r"neck/.*", r"clip/connect/.*"], prefix="clip/"
  )
  assert merged["clip"]["a"]["k"].dtype == jnp.float32
  np.testing.assert_array_equal(merged["clip"]["a"]["k"], 1.0)
  with pytest.raises(ValueError, match=r"missing[\s\S]*clip/connect/k"):
    merge_params(loaded, inited, [r"neck/.*"], prefix="clip/")
  with pytest.raises(ValueError, match=r"unexpected[\s\S]*clip/zz"):
    merge_params(
      dict(loaded, zz=np.ones(1)),
      inited,
      [r"neck/.*", r"clip/connect/.*"],
      prefix="clip/",
    )
  with pytest.raises(ValueError, match=r"shape mismatch[\s\S]*clip/a/k"):
    merge_params(
      {"a": {"k": np.ones(4)}},
      inited,
      [r"neck/.*", r"clip/connect/.*"],
      prefix="clip/",
    )
