"""Orbax checkpoints of the train state plus the data iterator's state, and the
strict merge of pretrained (converted CLIP) weights into a freshly initialised
model.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. Orbax writes each step
into a temporary directory and renames it when complete, so a run killed at
any moment (even during a save) restarts from the last *completed* checkpoint;
leftover temporary directories are removed on start. The last `keep`
checkpoints are kept, plus the best one by the validation metric.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import traverse_util
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jmceln_jax.typing import PyTree
from jmceln_jax.utils import paths


class MismatchError(ValueError):
  """A checkpoint whose arrays do not match the state the config builds."""


class Checkpointer:
  """Saves and restores `(state, data_state)` pairs under a workdir.

  Args:
    directory: the checkpoint directory (`<workdir>/checkpoints`; may be
      relative, see paths.absolute).
    keep: number of most recent checkpoints to keep.
    best_metric: key of the `metrics` dict passed to `save` that ranks
      checkpoints (higher is better); the best one is always kept.
    async_save: write in a background thread (the next save, `wait()` and
      `close()` block until it is done).
    read_only: for readers (evaluation, prediction) next to a running
      training: never writes, never deletes (not even a save in progress).
  """

  def __init__(
    self,
    directory: str,
    *,
    keep: int = 2,
    best_metric: str | None = None,
    async_save: bool = True,
    read_only: bool = False,
  ):
    policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(keep, 1))]
    rank = (lambda m: m.get(best_metric, -math.inf)) if best_metric else None
    if best_metric:
      policies.append(
        pp.BestN(
          get_metric_fn=rank,
          n=1,
          keep_checkpoints_without_metrics=False,
        )
      )
    self.best_metric = best_metric
    # Orbax warns about every option a read-only manager overrides, and
    # that the directory is read only: the options are set accordingly here,
    # and the directory's warning, which only repeats `read_only`, dropped.
    with _without_absl_warning("Given directory is read only"):
      self._manager = ocp.CheckpointManager(
        epath.Path(paths.absolute(directory)),
        handler_registry=ocp.handlers.create_default_handler_registry(
          state=_state_handler(), data=ocp.JsonCheckpointHandler()
        ),
        options=ocp.CheckpointManagerOptions(
          preservation_policy=pp.AnyPreservationPolicy(policies),
          # best_fn makes orbax persist each step's metrics next to it, so
          # the best checkpoint is still known after a restart.
          best_fn=rank,
          best_mode="max",
          cleanup_tmp_directories=not read_only,
          enable_async_checkpointing=async_save,
          read_only=read_only,
          create=not read_only,
          save_interval_steps=0 if read_only else 1,
        ),
      )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def best_step(self) -> int | None:
    """Step with the highest `best_metric` among kept checkpoints."""
    if not self.best_metric:
      return None
    step = self._manager.best_step()
    metrics = self._manager.metrics(step) if step is not None else None
    return step if metrics and self.best_metric in metrics else None

  def save(
    self,
    step: int,
    state: PyTree,
    data_state: Mapping[str, Any],
    *,
    metrics: Mapping[str, float] | None = None,
  ) -> None:
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        data=ocp.args.JsonSave(dict(data_state)),
      ),
      metrics=dict(metrics or {}),
      force=True,
    )

  def restore(
    self, step: int, abstract_state: PyTree
  ) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` with the shardings/dtypes of `abstract_state`.

    Raises:
      MismatchError (before reading any array) when the stored arrays'
      paths or shapes differ from `abstract_state`'s.
    """
    report = _mismatch_report(
      f"Checkpoint {step} in {self._manager.directory} does not match the "
      "train state this config builds:",
      _shapes(self._manager.item_metadata(step)["state"]),
      _shapes(abstract_state),
    )
    if report:
      raise MismatchError(
        f"{report}\nIt was written with a different model or optimiser "
        "config. Evaluate or predict with the run's own config (the "
        "default: <workdir>/config.json), or train in a new --workdir."
      )
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(
            abstract_state
          ),
        ),
        data=ocp.args.JsonRestore(),
      ),
    )
    return restored["state"], dict(restored["data"])

  def resolve(self, which: str | int) -> int:
    """'latest' | 'best' | a step number -> an existing step (clear errors)."""
    steps = self.all_steps()
    if not steps:
      raise FileNotFoundError(
        f"No completed checkpoint in {self._manager.directory}."
      )
    if which == "latest":
      return max(steps)
    if which == "best":
      best = self.best_step()
      if best is None:
        raise FileNotFoundError(
          "No checkpoint carries validation metrics yet; use 'latest'."
        )
      return best
    step = int(which)
    if step not in steps:
      raise FileNotFoundError(f"No checkpoint at step {step}; have {steps}.")
    return step

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _without_absl_warning(prefix: str) -> Iterator[None]:
  """Drops absl log records whose message starts with `prefix` (orbax logs
  through absl) while the block runs."""

  def keep(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(prefix)

  logger = absl_logging.get_absl_logger()
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's pytree handler, writing every array from a single replica
  except on TPU.

  Elsewhere orbax's default splits each replicated array into one slice per
  replica (a small jitted program per array and device) except on GPU: with
  8 CPU devices, every save of the tiny model took 1-3 s (6 s the first
  time in a process) instead of 0.1-0.3 s.
  """
  array = ocp.type_handlers.ArrayHandler(
    use_replica_parallel=jax.default_backend() == "tpu"
  )
  registry = ocp.type_handlers.create_type_handler_registry(
    *(
      (t, array if t is jax.Array else ocp.type_handlers.get_type_handler(t))
      for t in ocp.type_handlers.supported_types()
    )
  )
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def merge_params(
  loaded: PyTree,
  inited: PyTree,
  new_patterns: Sequence[str],
  *,
  prefix: str = "",
) -> PyTree:
  """Strictly merges pretrained arrays into an initialised tree.

  Every leaf of `inited` must either be loaded (same path, same shape) or
  match one of `new_patterns` (regexes on the '/'-joined path, which keep
  their initial values); every loaded leaf must exist in `inited`.

  Args:
    loaded: pretrained tree, e.g. converted CLIP params.
    inited: the model's freshly initialised tree.
    new_patterns: regexes of parameters that are new (not pretrained).
    prefix: where `loaded` sits in `inited`, e.g. "clip/".

  Raises:
    ValueError listing missing, unexpected and mis-shaped keys.
  """
  flat_init = traverse_util.flatten_dict(inited, sep="/")
  flat_loaded = {
    prefix + k: v
    for k, v in traverse_util.flatten_dict(loaded, sep="/").items()
  }
  report = _mismatch_report(
    "Pretrained weights do not match the model:",
    {k: tuple(v.shape) for k, v in flat_loaded.items()},
    {k: tuple(v.shape) for k, v in flat_init.items()},
    new_patterns,
  )
  if report:
    raise ValueError(report)
  merged = {
    k: (flat_loaded[k].astype(v.dtype) if k in flat_loaded else v)
    for k, v in flat_init.items()
  }
  return traverse_util.unflatten_dict(merged, sep="/")


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape of every array leaf (dict keys, dataclass
  fields and sequence indices as path parts)."""

  def part(key: Any) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)

  return {
    "/".join(part(k) for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _mismatch_report(
  title: str,
  loaded: Mapping[str, tuple[int, ...]],
  model: Mapping[str, tuple[int, ...]],
  new_patterns: Sequence[str] = (),
) -> str | None:
  """Missing, unexpected and mis-shaped paths of `loaded` against `model`
  (paths matching a `new_patterns` regex may be missing), or None."""
  rules = [re.compile(p) for p in new_patterns]
  missing = [
    k
    for k in model
    if k not in loaded and not any(r.fullmatch(k) for r in rules)
  ]
  unexpected = [k for k in loaded if k not in model]
  mismatched = [
    f"{k}: checkpoint {loaded[k]} vs model {model[k]}"
    for k in loaded
    if k in model and loaded[k] != model[k]
  ]
  if not (missing or unexpected or mismatched):
    return None
  lines = [title]
  for heading, keys in (
    ("missing (not loaded, not declared new)", missing),
    ("unexpected (in checkpoint, not in model)", unexpected),
    ("shape mismatch", mismatched),
  ):
    if keys:
      lines.append(f"  {heading}: {len(keys)}")
      lines += [f"    {k}" for k in keys[:50]]
      if len(keys) > 50:
        lines.append(f"    ... and {len(keys) - 50} more")
  return "\n".join(lines)
