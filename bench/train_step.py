r"""The full JMCELN training step: speed, FLOPs, MFU, compile time, memory.

  python -m bench.train_step --config configs/refcoco.py --per_device_batch 1 \
      --dtype float32,bfloat16 --json bench_train_step.json

For each compute dtype (`config.model.dtype`; parameters stay float32), and
each --scan_layers setting when given (`--scan_layers true,false` compares
scanned and unrolled CLIP blocks side by side), it runs the trainer's exact
step (`model_state.build_setup` + `model_state.jit_train_step`: loss, gradients, the
config's optimiser, mesh and sharding, donated state) from a random init on a
random batch of --per_device_batch examples per device, and reports:

- compile time, per-device memory (arguments + outputs + temporaries -
  aliased) and FLOPs per sample, all from `jmceln_jax.costs.train_step_cost`
  (XLA's memory and cost analysis of the compiled step: what
  `python -m jmceln_jax.summary` prints);
- the first step's time (it runs the executable compiled for the cost
  analysis, `summary.compile_train_step`: no second compile), then the median step
  time over --steps steps after --warmup steps, as steps/s and samples/s;
- achieved FLOP/s per device and MFU: achieved / the peak matmul FLOP/s of
  the same dtype measured in the same run on the same device (a jitted
  square matmul, --matmul_size, FLOPs from its own cost analysis), taken
  right before and right after each setting's steps; MFU divides by the
  higher of the two, so a busy moment at either end cannot inflate it.

Runs on JAX's default backend (a GPU when there is one). On CPU the paper
config takes tens of seconds per example and step, hence the small default
batch. `--tiny` runs configs/tiny.py (minutes on 2 CPU cores).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from bench import common
from jmceln_jax.training import costs, model_state, sharding
from jmceln_jax.utils import cli_flags

_PACKAGES = common.JAX_PACKAGES
_MATMUL_WARMUP, _MATMUL_REPEATS = 1, 5
_CONFIGS = {
  False: os.path.join(common.ROOT, "configs", "refcoco.py"),
  True: os.path.join(common.ROOT, "configs", "tiny.py"),
}
_TINY = dict(
  per_device_batch=2,
  steps=2,
  warmup=1,
  matmul_size=256,
)
# costs.train_step_cost's memory entries -> JSON keys.
_MEMORY = {
  "arguments (GiB)": "arguments",
  "outputs (GiB)": "outputs",
  "temporaries (GiB)": "temporaries",
  "aliased (GiB)": "aliased",
  "peak estimate (GiB)": "peak",
}


def matmul_peak(size: int, dtype: str, device: jax.Device) -> dict[str, Any]:
  """Throughput of a jitted [size, size] @ [size, size] in `dtype`.

  Returns:
    {"size", "gflops" (XLA's count), "median_ms", "min_ms", "repeats",
    "tflops_per_s" (at the median)}.
  """
  rng = np.random.default_rng(0)
  a, b = (
    jax.device_put(rng.standard_normal((size, size)).astype(dtype), device)
    for _ in range(2)
  )
  compiled = jax.jit(lambda x, y: x @ y).lower(a, b).compile()
  stats = common.time_calls(
    lambda: jax.block_until_ready(compiled(a, b)),
    warmup=_MATMUL_WARMUP,
    repeats=_MATMUL_REPEATS,
  )
  flops = common.xla_flops(compiled)
  return dict(
    stats,
    size=size,
    gflops=flops / 1e9,
    tflops_per_s=flops / stats["median_ms"] / 1e9,
  )


def step_config(
  config: ml_collections.ConfigDict,
  *,
  dtype: str,
  remat: bool | None,
  global_batch: int,
  scan_layers: bool | None = None,
) -> ml_collections.ConfigDict:
  """A copy of `config` with the compute dtype, the global batch and, unless
  None, remat and scan_layers."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  if remat is not None:
    config.model.remat = remat
  if scan_layers is not None:
    config.model.scan_layers = scan_layers
  config.input.global_batch_size = global_batch
  return config


def random_batch(
  config: ml_collections.ConfigDict, batch: int, seed: int
) -> dict[str, np.ndarray]:
  """A host training batch like the pipeline's, with random content.

  Returns:
    "image" [B, S, S, 3] uint8, "tokens" [B, L] int32, "target" [B, S, S]
    uint8 in {0, 1}.
  """
  rng = np.random.default_rng(seed)
  size = config.input.image_size
  return dict(
    image=rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
    tokens=common.random_tokens(
      rng, batch, config.input.max_len, config.model.clip.vocab_size
    ),
    target=rng.integers(0, 2, (batch, size, size), dtype=np.uint8),
  )


def measure_step(
  config: ml_collections.ConfigDict,
  devices: Sequence[jax.Device],
  *,
  steps: int,
  warmup: int,
  seed: int,
  peak: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
  """Cost analysis, then timed steps of the trainer's step for `config`,
  with peak() (a matmul_peak) measured right before and right after them.

  Returns:
    {"compile_s", "first_step_s", "step": time_calls stats, "gflops_per_step"
    (all devices), "gflops_per_sample", "memory_gib": per device, "loss"
    (the last step's, a sanity check), "matmul": {"before", "after"}}.
  """
  setup, step, seconds = costs.compile_train_step(config, devices)
  cost = costs.train_step_cost(config, devices, (setup, step, seconds))
  global_batch = config.input.global_batch_size
  state = model_state.initial_state(config, setup)
  batch = sharding.host_to_global(
    random_batch(config, global_batch, seed), setup.mesh
  )
  last = {"state": state}

  def one_step():
    last["state"], last["metrics"] = step(last["state"], batch)
    jax.block_until_ready((last["state"], last["metrics"]))

  before = peak()
  start = time.perf_counter()
  one_step()
  first = time.perf_counter() - start
  stats = common.time_calls(one_step, warmup=warmup, repeats=steps)
  after = peak()
  return dict(
    compile_s=cost["compile time (s)"],
    first_step_s=first,
    step=stats,
    gflops_per_step=cost["GFLOPs per step"],
    gflops_per_sample=cost["GFLOPs per image"],
    memory_gib={v: cost[k] for k, v in _MEMORY.items()},
    loss=float(jax.device_get(last["metrics"]["loss"])),
    matmul=dict(before=before, after=after),
  )


def run(args: flags.FlagValues) -> dict[str, Any]:
  """Measures the step for every setting, between two matmul peaks."""
  base = common.load_config(args.config)
  devices = costs.select_devices(args.devices)
  n = len(devices)
  global_batch = args.per_device_batch * n
  table = common.Table(
    [
      ("dtype", "step dtype", "s"),
      ("remat", "remat", ""),
      ("scan_layers", "scan", ""),
      ("global_batch", "batch", "d"),
      ("compile_s", "compile s", ".1f"),
      ("first_step_s", "1st step s", ".1f"),
      ("step_ms", "step ms", ".1f"),
      ("samples_per_s", "samples/s", ".3g"),
      ("gflops_per_sample", "GFLOP/sample", ".4g"),
      ("achieved", "TFLOP/s/dev", ".3f"),
      ("peak", "peak TFLOP/s", ".3f"),
      ("mfu_percent", "MFU %", ".1f"),
      ("peak_gib", "GiB/dev", ".2f"),
    ]
  )
  table.header()
  results = []
  settings = [(d, s) for d in args.dtype for s in args.scan_layers or [None]]
  for dtype, scan in settings:
    config = step_config(
      base,
      dtype=dtype,
      remat=args.remat,
      global_batch=global_batch,
      scan_layers=scan,
    )
    r = measure_step(
      config,
      devices,
      steps=args.steps,
      warmup=args.warmup,
      seed=args.seed,
      peak=functools.partial(matmul_peak, args.matmul_size, dtype, devices[0]),
    )
    peak = max(m["tflops_per_s"] for m in r["matmul"].values())
    step_s = r["step"]["median_ms"] / 1e3
    achieved = r["gflops_per_step"] / n / step_s / 1e3  # TFLOP/s per device
    r.update(
      dtype=dtype,
      remat=config.model.remat,
      scan_layers=config.model.scan_layers,
      devices=n,
      global_batch=global_batch,
      steps_per_s=1 / step_s,
      samples_per_s=global_batch / step_s,
      achieved_tflops_per_device=achieved,
      peak_tflops_per_device=peak,
      mfu=achieved / peak,
    )
    results.append(r)
    table.row(
      dict(
        r,
        step_ms=r["step"]["median_ms"],
        achieved=achieved,
        peak=peak,
        mfu_percent=100 * r["mfu"],
        peak_gib=r["memory_gib"]["peak"],
      )
    )
  return dict(
    settings=cli_flags.values(args, exclude=("json",)),
    model=dict(
      image_size=base.input.image_size,
      max_len=base.input.max_len,
      mesh=dict(base.mesh),
      grad_accum_steps=base.optim.grad_accum_steps,
    ),
    results=results,
  )


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "config",
    None,
    "Config file[:variant] (default: configs/refcoco.py, with --tiny "
    "configs/tiny.py), e.g. configs/refcoco.py:wo_pan.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "per_device_batch",
    1,
    "Examples per device and step (the paper: 10 on an A100).",
    lower_bound=1,
    flag_values=fv,
  )
  cli_flags.define_choices(
    fv,
    "dtype",
    ["float32", "bfloat16"],
    "Compute dtypes (config.model.dtype), comma-separated.",
    {"float32": "float32", "bfloat16": "bfloat16"},
  )
  flags.DEFINE_bool(
    "remat",
    None,
    "Rematerialise the cascade stages (config.model.remat; default: the config's).",
    flag_values=fv,
  )
  cli_flags.define_choices(
    fv,
    "scan_layers",
    None,
    "Scan CLIP's identical blocks (config.model.scan_layers), comma-separated "
    "for rows side by side, e.g. true,false (default: the config's).",
    {"true": True, "false": False},
  )
  flags.DEFINE_integer(
    "devices",
    None,
    "Devices of the mesh (default: all of JAX's default backend).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "steps", 3, "Timed steps.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "warmup", 1, "Untimed steps after the first.", lower_bound=0, flag_values=fv
  )
  flags.DEFINE_integer(
    "matmul_size",
    None,
    "Side of the peak-FLOP/s matmul (default: 2048 on CPU, else 8192).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Batch contents.", flag_values=fv)


def parse_args(argv: Sequence[str] | None) -> flags.FlagValues:
  """The command-line flags (see the module docstring)."""
  args = common.parse_flags(
    argv,
    _define,
    module="bench.train_step",
    doc=__doc__,
    tiny_help="configs/tiny.py smoke run",
    tiny=_TINY,
  )
  args.config = args.config or _CONFIGS[args.tiny]
  if args.matmul_size is None:
    args.matmul_size = 2048 if jax.default_backend() == "cpu" else 8192
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = parse_args(argv)

  return common.report(
    common.hardware(_PACKAGES) | common.jax_devices(),
    f"{args.config}, {args.per_device_batch} per device; median of "
    f"{args.steps} steps",
    lambda: run(args),
    args.json,
  )


if __name__ == "__main__":
  sys.exit(main())
