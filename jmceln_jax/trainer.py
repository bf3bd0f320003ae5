"""The training loop, `train_and_evaluate(config, workdir)`.

Order of initialisation: the workdir's latest completed checkpoint (resume,
exact: state, RNG and data-iterator position), else converted CLIP weights
from `config.init.clip_dir` merged strictly into a fresh model, else random.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from jmceln_jax import (
  checkpointing,
  config_lib,
  evaluation,
  metrics,
  optim,
  paths,
  sharding,
  train_lib,
  visualize,
  writers,
  xla_options,
)
from jmceln_jax.data import datasets, pipeline
from jmceln_jax.models import clip as clip_lib
from jmceln_jax.models import jmceln, stacking

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
  dummy = train_lib.dummy_inputs(
    1, config.input.image_size, config.input.max_len
  )
  variables = jax.eval_shape(
    functools.partial(model.init, train=False), jax.random.key(0), *dummy
  )
  tx, schedule = optim.make_optimizer(config.optim, variables["params"], total)
  init_fn = functools.partial(
    train_lib.init_state,
    model=model,
    tx=tx,
    image_size=config.input.image_size,
    max_len=config.input.max_len,
  )
  # The state init_fn makes, without tracing the model a second time.
  abstract = jax.eval_shape(
    functools.partial(train_lib.state_from_variables, tx=tx),
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
  state: train_lib.TrainState, clip_dir: str, config: ml_collections.ConfigDict
) -> train_lib.TrainState:
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
  params = checkpointing.merge_params(
    variables["params"], host["params"], NEW_PARAMS, prefix="clip/"
  )
  stats = checkpointing.merge_params(
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
) -> train_lib.TrainState:
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
) -> Callable[..., tuple[train_lib.TrainState, dict[str, jax.Array]]]:
  """`train_lib.train_step` jitted over the mesh: (state, global batch) ->
  (state, replicated metrics); the input state is donated."""
  return jax.jit(
    functools.partial(
      train_lib.train_step,
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


def _log_line(step, total, epoch, scalars, rate, eta) -> str:
  return (
    f"step {step}/{total} | epoch {epoch:.2f} | loss {scalars['loss']:.4f} | "
    f"lr {scalars['lr']:.3g} | {rate:.1f} samples/s | ETA {_hms(eta)}"
  )


def _hms(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


class _Pending:
  """Per-step device metrics, fetched at log points; stops on NaN/Inf."""

  def __init__(self, checkpoint_dir: str, ckpt: checkpointing.Checkpointer):
    self.items: list[tuple[int, dict]] = []
    self.ckpt, self.dir = ckpt, checkpoint_dir

  def add(self, step: int, m: dict) -> None:
    self.items.append((step, m))

  def fetch(self) -> dict[str, float]:
    """Means of the pending metrics; raises at the first step whose loss or
    updated parameters (their norm) are not finite: a finite loss can still
    come with NaN gradients, and that step's parameters must not be saved."""
    host = jax.device_get(self.items)
    self.items = []
    for step, m in host:
      if not (np.isfinite(m["loss"]) and np.isfinite(m["param_norm"])):
        self.ckpt.wait()
        raise FloatingPointError(
          f"Training diverged at step {step} (loss {m['loss']}, parameter "
          f"norm after the update {m['param_norm']}); stopping. The last "
          f"good checkpoint (step {self.ckpt.latest_step()}) is kept in "
          f"{self.dir}. Lower --config.optim.lr or set "
          "--config.optim.grad_clip_norm."
        )
    if not host:
      return {}
    return {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> train_lib.TrainState:
  """Trains, validates, checkpoints and finally tests; returns the state.

  `workdir` and the config's paths may be relative (paths.absolute); the
  run's config.json records them absolute.
  """
  workdir, config = paths.absolute(workdir), paths.absolute_config(config)
  maybe_initialize_distributed()
  is_main = jax.process_index() == 0
  jmceln.build_model(config.model)  # Checks the model fields first.
  config_lib.check_training(config)
  data_dir = datasets.resolve_data_dir(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg_in = config.input
  for split in (cfg_in.val_split, *cfg_in.test_splits):
    side, ref = pipeline.largest_image(data_dir, split)
    if side > cfg_in.max_eval_size:  # Found now, not after training.
      raise config_lib.ConfigError(
        f"Split {split!r} has an image of side {side} (ref {ref}), larger "
        f"than the evaluation canvas input.max_eval_size="
        f"{cfg_in.max_eval_size}; set --config.input.max_eval_size={side}."
      )
  setup = build_setup(config, pipeline.num_refs(data_dir, cfg_in.train_split))
  mesh, total = setup.mesh, setup.total_steps
  per_process = sharding.per_process_batch_size(cfg_in.global_batch_size, mesh)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpointing.Checkpointer(
    ckpt_dir, keep=config.keep_checkpoints, best_metric=BEST_METRIC
  )
  train_iter = iter(
    pipeline.train_dataset(
      data_dir,
      cfg_in.train_split,
      image_size=cfg_in.image_size,
      max_len=cfg_in.max_len,
      batch_size=per_process,
      seed=config.seed,
      vocab=cfg_in.vocab,
      num_workers=cfg_in.num_workers,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      augment=cfg_in.augment,
    )
  )
  latest = ckpt.latest_step()
  if latest is not None:
    state, data_state = ckpt.restore(latest, setup.abstract_state)
    train_iter.set_state(data_state["train"])
    print(f"Resumed from {ckpt_dir} at step {latest}.")
  else:
    state = initial_state(config, setup)
  if is_main:
    writers.write_text(
      os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
    )
  print(
    f"{jax.device_count()} devices, mesh {dict(mesh.shape)}; global batch "
    f"{cfg_in.global_batch_size} = {cfg_in.global_batch_size // mesh.devices.size}"
    f" per device; {setup.steps_per_epoch} steps/epoch, {total} steps."
  )
  p_train = jit_train_step(config, setup)
  evaluator = evaluation.Evaluator(
    setup.model,
    mesh,
    setup.state_shardings,
    cfg_in,
    previews=config.get("val_previews", 0),  # Older configs lack it.
  )
  writer = writers.MetricWriter(workdir, enabled=is_main)
  pending = _Pending(ckpt_dir, ckpt)
  step = int(jax.device_get(state.step))
  t_last, step_last = time.time(), step
  while step < total:
    host = next(train_iter)
    batch = sharding.host_to_global({k: host[k] for k in TRAIN_FIELDS}, mesh)
    state, m = p_train(state, batch)
    step += 1
    pending.add(step, m)
    epoch_end = step % setup.steps_per_epoch == 0
    do_eval = step == total or (
      epoch_end
      and (step // setup.steps_per_epoch) % config.eval_every_epochs == 0
    )
    do_ckpt = do_eval or step % config.checkpoint_every_steps == 0
    if step % config.log_every_steps == 0 or do_ckpt:
      scalars = pending.fetch()
      now = time.time()
      rate = (step - step_last) * cfg_in.global_batch_size / (now - t_last)
      eta = (total - step) * (now - t_last) / max(step - step_last, 1)
      t_last, step_last = now, step
      writer.write_scalars(
        step,
        {f"train/{k}": v for k, v in scalars.items()}
        | {
          "train/samples_per_sec": rate,
          "train/epoch": step / setup.steps_per_epoch,
        },
      )
      if is_main:
        print(
          _log_line(
            step, total, step / setup.steps_per_epoch, scalars, rate, eta
          )
        )
    ckpt_metrics = None
    if do_eval:
      result = evaluator.run(state, data_dir, cfg_in.val_split)
      ckpt_metrics = _scalars(result, "val")
      writer.write_scalars(step, ckpt_metrics)
      if "previews" in result:
        writer.write_images(
          step, {"val/predictions": visualize.preview_grid(result["previews"])}
        )
      if is_main:
        print(metrics.format_table(evaluation.table_rows([result])))
      t_last = time.time()  # Evaluation time is not training throughput.
    if do_ckpt:
      ckpt.save(
        step, state, {"train": train_iter.get_state()}, metrics=ckpt_metrics
      )
  ckpt.wait()
  writer.close()
  if is_main:
    writers.plot_curves(
      writers.read_metrics(os.path.join(workdir, "metrics.jsonl")),
      ("train/loss", "train/lr", BEST_METRIC),
      os.path.join(workdir, "curves.png"),
    )
  evaluation.final_evaluation(
    config, workdir, setup.abstract_state, ckpt, evaluator, data_dir
  )
  ckpt.close()
  return state


def _scalars(result: dict[str, Any], prefix: str) -> dict[str, float]:
  return {
    f"{prefix}/{c}/{k}": float(result[c][k])
    for c in metrics.CONVENTIONS
    for k in metrics.COLUMNS
  }
