r"""CLIP RN101 encoders: this project's Flax model vs OpenAI's PyTorch code.

  python -m bench.encoders --image_batches 1,4 --text_batches 1,16 \
      --json bench_encoders.json

builds OpenAI's CLIP (`clip/model.py` of clip-anytorch, loaded by file path)
as RN101 with a 416x416 input and a 30-token context, randomises its
normalisation layers (OpenAI's init zeroes the last BatchNorm of every
block), converts its state dict with `clip_weights.convert_state_dict` and
times both implementations with the SAME weights:

- image encoder, OpenAI's original form (trunk + attention pool to one
  embedding): JAX `CLIP.encode_image(pooled=True)` vs torch `model.visual`,
  in NCHW and in channels_last;
- text encoder at L tokens: JAX `CLIP.encode_text` (sentence) vs torch
  `model.encode_text`;
- the image encoder in the dense form JMCELN uses (layer2, layer3 and CRIS's
  dense attention pool): JAX only, OpenAI's code has no such form.

JAX runs jitted, float32, on its default backend (XLA's CPU client uses one
thread per usable CPU); torch runs float32 under `inference_mode` with
`torch.set_num_threads(--threads)` (default: the usable CPUs), on CUDA when
JAX runs on a GPU and torch has CUDA. Each time is the median of --repeats
calls after --warmup calls. For each torch layout the table gives the
ratio JAX/torch and the max abs difference of the outputs (a fast but wrong
result shows). GFLOPs per sample come from XLA's cost analysis. Without
torch or clip-anytorch, only JAX is timed (random init). `--tiny`: a tiny
CLIP at 64x64 pixels, in seconds.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import jax
import numpy as np
from absl import flags

from bench import common
from jmceln_jax import config_lib
from jmceln_jax.convert import clip_weights
from jmceln_jax.models import clip
from jmceln_jax.ops import xla_options
from jmceln_jax.training import steps
from jmceln_jax.utils import cli_flags

_PACKAGES = (*common.JAX_PACKAGES, "torch", "clip-anytorch")
_TINY = dict(
  image_size=64,
  max_len=8,
  image_batches=[1, 2],
  text_batches=[2],
  warmup=1,
  repeats=2,
)


def openai_clip_module() -> ModuleType | None:
  """OpenAI's clip/model.py (from clip-anytorch) by file path, or None.

  `import clip` itself needs torchvision; model.py needs only torch.
  """
  try:
    import torch  # noqa: F401  (model.py imports it)
  except ImportError:
    return None
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(spec.submodule_search_locations[0], "model.py")
  name = "bench_openai_clip_model"
  if name not in sys.modules:
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]


def torch_clip(openai: ModuleType, hparams: dict[str, Any], seed: int) -> Any:
  """OpenAI's CLIP in eval mode, random, with random normalisation layers.

  Args:
    openai: the module from `openai_clip_module`.
    hparams: OpenAI's `CLIP` arguments (`clip.HPARAMS`).
    seed: torch seed.
  """
  import torch

  torch.manual_seed(seed)
  model = openai.CLIP(**hparams, vision_patch_size=None).eval()
  norms = (torch.nn.BatchNorm2d, torch.nn.LayerNorm)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, norms):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.1)
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return model


def jax_clip(
  hparams: dict[str, Any], torch_model: Any | None, seed: int
) -> tuple[clip.CLIP, Any]:
  """The Flax CLIP and its variables on the default device.

  With `torch_model`, its weights converted by convert_clip; else a random
  init (compiled fast: it runs once).
  """
  if torch_model is not None:
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    hparams, variables = clip_weights.convert_state_dict(state, seed=seed)
    model = clip.CLIP(**hparams)
    return model, jax.device_put(variables)
  model = clip.CLIP(**hparams)
  key = jax.random.key(seed)
  dummy = steps.dummy_inputs(
    1, hparams["image_resolution"], hparams["context_length"]
  )
  init = jax.jit(model.init).lower(key, *dummy)
  return model, init.compile(compiler_options=xla_options.FAST_COMPILE)(
    key, *dummy
  )


def time_jax(
  fn: Callable[..., Any], *args: Any, warmup: int, repeats: int
) -> tuple[Any, dict[str, float]]:
  """Compiles `fn` for `args`, then times it.

  Returns:
    (its output as numpy, {"median_ms", "min_ms", "repeats", "compile_s",
    "gflops"} with the program's GFLOPs from XLA's cost analysis).
  """
  start = time.perf_counter()
  compiled = (
    jax.jit(fn).lower(*args).compile(compiler_options=xla_options.for_dtype())
  )
  seconds = time.perf_counter() - start
  stats = common.time_calls(
    lambda: jax.block_until_ready(compiled(*args)),
    warmup=warmup,
    repeats=repeats,
  )
  out = jax.tree.map(np.asarray, compiled(*args))
  return out, dict(
    stats, compile_s=seconds, gflops=common.xla_flops(compiled) / 1e9
  )


def _forwards(model: clip.CLIP) -> dict[str, Callable[..., Any]]:
  """(variables, input) -> output of each benchmarked form."""

  def pooled(variables, images):
    out = model.apply(variables, images, method="encode_image", pooled=True)
    return out["pooled"]

  def dense(variables, images):  # What JMCELN takes from the image tower.
    out = model.apply(variables, images, method="encode_image", pooled=False)
    return {k: out[k] for k in ("layer2", "layer3", "dense")}

  def sentence(variables, tokens):
    return model.apply(variables, tokens, method="encode_text")["sentence"]

  return dict(pooled=pooled, dense=dense, sentence=sentence)


class _Torch:
  """OpenAI's model on one torch device, in each layout that is compared.

  Args:
    model: OpenAI's CLIP (moved to the device).
    jax_backend: where JAX runs; torch uses CUDA if JAX runs on a GPU and
      torch has CUDA, else the CPU (then times are not compared).
    threads: torch's CPU threads.
  """

  def __init__(self, model: Any, *, jax_backend: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    cuda = jax_backend == "gpu" and torch.cuda.is_available()
    self.torch, self.device = torch, "cuda" if cuda else "cpu"
    self.comparable = jax_backend == "cpu" or cuda
    self.note = f"{torch.__version__} on {self.device}"
    model = model.to(self.device)
    cl = torch.channels_last
    self.image = {
      "nchw": (model.visual, torch.contiguous_format),
      "channels_last": (copy.deepcopy(model.visual).to(memory_format=cl), cl),
    }
    self.text = {"default": (model.encode_text, None)}

  def _inputs(self, form: str, x: np.ndarray) -> dict[str, tuple[Any, Any]]:
    """layout -> (callable, torch input) for a JAX-layout input `x`."""
    if form == "sentence":
      tokens = self.torch.from_numpy(x).long().to(self.device)
      return {k: (fn, tokens) for k, (fn, _) in self.text.items()}
    nchw = self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    return {
      k: (fn, nchw.to(self.device).contiguous(memory_format=fmt))
      for k, (fn, fmt) in self.image.items()
    }

  def _call(self, fn: Callable[[Any], Any], x: Any) -> Any:
    out = fn(x)
    if self.device == "cuda":
      self.torch.cuda.synchronize()
    return out

  def measure(
    self, form: str, x: np.ndarray, jax_out: np.ndarray, jax_ms: float, **timing
  ) -> dict[str, dict[str, Any]]:
    """Times every layout under inference_mode (`timing`: time_calls').

    Returns:
      layout -> time_calls stats, "ratio" (JAX/torch; None when the two run
      on different kinds of device), "max_abs_diff" of the outputs and
      "torch_max_abs" (the output's scale).
    """
    out = {}
    with self.torch.inference_mode():
      for layout, (fn, tx) in self._inputs(form, x).items():
        t = common.time_calls(functools.partial(self._call, fn, tx), **timing)
        ref = self._call(fn, tx).float().cpu().numpy()
        out[layout] = dict(
          t,
          ratio=jax_ms / t["median_ms"] if self.comparable else None,
          max_abs_diff=float(np.abs(jax_out - ref).max()),
          torch_max_abs=float(np.abs(ref).max()),
        )
    return out


def _lines(row: dict[str, Any]) -> list[dict[str, Any]]:
  """Table lines of one result row: one per torch layout (or one)."""
  base = dict(
    name=f"{row['encoder']} ({row['form']})",
    batch=row["batch"],
    jax_ms=row["jax"]["median_ms"],
    gflops=row["gflops_per_sample"],
  )
  if not row["torch"]:
    return [base]
  return [
    dict(
      base,
      layout=layout,
      torch_ms=t["median_ms"],
      ratio=t["ratio"],
      diff=t["max_abs_diff"],
    )
    for layout, t in row["torch"].items()
  ]


def run(args: flags.FlagValues) -> dict[str, Any]:
  """Builds both models and measures every (form, batch); see module doc."""
  hparams = dict(
    config_lib.CLIP_TINY if args.tiny else config_lib.CLIP_RN101,
    image_resolution=args.image_size,
    context_length=args.max_len,
  )
  openai = openai_clip_module()
  reference = torch_clip(openai, hparams, args.seed) if openai else None
  model, variables = jax_clip(hparams, reference, args.seed)
  ref = None
  if reference is None:
    print(
      "torch or clip-anytorch is missing: timing JAX only. For the "
      "comparison: make install-dev (torch==2.13.0, then pip install "
      "--no-deps clip-anytorch==2.6.0)."
    )
  else:
    ref = _Torch(
      reference, jax_backend=jax.default_backend(), threads=args.threads
    )
    if not ref.comparable:
      print("JAX runs on an accelerator, torch on the CPU: no time ratios.")
  forwards = _forwards(model)
  rng = np.random.default_rng(args.seed)
  size, length = args.image_size, args.max_len
  cases = [("image", "pooled", b) for b in args.image_batches]
  cases += [("image", "dense", b) for b in args.image_batches]
  cases += [("text", "sentence", b) for b in args.text_batches]
  table = common.Table(
    [
      ("name", "encoder (form)", "s"),
      ("batch", "batch", "d"),
      ("jax_ms", "JAX ms", ".1f"),
      ("gflops", "GFLOP/sample", ".3g"),
      ("layout", "torch layout", "s"),
      ("torch_ms", "torch ms", ".1f"),
      ("ratio", "JAX/torch", ".2f"),
      ("diff", "max|diff|", ".1e"),
    ]
  )
  table.header()
  timing = dict(warmup=args.warmup, repeats=args.repeats)
  rows = []
  for encoder, form, batch in cases:
    if encoder == "image":
      x = rng.standard_normal((batch, size, size, 3), np.float32)
    else:
      x = common.random_tokens(rng, batch, length, hparams["vocab_size"])
    out, stats = time_jax(forwards[form], variables, x, **timing)
    row = dict(
      encoder=encoder,
      form=form,
      batch=batch,
      input=x.shape,
      jax=stats,
      gflops_per_sample=stats["gflops"] / batch,
      torch={},
    )
    if ref is not None and form != "dense":
      row["torch"] = ref.measure(form, x, out, stats["median_ms"], **timing)
    ratios = [t["ratio"] for t in row["torch"].values() if t["ratio"]]
    row["ratio_vs_best_torch"] = max(ratios) if ratios else None
    rows.append(row)
    for line in _lines(row):
      table.row(line)
  return dict(
    settings=cli_flags.values(args, exclude=("json",)),
    clip=hparams,
    torch=ref.note if ref else "missing",
    results=rows,
  )


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer(
    "image_size",
    416,
    "Image side (a multiple of 32).",
    lower_bound=32,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "max_len", 30, "Text tokens L.", lower_bound=3, flag_values=fv
  )
  cli_flags.define_numbers(
    fv, "image_batches", [1, 4], "Image encoder batch sizes."
  )
  cli_flags.define_numbers(
    fv, "text_batches", [1, 16], "Text encoder batch sizes."
  )
  flags.DEFINE_integer(
    "threads",
    len(os.sched_getaffinity(0)),
    "Torch threads (default: the usable CPUs, as XLA's CPU client).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "warmup", 2, "Untimed calls.", lower_bound=0, flag_values=fv
  )
  flags.DEFINE_integer(
    "repeats", 10, "Timed calls.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer("seed", 0, "Weights and inputs.", flag_values=fv)
  cli_flags.validate(
    fv,
    "image_size",
    lambda v: v % 32 == 0,
    "--image_size: give a multiple of 32",
  )


def parse_args(argv: Sequence[str] | None) -> flags.FlagValues:
  """The command-line flags (see the module docstring)."""
  args = common.parse_flags(
    argv,
    _define,
    module="bench.encoders",
    doc=__doc__,
    tiny_help="Tiny CLIP smoke run",
    tiny=_TINY,
  )
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = parse_args(argv)
  return common.report(
    common.hardware(_PACKAGES) | common.jax_devices(),
    f"torch threads {args.threads}; median of {args.repeats} calls, ms",
    lambda: run(args),
    args.json,
  )


if __name__ == "__main__":
  sys.exit(main())
