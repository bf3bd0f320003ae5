r"""The decoder's position probe: does JMCELN's decoder ground position words
on a map where padding is a weak cue?

  python -m bench.position_probe --side 28 --seeds 0,1 \
      --json runs/position_probe.json

trains the decoder alone (JMCELNDecoder, a small width) with Adam on
synthetic encoder features: three identical blobs in a row, horizontal or
vertical, centred on a SIDE x SIDE map (the paper's 416 px gives 52, the
position-probe config's 224 px 28); the sentence feature is one fixed vector
per word (left, middle, right, top, bottom). After --steps steps, it reports
test mIoU on 64 new scenes (chance, picking one of the three: about 1/3) for
every position option of docs/architecture.md ("Position information"):
none, coord (CoordConv in the neck), sine (sine encodings on Eq. 3 keys and
Eq. 4 queries), lsran_sine (in LSRAN's windows) and all, each with the same
seeds, data and steps. The encoder is left out on purpose: on 2 CPU cores
the full model cannot learn to segment 224 px probe images from scratch in
the time a run should take (docs/benchmarks.md), while this isolates the
decoder, where the options act. tests/test_position_probe.py runs it at
SIDE 16 with the defaults.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags

from bench import common
from jmceln_jax.evaluation import metrics
from jmceln_jax.models import position
from jmceln_jax.models.jmceln import JMCELNDecoder
from jmceln_jax.training import losses
from jmceln_jax.utils import cli_flags

WORDS = {"horizontal": ("left", "middle", "right"), "vertical": (
  "top", "middle", "bottom")}  # fmt: skip
VOCAB = ("left", "middle", "right", "top", "bottom")
OPTIONS = position.OPTIONS


def scenes(rng: np.random.Generator, batch: int, side: int):
  """(visual, text, targets [B, 8 side, 8 side]) of random probe scenes."""
  fine = 8 * side
  yy, xx = np.mgrid[0:fine, 0:fine] / fine
  layer2 = np.zeros((batch, side, side, 8), np.float32)
  sentence = np.zeros((batch, len(VOCAB)), np.float32)
  targets = np.zeros((batch, fine, fine), np.int32)
  for b in range(batch):
    orientation = ("horizontal", "vertical")[rng.integers(2)]
    across = rng.uniform(0.4, 0.6)
    pick = rng.integers(3)
    for k in range(3):
      along = 0.5 + (k - 1) * 0.2 + rng.uniform(-0.02, 0.02)
      x, y = (along, across) if orientation == "horizontal" else (across, along)
      disc = (xx - x) ** 2 + (yy - y) ** 2 < 0.08**2
      small = disc.reshape(side, 8, side, 8).mean((1, 3))
      layer2[b] += small[..., None] * np.linspace(1, 2, 8)
      if k == pick:
        targets[b] = disc
    sentence[b, VOCAB.index(WORDS[orientation][pick])] = 1.0

  def pool(x, f):
    n = x.shape[1] // f
    return x.reshape(batch, n, f, n, f, -1).mean((2, 4))

  visual = {
    "layer2": layer2,
    "layer3": pool(layer2, 2),
    "dense": pool(layer2, 4),
  }
  return visual, {"sentence": sentence}, targets


def probe_miou(
  options: dict[str, bool],
  *,
  side: int = 16,
  steps: int = 200,
  batch: int = 8,
  seed: int = 0,
) -> float:
  """Test mIoU of a small decoder after `steps` Adam steps on probe scenes.

  Args:
    options: the decoder's position fields (OPTIONS values).
    side: the decoder map side (a multiple of 4).
    steps: training steps.
    batch: scenes per step.
    seed: initialisation and training scenes (the test scenes are fixed).
  """
  model = JMCELNDecoder(
    dim=32, num_queries=4, num_stages=1, num_heads=4, window=4,
    dilations=(1, 2), head_channels=(8, 8, 8), **options,
  )  # fmt: skip
  rng = np.random.default_rng(seed)
  visual, text, _ = scenes(rng, batch, side)
  variables = jax.jit(functools.partial(model.init, train=True))(
    jax.random.key(seed), visual, text
  )
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, stats, opt, visual, text, targets):
    def loss_fn(p):
      (logits, _), new = model.apply(
        {"params": p, "batch_stats": stats}, visual, text, train=True,
        mutable=["batch_stats"],
      )  # fmt: skip
      loss, _ = losses.segmentation_loss(logits, targets)
      return loss, new["batch_stats"]

    (_, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  params, stats = variables["params"], variables["batch_stats"]
  opt = tx.init(params)
  for _ in range(steps):
    params, stats, opt = step(params, stats, opt, *scenes(rng, batch, side))
  visual, text, targets = scenes(np.random.default_rng(12345), 64, side)
  logits, _ = jax.jit(functools.partial(model.apply, train=False))(
    {"params": params, "batch_stats": stats}, visual, text
  )
  i, u = metrics.network_iu(logits, jnp.asarray(targets))
  return float(jnp.mean(jnp.where(u > 0, i / jnp.maximum(u, 1), 0.0)))


def run(args: flags.FlagValues) -> dict[str, Any]:
  """Every option and seed; prints one row per option."""
  table = common.Table(
    [("option", "option", "s"), ("mean", "mIoU mean", ".3f")]
    + [(f"seed{s}", f"seed {s}", ".3f") for s in args.seeds]
    + [("seconds", "s/run", ".0f")]
  )
  table.header()
  rows = []
  for name in args.options:
    row: dict[str, Any] = {"option": name}
    start = time.perf_counter()
    for s in args.seeds:
      row[f"seed{s}"] = probe_miou(
        OPTIONS[name], side=args.side, steps=args.steps, seed=s
      )
    row["seconds"] = (time.perf_counter() - start) / len(args.seeds)
    row["mean"] = float(np.mean([row[f"seed{s}"] for s in args.seeds]))
    table.row(row)
    rows.append(row)
  return dict(
    settings=cli_flags.values(args, exclude=("json",)),
    results=rows,
  )


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer(
    "side",
    28,
    "Decoder map side (a multiple of 4).",
    lower_bound=4,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "steps", 300, "Adam steps.", lower_bound=1, flag_values=fv
  )
  cli_flags.define_numbers(
    fv, "seeds", [0, 1], "Comma-separated seeds.", minimum=0
  )
  cli_flags.define_choices(
    fv,
    "options",
    list(OPTIONS),
    "Comma-separated position options.",
    {o: o for o in OPTIONS},
  )
  cli_flags.validate(
    fv, "side", lambda v: v % 4 == 0, "--side: give a multiple of 4"
  )


def parse_args(argv: Sequence[str] | None) -> flags.FlagValues:
  """The command-line flags (see the module docstring)."""
  args = common.parse_flags(
    argv,
    _define,
    module="bench.position_probe",
    doc=__doc__,
    tiny_help="Side 8, 2 steps, one seed (smoke)",
    tiny=dict(side=8, steps=2, seeds=[0]),
  )
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = parse_args(argv)
  return common.report(
    common.hardware(common.JAX_PACKAGES),
    f"decoder position probe, side {args.side}, {args.steps} steps, "
    f"seeds {args.seeds}",
    lambda: run(args),
    args.json,
  )


if __name__ == "__main__":
  sys.exit(main())
