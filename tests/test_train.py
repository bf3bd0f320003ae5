"""The training loop in process: artifacts, exact resume, the divergence
guard, one compile per run, sharding equivalence, the CLIP merge and every
shipped config's abstract state. See tests/train_utils.py for the shared
config, dataset and reference run."""

import functools
import glob
import importlib
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import train_utils as tu
from flax import traverse_util
from PIL import Image

from jmceln_jax import config_lib
from jmceln_jax.models import clip as clip_lib
from jmceln_jax.ops import stacking
from jmceln_jax.training import checkpoints, loop, model_state, sharding, steps
from jmceln_jax.utils import writers

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tu.prepared_data(tmp_path_factory)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  return tu.straight_run(tmp_path_factory)


@pytest.fixture(scope="module")
def setup(data_dir):
  return tu.setup_for(tu.make_config(data_dir))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _train_losses(workdir):
  return {
    r["step"]: r["train/loss"]
    for r in writers.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    if "train/loss" in r
  }


def _checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(f"{workdir}/checkpoints"))


def test_run_writes_every_artifact(straight, setup):
  epoch = setup.steps_per_epoch
  assert epoch < 8, "the dataset grew: the run no longer ends an epoch"
  evals = sorted({*range(epoch, 9, epoch), 8})
  assert _checkpoint_steps(straight) == sorted({3, 6, *evals})
  records = writers.read_metrics(f"{straight}/metrics.jsonl")
  assert sorted(_train_losses(straight)) == list(range(1, 9))
  assert [r["step"] for r in records if model_state.BEST_METRIC in r] == evals
  (events,) = glob.glob(f"{straight}/tensorboard/events.out.tfevents.*")
  with open(events, "rb") as f:  # Scalars and the validation previews.
    data = f.read()
  assert b"train/loss" in data and data.count(b"val/predictions") == len(evals)
  config = _read_json(f"{straight}/config.json")
  assert config["total_steps"] == 8 and config["model"]["use_pan"] is False
  with Image.open(f"{straight}/curves.png") as img:
    assert img.format == "PNG" and img.height > img.width
  results = _read_json(f"{straight}/results.json")
  assert results["checkpoint"]["which"] == "best"
  assert results["checkpoint"]["step"] in evals
  assert [r["original"]["split"] for r in results["results"]] == [
    "testA",
    "testB",
  ]
  # The synthetic data records kinds: per-kind scores, also under eval/.
  by_kind = results["by_kind"]
  assert set(by_kind) == {"testA", "testB"}
  for split, r in zip(("testA", "testB"), results["results"], strict=True):
    n = sum(k["expressions"] for k in by_kind[split].values())
    assert n == r["original"]["expressions"]
  step = results["checkpoint"]["step"]
  saved = _read_json(f"{straight}/eval/by_kind-{step}.json")
  assert saved["by_kind"] == by_kind
  assert not glob.glob(f"{straight}/**/*.tmp", recursive=True)


def test_train_step_compiles_once_per_run(straight):
  counts = _read_json(f"{straight}/compiles.json")
  assert counts["train_step"] == 1
  assert counts["_eval_fn"] == 1


def test_resume_is_bitwise_exact(straight, data_dir, setup, tmp_path):
  """Stopped after checkpoint 3 (a copy of the reference run's), resumed:
  the same batches and bitwise the same states as the uninterrupted run."""
  workdir = str(tmp_path)
  tu.copy_checkpoint(straight, 3, workdir)
  with tu.count_compiles() as counts:
    loop.train_and_evaluate(tu.make_config(data_dir), workdir)
  assert counts["train_step"] == 1
  assert _checkpoint_steps(workdir) == _checkpoint_steps(straight)
  for step in _checkpoint_steps(straight):
    state, data = tu.restore(workdir, step, setup)
    ref_state, ref_data = tu.restore(straight, step, setup)
    assert data == ref_data, f"data iterator differs at step {step}"
    tu.assert_trees_equal(state, ref_state)
  # Steps 4-8 saw the same batches, across the epoch boundary.
  resumed, ref = _train_losses(workdir), _train_losses(straight)
  assert [resumed[s] for s in range(4, 9)] == [ref[s] for s in range(4, 9)]


def _corrupt_adam(state):
  """Negative second moments: the next update, and so the parameters, are
  NaN although that step's loss (computed before the update) is finite."""

  def corrupt(path, x):
    is_nu = any(getattr(p, "name", None) == "nu" for p in path)
    return -np.ones_like(x) if is_nu else x

  return state.replace(
    opt_state=jax.tree_util.tree_map_with_path(corrupt, state.opt_state)
  )


def test_divergence_stops_before_saving(straight, data_dir, setup, tmp_path):
  state, data = tu.restore(straight, 3, setup)
  ckpt_dir = str(tmp_path / "checkpoints")
  ckpt = checkpoints.Checkpointer(ckpt_dir, async_save=False)
  ckpt.save(3, _corrupt_adam(state), data)
  ckpt.close()
  with pytest.raises(FloatingPointError, match=r"diverged at step 4 .*nan"):
    loop.train_and_evaluate(tu.make_config(data_dir), str(tmp_path))
  ckpt = checkpoints.Checkpointer(ckpt_dir, read_only=True)
  assert ckpt.all_steps() == [3]


def test_small_eval_canvas_is_refused_before_training(data_dir, tmp_path):
  config = tu.make_config(data_dir, **{"input.max_eval_size": 64})
  with pytest.raises(config_lib.ConfigError, match=r"max_eval_size=\d+\.$"):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_non_finite_loss_names_its_step(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(7, {"w": np.zeros(2)}, {})
  pending = loop._Pending(str(tmp_path), ckpt)
  for step, loss in ((8, 0.5), (9, np.inf), (10, np.nan)):
    pending.add(step, {"loss": np.float32(loss), "param_norm": np.float32(1)})
  with pytest.raises(FloatingPointError, match=r"step 9 \(loss inf.*step 7"):
    pending.fetch()


def _steps_on_mesh(config, devices, init, batches):
  """Trains from host state `init` on `devices`.

  Returns:
    (final host state, per-step host metrics, batch_stats after step 1,
    partition specs of the state).
  """
  setup = tu.setup_for(config, devices)
  step = model_state.jit_train_step(config, setup)
  state = jax.device_put(init, setup.state_shardings)
  metrics = []
  for batch in batches:
    state, m = step(state, sharding.host_to_global(batch, setup.mesh))
    metrics.append(jax.device_get(m))
    if len(metrics) == 1:
      first_stats = jax.device_get(state.batch_stats)
  specs = [s.spec for s in jax.tree.leaves(setup.state_shardings)]
  return jax.device_get(state), metrics, first_stats, specs


def test_device_count_and_fsdp_do_not_change_training(
  straight, data_dir, setup
):
  """Only the floating-point summation order differs between meshes (the
  BatchNorm statistics of a sharded batch are global under jit): the first
  step's loss and statistics agree to 1e-5, its gradient norm to 1e-4 (XLA's
  CPU convolutions block their sums by shape and by the CPU's vector width,
  and FSDP's shapes differ: 2 devices were 6.6e-5 off on one 2-core
  machine, under 3e-5 on another).
  Adam then turns the tiny differences of near-zero gradients into updates
  of up to +-lr, so later steps' losses agree to 1e-3 (2.7e-4 seen) and the
  parameters to 2 * lr * steps."""
  config = tu.make_config(data_dir)
  init = jax.device_get(model_state.initial_state(config, setup))
  batches = tu.train_batches(config, 3)
  devices = jax.devices()
  ref, ref_m, ref_stats, _ = _steps_on_mesh(config, devices, init, batches)
  # The harness reproduces the trainer's own run.
  tu.assert_trees_equal(ref.params, tu.restore(straight, 3, setup)[0].params)
  meshes = {
    "1 device": (tu.make_config(data_dir, **{"mesh.data": 1}), devices[:1]),
    "2 devices": (tu.make_config(data_dir, **{"mesh.data": 2}), devices[:2]),
    "fsdp 2x4": (
      tu.make_config(
        data_dir, **{"mesh.data": 2, "mesh.fsdp": 4, "shard_min_size": 256}
      ),
      devices,
    ),
  }
  bound = 2 * config.optim.lr * len(batches)
  for name, (cfg, devs) in meshes.items():
    state, m, stats, specs = _steps_on_mesh(cfg, devs, init, batches)
    if name.startswith("fsdp"):
      assert sum("fsdp" in spec for spec in specs) > 50, name
    close = functools.partial(np.testing.assert_allclose, err_msg=name)
    close(m[0]["loss"], ref_m[0]["loss"], rtol=1e-5)
    close(m[0]["grad_norm"], ref_m[0]["grad_norm"], rtol=1e-4)
    jax.tree.map(
      functools.partial(close, rtol=1e-5, atol=1e-6), stats, ref_stats
    )
    close([x["loss"] for x in m], [x["loss"] for x in ref_m], rtol=1e-3)
    jax.tree.map(functools.partial(close, atol=bound), state.params, ref.params)


def _write_clip(directory, variables, hparams):
  """A converted-CLIP directory in jmceln_jax.convert_clip's format."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(
      os.path.join(directory, clip_lib.CHECKPOINT_SUBDIR), variables
    )
  config = dict(hparams, vision_layers=list(hparams["vision_layers"]))
  with open(os.path.join(directory, clip_lib.CONFIG_FILE), "w") as f:
    json.dump(dict(config, source_file="fake.pt"), f)
  return str(directory)


def _edit(tree, drop=None, add=None):
  flat = traverse_util.flatten_dict(tree, sep="/")
  flat.pop(drop, None)
  if add:
    flat[add] = np.zeros(3, np.float32)
  return traverse_util.unflatten_dict(flat, sep="/")


def test_clip_weights_merge_strictly(straight, data_dir, setup, tmp_path):
  config = tu.make_config(data_dir)
  state = jax.device_put(
    tu.restore(straight, 8, setup)[0], setup.state_shardings
  )
  host = jax.device_get(state)
  # The model scans the text layers; converted weights are unrolled.
  assert (
    stacking.SCANNED in host.params["clip"]["text"]["transformer"]["resblocks"]
  )
  rng = np.random.default_rng(0)
  scanned = {
    "params": jax.tree.map(
      lambda x: rng.standard_normal(x.shape).astype(x.dtype),
      host.params["clip"],
    ),
    "batch_stats": jax.tree.map(np.ones_like, host.batch_stats["clip"]),
  }
  hparams = dict(config.model.clip)
  unrolled = clip_lib.abstract_variables(clip_lib.CLIP(**hparams))
  clip = {k: stacking.match_layout(v, unrolled[k]) for k, v in scanned.items()}
  chex.assert_trees_all_equal_shapes(clip["params"], unrolled["params"])
  good = _write_clip(tmp_path / "good", clip, hparams)
  loaded = jax.device_get(model_state.load_clip_weights(state, good, config))
  tu.assert_trees_equal(loaded.params["clip"], scanned["params"])
  tu.assert_trees_equal(loaded.batch_stats["clip"], scanned["batch_stats"])
  tu.assert_trees_equal(loaded.params["head"], host.params["head"])
  drop = "text/ln_final/scale"
  missing = dict(clip, params=_edit(clip["params"], drop=drop))
  with pytest.raises(ValueError, match=rf"missing[\s\S]*clip/{drop}"):
    model_state.load_clip_weights(
      state, _write_clip(tmp_path / "missing", missing, hparams), config
    )
  extra = dict(clip, params=_edit(clip["params"], add="visual/extra/bias"))
  with pytest.raises(ValueError, match=r"unexpected[\s\S]*clip/visual/extra"):
    model_state.load_clip_weights(
      state, _write_clip(tmp_path / "extra", extra, hparams), config
    )
  other = dict(hparams, transformer_layers=hparams["transformer_layers"] + 1)
  with pytest.raises(ValueError, match="hyperparameters"):
    model_state.load_clip_weights(
      state, _write_clip(tmp_path / "other", clip, other), config
    )


def _shipped_configs():
  names = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(tu.ROOT, "configs", "*.py"))
  )
  cases = [(n, None) for n in names if n != "refcoco"]
  cases += [("refcoco", v) for v in sorted(config_lib.VARIANTS)]
  return cases


@pytest.mark.parametrize("name,variant", _shipped_configs())
def test_shipped_config_builds_abstractly(name, variant):
  config = importlib.import_module(f"configs.{name}").get_config(variant)
  before = {id(x) for x in jax.live_arrays()}
  with tu.count_compiles() as counts:
    setup = model_state.build_setup(config, num_train_refs=1000)
  new = [x for x in jax.live_arrays() if id(x) not in before]
  assert sum(x.nbytes for x in new) < 2**20, "build_setup allocated arrays"
  assert not counts["init"] and not counts["init_state"], counts
  leaves = jax.tree.leaves(setup.abstract_state)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert all(x.sharding is not None for x in leaves)
  n_params = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  assert n_params > (1e8 if name.startswith("refcoco") else 1e5)


class _Toy(nn.Module):
  """Per-pixel logits, linear in the (optionally batch-normalised) image,
  plus a per-sentence bias: stands in for JMCELN in `train_step`."""

  norm: bool = False

  @nn.compact
  def __call__(self, images, tokens, *, train):
    if self.norm:
      images = nn.BatchNorm(use_running_average=not train, momentum=0.9)(images)
    logits = nn.Dense(2)(images)
    return logits + nn.Embed(64, 2)(tokens).mean(1)[:, None, None], {}


def _toy_step(norm, accum_steps):
  """One SGD(lr=1) step, so that new params = params - gradients."""
  rng = np.random.default_rng(0)
  batch = {
    "image": rng.standard_normal((4, 4, 4, 3)).astype(np.float32),
    "tokens": rng.integers(0, 64, (4, 5)).astype(np.int32),
    "target": rng.integers(0, 2, (4, 4, 4)).astype(np.uint8),
  }
  model, tx = _Toy(norm), optax.sgd(1.0)
  variables = model.init(
    jax.random.key(0), batch["image"], batch["tokens"], train=False
  )
  state = steps.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=variables["params"],
    batch_stats=variables.get("batch_stats", {}),
    opt_state=tx.init(variables["params"]),
    rng=jnp.zeros(2, jnp.uint32),
  )
  step = functools.partial(
    steps.train_step,
    model=model,
    tx=tx,
    schedule=optax.constant_schedule(1.0),
    loss_cfg=config_lib.base_config().loss,
    accum_steps=accum_steps,
  )
  return batch, jax.device_get(jax.jit(step)(state, batch))


def test_accumulated_gradients_equal_the_full_batch_gradient():
  # Without batch statistics, the mean of the micro-batch losses is the
  # full-batch loss, so the gradients (= the SGD update) agree.
  _, (full, full_m) = _toy_step(norm=False, accum_steps=1)
  _, (accum, accum_m) = _toy_step(norm=False, accum_steps=2)
  chex.assert_trees_all_close(accum.params, full.params, rtol=1e-5, atol=1e-6)
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(accum_m[key], full_m[key], rtol=1e-5)
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps=3"):
    _toy_step(norm=False, accum_steps=3)


def test_accumulation_updates_batch_stats_per_interleaved_microbatch():
  # Micro-batch k holds examples k, k+2 (each spread over all devices);
  # the running mean (momentum 0.9, from 0) takes them in order.
  batch, (state, _) = _toy_step(norm=True, accum_steps=2)

  def running_mean(first, second):
    return 0.09 * first.mean((0, 1, 2)) + 0.1 * second.mean((0, 1, 2))

  images = batch["image"]
  mean = state.batch_stats["BatchNorm_0"]["mean"]
  expected = running_mean(images[0::2], images[1::2])
  np.testing.assert_allclose(mean, expected, rtol=1e-5, atol=1e-7)
  contiguous = running_mean(images[:2], images[2:])
  assert not np.allclose(expected, contiguous, rtol=1e-3)
