"""Shared pieces of the training tests (tests/test_train*.py).

Every training run here uses ONE config, configs/tiny.py's baseline variant
(CLIP encoders, neck and head: the loop does not depend on the decoder, and
its step compiles about 3x faster than the full model's) with the same
overrides, on one generated dataset. So the train step compiles once per
mesh and every later run, in process or in a subprocess, loads it from the
session's persistent compilation cache (tests/conftest.py). The reference
run (`straight_run`) is made once per session.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np

from configs import tiny
from jmceln_jax.data import datasets, pipeline
from jmceln_jax.training import checkpoints, loop, model_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANT = "baseline"
# Checkpoints every 3 steps and at each validation (every epoch and at the
# end), all kept. An epoch of the tiny dataset is fewer than 8 steps, so the
# run crosses an epoch boundary.
OVERRIDES = {
  "total_steps": 8,
  "checkpoint_every_steps": 3,
  "keep_checkpoints": 8,
  "eval_every_epochs": 1,
  "log_every_steps": 1,
}


def make_config(data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The tests' config: tiny baseline on `data_dir` with OVERRIDES, then
  `overrides` (dotted names, e.g. **{"mesh.data": 2})."""
  config = tiny.get_config(VARIANT)
  config.input.data_dir = data_dir
  config.update_from_flattened_dict({**OVERRIDES, **overrides})
  return config


def cli_args(data_dir: str, workdir: str) -> list[str]:
  """`python -m jmceln_jax.train` arguments for `make_config(data_dir)`."""
  return [
    "--config",
    os.path.join(ROOT, f"configs/tiny.py:{VARIANT}"),
    "--workdir",
    workdir,
    f"--config.input.data_dir={data_dir}",
    *(f"--config.{k}={v}" for k, v in OVERRIDES.items()),
  ]


def start_cli(
  data_dir: str, workdir: str, log, *, cwd: str = ROOT
) -> subprocess.Popen:
  """Starts `python -m jmceln_jax.train` with `cli_args` in `cwd`, its
  output going to the file `log`."""
  return subprocess.Popen(
    [sys.executable, "-m", "jmceln_jax.train", *cli_args(data_dir, workdir)],
    cwd=cwd,
    env=subprocess_env(PYTHONUNBUFFERED="1"),
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def logged_steps(workdir: str) -> list[int]:
  """Steps of metrics.jsonl's complete lines (it may be being written)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")[:-1]
  return [json.loads(line)["step"] for line in lines]


def kill_when(
  proc: subprocess.Popen,
  workdir: str,
  ready: Callable[[list[str]], bool],
  timeout: float = 300.0,
) -> list[int] | None:
  """SIGKILLs `proc` as soon as `ready(checkpoint dir entries)`.

  Returns:
    The completed checkpoint steps listed just before the kill, or None if
    the process ended first.
  """
  ckpt_dir = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + timeout
  while proc.poll() is None:
    assert time.monotonic() < deadline, "the trainer subprocess hangs"
    entries = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
    if ready(entries):
      proc.kill()
      proc.wait()
      return [int(e) for e in entries if e.isdigit()]
    time.sleep(0.002)
  return None


# JAX settings that change compiled programs or the compilation cache.
_FORWARDED = (
  "jax_disable_most_optimizations",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


def subprocess_env(**extra: str) -> dict[str, str]:
  """This process's environment plus its _FORWARDED JAX settings (as
  JAX_... variables), so subprocesses compile the same programs and share
  the compilation cache; then `extra`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for name in _FORWARDED:
    value = jax.config.values[name]
    if value is not None:
      value = int(value) if isinstance(value, bool) else value
      env[name.upper()] = str(value)
  env.update(extra)
  return env


# jax.monitoring event of every XLA compilation (or persistent-cache load).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles() -> Iterator[collections.Counter]:
  """Counts XLA compilations (a persistent-cache load counts too) by jitted
  function name, e.g. counts["train_step"]."""
  counts: collections.Counter = collections.Counter()

  def listen(event: str, duration: float, **kwargs) -> None:
    del duration
    match = re.fullmatch(r"jit\((\w+)\)", str(kwargs.get("fun_name", "")))
    if event == _COMPILE_EVENT and match:
      counts[match.group(1)] += 1

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield counts
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def _once(tmp_path_factory, name: str, make) -> str:
  """`make(path)` once per pytest session (a marker file records it)."""
  path = os.path.join(str(tmp_path_factory.getbasetemp()), name)
  if not os.path.exists(path + ".done"):
    os.makedirs(path, exist_ok=True)
    make(path)
    open(path + ".done", "w").close()
  return path


def prepared_data(tmp_path_factory) -> str:
  """The tiny config's 24-image synthetic dataset, prepared once."""
  root = _once(
    tmp_path_factory,
    "train_data",
    lambda p: datasets.resolve_data_dir(tiny.get_config(), p),
  )
  return os.path.join(root, "data", "prepared")


def straight_run(tmp_path_factory) -> str:
  """Workdir of an uninterrupted run of `make_config`; its
  `compiles.json` holds the run's jit lowerings by function name."""

  def run(workdir):
    with count_compiles() as counts:
      loop.train_and_evaluate(
        make_config(prepared_data(tmp_path_factory)), workdir
      )
    with open(os.path.join(workdir, "compiles.json"), "w") as f:
      json.dump(counts, f)

  return _once(tmp_path_factory, "straight", run)


def setup_for(config: ml_collections.ConfigDict, devices=None):
  """model_state.Setup of `config` on its data (all devices by default)."""
  refs = pipeline.num_refs(config.input.data_dir, config.input.train_split)
  return model_state.build_setup(config, refs, devices)


def restore(workdir: str, step: int, setup) -> tuple:
  """(host state, data state) of checkpoint `step` of a workdir."""
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, "checkpoints"), read_only=True
  )
  try:
    state, data = ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()
  return jax.device_get(state), data


def copy_checkpoint(src_workdir: str, step: int, dst_workdir: str) -> None:
  """Copies checkpoint `step` of one workdir into another (resume point)."""
  shutil.copytree(
    os.path.join(src_workdir, "checkpoints", str(step)),
    os.path.join(dst_workdir, "checkpoints", str(step)),
  )


def assert_trees_equal(actual, expected) -> None:
  """Bitwise equality of two array trees (same structure)."""
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def train_batches(config: ml_collections.ConfigDict, count: int, **kw):
  """The first `count` host batches the trainer would see (TRAIN_FIELDS);
  `kw` may set process_index / process_count / batch_size."""
  cfg = config.input
  kw.setdefault("batch_size", cfg.global_batch_size)
  iterator = iter(
    pipeline.train_dataset(
      cfg.data_dir,
      cfg.train_split,
      image_size=cfg.image_size,
      max_len=cfg.max_len,
      seed=config.seed,
      vocab=cfg.vocab,
      **kw,
    )
  )
  return [
    {k: b[k] for k in model_state.TRAIN_FIELDS}
    for b in (next(iterator) for _ in range(count))
  ]
