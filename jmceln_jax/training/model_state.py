"""The model state: built from a config (model, mesh, optimiser, shardings),
initialised (random, then converted CLIP weights), and restored from a run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax

from jmceln_jax.models import clip as clip_lib
from jmceln_jax.models import jmceln
from jmceln_jax.ops import stacking, xla_options
from jmceln_jax.training import checkpoints, optim, sharding, steps

BEST_METRIC = "val/original/mIoU"
# Parameters that converted CLIP weights never provide: the whole decoder
# and the dense attention pool's new `connect` branch.
NEW_PARAMS = (r"(?!clip/).*", r"clip/visual/attnpool/connect.*")
TRAIN_FIELDS = ("image", "tokens", "target")


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before any array is materialised."""

  model: Any
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_fn: Any
  abstract_state: Any
  state_shardings: Any
  total_steps: int
  steps_per_epoch: int


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when launched as one (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a cluster JAX detects, e.g. SLURM or
  a TPU pod slice). A single process needs nothing."""
  cluster = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES")
  if (
    any(k in os.environ for k in cluster)
    and not jax.distributed.is_initialized()
  ):
    # jax reads the coordinator's address from the environment itself, but
    # not the process count and id (it only auto-detects known clusters).
    explicit = {
      arg: int(os.environ[var])
      for arg, var in (
        ("num_processes", "JAX_NUM_PROCESSES"),
        ("process_id", "JAX_PROCESS_ID"),
      )
      if var in os.environ
    }
    jax.distributed.initialize(**explicit)


def build_setup(
  config: ml_collections.ConfigDict,
  num_train_refs: int,
  devices: Sequence[jax.Device] | None = None,
) -> Setup:
  """Model, mesh, optimiser and the abstract, sharded train state.

  Args:
    config: the run's config.
    num_train_refs: refs of the training split (for steps per epoch).
    devices: the mesh's devices; default all (`jax.devices()`).
  """
  model = jmceln.build_model(config.model)
  mesh = sharding.create_mesh(config.mesh, devices)
  steps_per_epoch = max(num_train_refs // config.input.global_batch_size, 1)
  total = config.total_steps or config.num_epochs * steps_per_epoch
  dummy = steps.dummy_inputs(1, config.input.image_size, config.input.max_len)
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), *dummy
  )
  tx, schedule = optim.make_optimizer(config.optim, variables["params"], total)
  init_fn = functools.partial(
    steps.init_state,
    model=model,
    tx=tx,
    image_size=config.input.image_size,
    max_len=config.input.max_len,
  )
  # The state init_fn makes, without tracing the model a second time.
  abstract = jax.eval_shape(
    functools.partial(steps.state_from_variables, tx=tx),
    variables,
    jax.random.key(config.seed),
  )
  shardings = sharding.tree_shardings(abstract, mesh, config.shard_min_size)
  abstract = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
    abstract,
    shardings,
  )
  return Setup(
    model,
    mesh,
    tx,
    schedule,
    init_fn,
    abstract,
    shardings,
    total,
    steps_per_epoch,
  )


def load_clip_weights(
  state: steps.TrainState, clip_dir: str, config: ml_collections.ConfigDict
) -> steps.TrainState:
  """Merges converted CLIP weights (jmceln_jax.convert_clip output) strictly
  into params["clip"] and batch_stats["clip"]."""
  hparams = clip_lib.read_config(clip_dir)
  expected = {k: hparams[k] for k in config.model.clip}
  wanted = {k: config.model.clip[k] for k in config.model.clip}
  normalise = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples)
  if normalise(expected) != normalise(wanted):
    raise ValueError(
      f"The converted CLIP in {clip_dir} has hyperparameters {expected}, but "
      f"config.model.clip is {wanted}. Use a config for that CLIP variant."
    )
  _, variables = clip_lib.load_clip(clip_dir)
  host = jax.device_get(
    {"params": state.params, "batch_stats": state.batch_stats}
  )
  # Converted weights are unrolled (torch's layout); the model may scan.
  variables = {
    k: stacking.match_layout(v, host[k].get("clip", {}))
    for k, v in variables.items()
  }
  params = checkpoints.merge_params(
    variables["params"], host["params"], NEW_PARAMS, prefix="clip/"
  )
  stats = checkpoints.merge_params(
    variables.get("batch_stats", {}),
    host["batch_stats"],
    NEW_PARAMS,
    prefix="clip/",
  )
  shard = lambda tree, sh: jax.device_put(tree, sh)  # noqa: E731
  return state.replace(
    params=shard(params, jax.tree.map(lambda x: x.sharding, state.params)),
    batch_stats=shard(
      stats, jax.tree.map(lambda x: x.sharding, state.batch_stats)
    ),
  )


def initial_state(
  config: ml_collections.ConfigDict, setup: Setup
) -> steps.TrainState:
  """A fresh, sharded state: random init (seed `config.seed`), then the
  converted CLIP weights of `config.init.clip_dir` if set."""
  key = jax.random.key(config.seed)
  init = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)
  state = init.lower(key).compile(compiler_options=xla_options.FAST_COMPILE)(
    key
  )
  if config.init.clip_dir:
    state = load_clip_weights(state, config.init.clip_dir, config)
  return state


def jit_train_step(
  config: ml_collections.ConfigDict, setup: Setup
) -> Callable[..., tuple[steps.TrainState, dict[str, jax.Array]]]:
  """`steps.train_step` jitted over the mesh: (state, global batch) ->
  (state, replicated metrics); the input state is donated."""
  return jax.jit(
    functools.partial(
      steps.train_step,
      model=setup.model,
      tx=setup.tx,
      schedule=setup.schedule,
      loss_cfg=config.loss,
      accum_steps=config.optim.grad_accum_steps,
    ),
    in_shardings=(setup.state_shardings, sharding.batch_sharding(setup.mesh)),
    out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
    donate_argnums=(0,),
    compiler_options=xla_options.for_dtype(config.model.dtype),
  )


CONFIG_NAME = "config.json"


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config schema uses."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def check_workdir(workdir: str) -> None:
  """Raises FileNotFoundError (with what to do) if `workdir` is missing."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(
      f"Workdir {workdir} does not exist. Pass the --workdir of a training "
      "run (python -m jmceln_jax.train --config ... --workdir DIR)."
    )


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved as `<workdir>/config.json`.

  Returns:
    A locked ConfigDict (JSON lists turned back into tuples).
  """
  check_workdir(workdir)
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist; python -m jmceln_jax.train writes it when a "
      "run starts. Is this a training workdir?"
    )
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  config.lock()
  return config


CHECKPOINT_VALUES = "best, latest or a step number"


def is_checkpoint(value: str) -> bool:
  """Whether a --checkpoint value is best, latest or a step number."""
  return value in ("best", "latest") or value.isdigit()


def checkpoints_dir(workdir: str, checkpoint: str | int = "best") -> str:
  """`<workdir>/checkpoints`, after checking that it exists and that
  `checkpoint` is "best", "latest" or a step number (clear errors, before
  any slow work)."""
  if not is_checkpoint(str(checkpoint)):
    raise ValueError(
      f"checkpoint must be {CHECKPOINT_VALUES}; got {checkpoint!r}."
    )
  check_workdir(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"No checkpoints in {workdir} ({directory} does not exist); train "
      "first, or wait for the first checkpoint to be saved."
    )
  return directory


def restore_state(
  workdir: str, abstract_state: Any, checkpoint: str | int = "best"
) -> tuple[steps.TrainState, int, str]:
  """Restores one checkpoint of `<workdir>/checkpoints`.

  Args:
    workdir: a training run's directory.
    abstract_state: the TrainState's ShapeDtypeStructs with the shardings to
      restore onto (model_state.build_setup(...).abstract_state or a copy).
    checkpoint: "best" (highest validation mIoU; falls back to "latest",
      with a note, when no checkpoint carries validation metrics), "latest"
      or a step number.

  Returns:
    (state, step, which): which is "best", "latest" or "step".
  """
  which = str(checkpoint)
  ckpt = checkpoints.Checkpointer(
    checkpoints_dir(workdir, checkpoint),
    best_metric=BEST_METRIC,
    async_save=False,
    read_only=True,
  )
  try:
    if which == "best" and ckpt.all_steps() and ckpt.best_step() is None:
      print(
        "No checkpoint carries validation metrics yet; using the latest.",
        file=sys.stderr,
      )
      which = "latest"
    step = ckpt.resolve(int(which) if which.isdigit() else which)
    state, _ = ckpt.restore(step, abstract_state)
  finally:
    ckpt.close()
  return state, step, "step" if which.isdigit() else which
