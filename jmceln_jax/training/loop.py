"""The training loop, `train_and_evaluate(config, workdir)`.

Order of initialisation: the workdir's latest completed checkpoint (resume,
exact: state, RNG and data-iterator position), else converted CLIP weights
from `config.init.clip_dir` merged strictly into a fresh model, else random.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from jmceln_jax import config_lib
from jmceln_jax.data import datasets, pipeline
from jmceln_jax.evaluation import metrics, scoring, visualize
from jmceln_jax.models import jmceln
from jmceln_jax.training import checkpoints, model_state, sharding, steps
from jmceln_jax.utils import paths, writers


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

  def __init__(self, checkpoint_dir: str, ckpt: checkpoints.Checkpointer):
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
) -> steps.TrainState:
  """Trains, validates, checkpoints and finally tests; returns the state.

  `workdir` and the config's paths may be relative (paths.absolute); the
  run's config.json records them absolute.
  """
  workdir, config = paths.absolute(workdir), paths.absolute_config(config)
  model_state.maybe_initialize_distributed()
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
  setup = model_state.build_setup(
    config, pipeline.num_refs(data_dir, cfg_in.train_split)
  )
  mesh, total = setup.mesh, setup.total_steps
  per_process = sharding.per_process_batch_size(cfg_in.global_batch_size, mesh)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = checkpoints.Checkpointer(
    ckpt_dir, keep=config.keep_checkpoints, best_metric=model_state.BEST_METRIC
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
    state = model_state.initial_state(config, setup)
  if is_main:
    writers.write_text(
      os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2)
    )
  print(
    f"{jax.device_count()} devices, mesh {dict(mesh.shape)}; global batch "
    f"{cfg_in.global_batch_size} = {cfg_in.global_batch_size // mesh.devices.size}"
    f" per device; {setup.steps_per_epoch} steps/epoch, {total} steps."
  )
  p_train = model_state.jit_train_step(config, setup)
  evaluator = scoring.Evaluator(
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
    batch = sharding.host_to_global(
      {k: host[k] for k in model_state.TRAIN_FIELDS}, mesh
    )
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
        print(metrics.format_table(scoring.table_rows([result])))
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
      ("train/loss", "train/lr", model_state.BEST_METRIC),
      os.path.join(workdir, "curves.png"),
    )
  scoring.final_evaluation(
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
