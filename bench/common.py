"""Helpers shared by the benchmark scripts (bench/*.py).

The machine and package description every result file carries, a timing
loop, an incrementally printed text table, config loading by file path,
random CLIP tokens and atomic JSON output.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from data_prep import shards
from jmceln_jax.utils import cli_flags

# The root of the checkout (default config paths are relative to it).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Packages whose versions every JAX benchmark records.
JAX_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo; else what platform says)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def hardware(packages: Sequence[str]) -> dict[str, Any]:
  """CPU model and count, memory, platform, Python, load average and
  package versions.

  Args:
    packages: distribution names; a missing one is recorded as None.

  Returns:
    A JSON-ready dict.
  """
  return dict(
    cpu_model=_cpu_model(),
    cpu_count=os.cpu_count(),
    usable_cpus=len(os.sched_getaffinity(0)),
    memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
    machine=platform.machine(),
    platform=platform.platform(),
    python=sys.version.split()[0],
    load_average=os.getloadavg(),
    versions={p: _version(p) for p in packages},
  )


def jax_devices() -> dict[str, Any]:
  """JAX's default backend and its devices (kind and count)."""
  devices = jax.devices()
  return dict(
    backend=jax.default_backend(),
    device_kind=devices[0].device_kind,
    device_count=len(devices),
  )


def xla_flops(compiled: Any) -> float:
  """FLOPs of one device's program, from XLA's compiled cost analysis."""
  # Imported here: jmceln_jax.summary defines absl flags (--config, ...)
  # that bench.data's users must not inherit.
  from jmceln_jax.training import costs

  return costs.xla_cost(compiled, "flops")


def time_calls(
  fn: Callable[[], Any], *, warmup: int, repeats: int
) -> dict[str, float]:
  """Times a synchronous call (block on JAX results inside `fn`).

  Args:
    fn: the work; called `warmup + repeats` times.
    warmup: calls not counted.
    repeats: timed calls (>= 1).

  Returns:
    {"median_ms", "min_ms", "repeats"}.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return dict(
    median_ms=1e3 * statistics.median(times),
    min_ms=1e3 * min(times),
    repeats=repeats,
  )


class Table:
  """A text table printed one row at a time (long benchmarks show progress).

  The first column is left-aligned, the others right-aligned; a missing or
  None value prints as "-".

  Args:
    columns: (key, title, value format spec) per column, e.g.
      ("batch", "batch", "d") or ("median_ms", "JAX ms", ".1f").
  """

  def __init__(self, columns: Sequence[tuple[str, str, str]]):
    self.columns = [(k, t, f, max(len(t), 6) + 2) for k, t, f in columns]

  def _line(self, cells: Sequence[str]) -> str:
    (first, *rest), widths = cells, [c[3] for c in self.columns]
    return f"{first:<{widths[0]}}" + "".join(
      f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True)
    )

  def header(self) -> None:
    """Prints the column titles."""
    print(self._line([t for _, t, _, _ in self.columns]), flush=True)

  def row(self, values: Mapping[str, Any]) -> None:
    """Prints one row of `values` (keyed like the columns)."""
    cells = [
      "-" if values.get(k) is None else format(values[k], f)
      for k, _, f, _ in self.columns
    ]
    print(self._line(cells), flush=True)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file's `get_config(arg)`, as the training CLI reads it.

  Args:
    spec: "path/to/config.py" or "path/to/config.py:arg" (e.g. a Table 2
      variant: configs/refcoco.py:baseline).

  Returns:
    The (unlocked) ConfigDict.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"Config file {path} not found; pass e.g. --config "
      f"{os.path.join(ROOT, 'configs', 'refcoco.py')}."
    )
  module_spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def random_tokens(
  rng: np.random.Generator, batch: int, length: int, vocab_size: int
) -> np.ndarray:
  """CLIP-like token rows: SOT, random words, EOT, zero padding.

  SOT and EOT are the vocabulary's last two ids (as in OpenAI's vocabulary),
  so EOT is every row's argmax, where CLIP reads the sentence feature.

  Returns:
    [batch, length] int32.
  """
  tokens = np.zeros((batch, length), np.int32)
  for row, n in zip(tokens, rng.integers(3, length + 1, batch), strict=True):
    row[0], row[n - 1] = vocab_size - 2, vocab_size - 1
    row[1 : n - 1] = rng.integers(1, vocab_size - 2, n - 2)
  return tokens


def parse_flags(
  argv: Sequence[str] | None,
  define: Callable[[flags.FlagValues], None],
  *,
  module: str,
  doc: str,
  tiny_help: str,
  tiny: Mapping[str, Any] | None = None,
) -> flags.FlagValues:
  """A bench script's flags: its own (`define`), then --json (where
  save_json writes the results) and --tiny (a smoke run: `tiny`'s values
  replace the flags it names)."""

  def define_all(fv: flags.FlagValues) -> None:
    define(fv)
    flags.DEFINE_string(
      "json", None, "Also write the results to this JSON file.", flag_values=fv
    )
    text = (
      f"{tiny_help}; overrides {sorted(tiny)}." if tiny else f"{tiny_help}."
    )
    flags.DEFINE_bool("tiny", False, text, flag_values=fv)

  args = cli_flags.parse(
    argv, define_all, program=f"python -m {module}", doc=doc
  )
  if args.tiny and tiny:
    cli_flags.override(args, tiny)
  return args


def save_json(path: str | None, results: Mapping[str, Any]) -> None:
  """Writes `results` to `path` atomically (nothing for None) and says so."""
  if path:
    shards.write_json_atomic(path, results)
    print(f"Wrote {path}")


def report(
  info: dict[str, Any],
  describe: str,
  run: Callable[[], dict[str, Any]],
  json_path: str | None,
) -> int:
  """The scripts' shared `main` body: prints the machine and the setting,
  runs the benchmark, adds the machine (load before and after) to its
  results and writes them as JSON.

  Args:
    info: `hardware(...)`, possibly with `jax_devices()` merged in.
    describe: what is measured, printed after the machine.
    run: the benchmark; returns its JSON-able results.
    json_path: where to write them (None: nowhere).

  Returns:
    0, the process exit status.
  """
  devices = (
    f"{info['device_count']} x {info['device_kind']}; "
    if "device_kind" in info
    else ""
  )
  print(
    f"{info['usable_cpus']} usable CPUs, load {info['load_average'][0]:.1f}; "
    f"{devices}{describe}"
  )
  out = run()
  info["load_average_after"] = os.getloadavg()
  out["hardware"] = info
  save_json(json_path, out)
  return 0
