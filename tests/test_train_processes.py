"""The trainer across processes: SIGKILLed runs restart exactly, and two
processes (CPU collectives over gloo) train in lockstep, each on its own
data shard. See tests/train_utils.py for the shared config and reference."""

import glob
import os
import random
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_utils as tu

from jmceln_jax.training import checkpoints, loop, model_state, sharding
from jmceln_jax.utils import writers

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

TMP_MARK = ".orbax-checkpoint-tmp"
# A worker of the two-process run: trains, then dumps its copy of the
# (replicated) parameters.
WORKER = """
import sys
from absl import flags
flags.FLAGS.mark_as_parsed()
import jax, numpy as np
from flax import traverse_util
import train_utils as tu
from jmceln_jax.training import loop
state = loop.train_and_evaluate(tu.make_config(sys.argv[1]), sys.argv[2])
params = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
np.savez(f"{sys.argv[2]}/params_{jax.process_index()}.npz", **params)
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tu.prepared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  return tu.straight_run(tmp_path_factory)


def _latest_after_kill(workdir, completed) -> int:
  """The newest checkpoint complete at the kill survives it: a restart
  loses at most the steps since then."""
  ckpt = checkpoints.Checkpointer(
    os.path.join(workdir, "checkpoints"), read_only=True
  )
  latest = ckpt.latest_step() or 0
  ckpt.close()
  assert latest >= max(completed, default=0)
  return latest


def test_sigkill_anytime_then_restart_is_exact(straight, data_dir, tmp_path):
  """The CLI, resumed from the reference run's checkpoint 3, is SIGKILLed
  during a save, restarted and SIGKILLed again after a random step; each
  kill keeps every completed checkpoint, and a final restart ends bitwise
  where the uninterrupted run did. The kill schedule is random (its seed is
  printed)."""
  seed = random.randrange(1 << 16)
  print(f"kill schedule seed {seed}")
  rng = random.Random(seed)
  saves = sorted(int(s) for s in os.listdir(f"{straight}/checkpoints"))
  workdir = str(tmp_path / "run")
  tu.copy_checkpoint(straight, 3, workdir)  # Skips initialisation.
  log_path = tmp_path / "log.txt"
  with open(log_path, "w") as log:
    # 1. During the save of a random checkpoint (again, of a later one, if
    # the save completed between the look and the kill).
    latest = 3
    for _ in range(3):
      later = [s for s in saves[:-1] if s > latest]
      assert later, "every kill came too late to interrupt a save"
      target = rng.choice(later)
      proc = tu.start_cli(data_dir, workdir, log)
      completed = tu.kill_when(
        proc,
        workdir,
        lambda entries, t=target: any(
          e.startswith(f"{t}{TMP_MARK}") for e in entries
        ),
      )
      assert completed is not None, f"the run ended before saving {target}"
      latest = _latest_after_kill(workdir, completed)
      if glob.glob(f"{workdir}/checkpoints/*{TMP_MARK}*"):
        break
    else:
      pytest.fail("three kills in a row missed the save in progress")
    # 2. Once a random later step is logged (mid-step, or mid-save).
    target = rng.randrange(latest + 1, 8)
    logged = len(tu.logged_steps(workdir))
    proc = tu.start_cli(data_dir, workdir, log)
    completed = tu.kill_when(
      proc,
      workdir,
      lambda _: max(tu.logged_steps(workdir)[logged:], default=0) >= target,
    )
    if completed is not None:
      _latest_after_kill(workdir, completed)
  with open(log_path) as f:
    assert f"Resumed from {workdir}/checkpoints at step" in f.read()
  loop.train_and_evaluate(tu.make_config(data_dir), workdir)
  assert not glob.glob(f"{workdir}/checkpoints/*{TMP_MARK}*")
  setup = tu.setup_for(tu.make_config(data_dir))
  tu.assert_trees_equal(
    tu.restore(workdir, 8, setup)[0], tu.restore(straight, 8, setup)[0]
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_process_run(data_dir, workdir):
  """Runs WORKER as processes 0 and 1 of a job with one CPU device each.

  One device per process keeps the gloo collectives few: every process
  must reach its first collective within gloo's fixed 30 s rendezvous.
  """
  address = f"localhost:{_free_port()}"
  flags = re.sub(
    r"--xla_force_host_platform_device_count=\d+",
    "",
    os.environ.get("XLA_FLAGS", ""),
  )
  procs, logs = [], []
  for pid in range(2):
    env = tu.subprocess_env(
      XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=1",
      JAX_COORDINATOR_ADDRESS=address,
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(pid),
      PYTHONPATH=os.pathsep.join([tu.ROOT, os.path.join(tu.ROOT, "tests")]),
    )
    logs.append(os.path.join(workdir, f"log_{pid}.txt"))
    with open(logs[-1], "w") as log:
      procs.append(
        subprocess.Popen(
          [sys.executable, "-c", WORKER, data_dir, workdir],
          cwd=tu.ROOT,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
  for pid, (proc, log) in enumerate(zip(procs, logs, strict=True)):
    if proc.wait(timeout=600):
      with open(log) as f:
        pytest.fail(f"process {pid} failed:\n{f.read()[-5000:]}")


def _global_batches(config, steps):
  """The global batches of the two-process run: process 0's shard, then
  process 1's (per-process batch = half the global batch)."""
  shards = [
    tu.train_batches(
      config,
      steps,
      process_index=i,
      process_count=2,
      batch_size=config.input.global_batch_size // 2,
    )
    for i in range(2)
  ]
  return [
    {k: np.concatenate([a[k], b[k]]) for k in a}
    for a, b in zip(*shards, strict=True)
  ]


def test_two_processes_train_in_lockstep(straight, data_dir, tmp_path):
  """A job of two processes resumes the single-process reference run from
  its checkpoint 3 (each process from its own data shard's position) to the
  end. Both processes end with the same parameters, and each of their steps
  is one single-process step: from every checkpoint the job started from or
  wrote, a single process fed the global batch that both processes' shards
  make up reaches the job's logged loss and gradient norm (only the
  summation order differs). Whole trajectories are not compared: Adam
  amplifies summation-order differences of near-zero gradients."""
  workdir = str(tmp_path)
  tu.copy_checkpoint(straight, 3, workdir)
  _two_process_run(data_dir, workdir)
  params = [dict(np.load(f"{workdir}/params_{i}.npz")) for i in range(2)]
  tu.assert_trees_equal(params[0], params[1])
  assert os.path.exists(f"{workdir}/results.json")
  config = tu.make_config(data_dir, **{"mesh.data": 2})
  setup = tu.setup_for(config, jax.devices()[:2])
  batches = _global_batches(config, config.total_steps)
  logged = {
    r["step"]: r
    for r in writers.read_metrics(f"{workdir}/metrics.jsonl")
    if "train/loss" in r
  }
  saved = sorted(int(s) for s in os.listdir(f"{workdir}/checkpoints"))
  starts = {k: tu.restore(workdir, k, setup)[0] for k in saved[:-1]}
  step = model_state.jit_train_step(config, setup)
  for k, state in starts.items():
    batch = sharding.host_to_global(batches[k], setup.mesh)
    _, m = step(jax.device_put(state, setup.state_shardings), batch)
    for key in ("loss", "grad_norm"):
      np.testing.assert_allclose(
        m[key], logged[k + 1][f"train/{key}"], rtol=1e-4, err_msg=f"{k}"
      )
