r"""Input-pipeline throughput: samples/s of the grain training and evaluation
pipelines on COCO-sized images, for several worker counts.

  python -m bench.data --num_images 64 --image_size 416 --workers 0,1,2 \
      --batch 10 --seconds 10 --json bench_data.json

writes COCO-like records (textured 640x480 JPEGs, every fourth one 480x640,
one polygon object and three sentences per image) with data_prep's writer into
a temporary prepared split, then reads them back with
jmceln_jax.data.pipeline: `train_dataset` at S = --image_size, and
`eval_dataset` with its original-size ground-truth canvas of 640. For each
pipeline and worker count it reports the start-up time (to the first batch,
worker processes included) and the steady throughput after a warm-up, prints
a table and writes the numbers with the machine's CPU count and the package
versions as JSON. `--tiny` runs a few-second smoke version.
"""

from __future__ import annotations

import io
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
import tqdm
from absl import flags
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from bench import common
from data_prep import prepare, shards
from jmceln_jax.data import pipeline
from jmceln_jax.utils import cli_flags

SPLIT = "bench"
EVAL_CANVAS = 640  # COCO images are at most 640 pixels on a side.
_JPEG_QUALITY = 90
_WORDS = (
  ("red", "green", "blue", "dark", "small", "large", "white"),
  ("object", "thing", "shape", "blob", "patch", "item"),
  ("on the left", "on the right", "at the top", "in the middle", "near", ""),
)
_SETTINGS = (
  "num_images",
  "image_size",
  "max_len",
  "batch",
  "workers",
  "seconds",
  "warmup",
)
_PACKAGES = ("grain", "array-record", "numpy", "pillow", "jax", "tokenizers")
# --tiny: a smoke run of a few seconds (no worker processes).
_TINY = dict(
  num_images=6, image_size=64, batch=4, workers=[0], seconds=0.2, warmup=0.0
)


def _polygon(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """[12, 2] float: a star-shaped polygon (x, y) inside the image."""
  r = rng.uniform(0.1, 0.35) * min(height, width)
  cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
  angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
  radii = r * rng.uniform(0.6, 1.0, 12)
  return np.stack(
    [cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1
  )


def make_image(
  rng: np.random.Generator, height: int, width: int
) -> tuple[bytes, dict[str, Any]]:
  """Draws one photo-like image (smooth colours, texture, one object).

  Args:
    rng: the source of randomness.
    height, width: image size in pixels.

  Returns:
    (JPEG bytes, COCO compressed RLE of the object's mask).
  """
  coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
  pixels = np.asarray(
    Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
    np.float32,
  )
  poly = _polygon(rng, height, width)
  img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  colour = tuple(int(v) for v in rng.integers(0, 256, 3))
  ImageDraw.Draw(img).polygon([tuple(p) for p in poly], fill=colour)
  noisy = np.asarray(img, np.float32) + rng.normal(0, 12, (height, width, 3))
  buf = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
    buf, "JPEG", quality=_JPEG_QUALITY
  )
  rle = mask_utils.merge(
    mask_utils.frPyObjects([poly.ravel().tolist()], height, width)
  )
  return buf.getvalue(), rle


def _sentences(rng: np.random.Generator, ref_id: int) -> list[dict]:
  return [
    dict(
      sent=" ".join(w for w in (str(rng.choice(ws)) for ws in _WORDS) if w),
      sent_id=3 * ref_id + k,
    )
    for k in range(3)
  ]


def write_dataset(
  out_dir: str, num_images: int, seed: int = 0, progress: bool = True
) -> dict[str, Any]:
  """Writes the split `SPLIT` of `num_images` refs (one per image).

  Args:
    out_dir: the prepared-data root (`data_dir` of the pipeline).
    num_images: images (= refs; 3 sentences each).
    seed: image seed.
    progress: show a tqdm bar.

  Returns:
    The split's manifest, plus "mean_jpeg_kb".
  """
  sizes = []

  def results():
    for i in tqdm.trange(num_images, desc="images", disable=not progress):
      rng = np.random.default_rng([seed, i])
      height, width = (640, 480) if i % 4 == 3 else (480, 640)
      data, rle = make_image(rng, height, width)
      sizes.append(len(data))
      ref = dict(
        ref_id=i + 1,
        image_id=i + 1,
        ann_id=i + 1,
        category_id=1,
        split=SPLIT,
        sentences=_sentences(rng, i + 1),
      )
      image = dict(file_name=f"bench_{i + 1}.jpg", height=height, width=width)
      yield prepare.build_result(ref, image, data, rle)

  with shards.SplitWriter(out_dir, SPLIT, shard_size=64) as writer:
    manifest = prepare.write_split(
      writer, results(), strict=True, source=dict(generator="bench.data")
    )
  return dict(manifest, mean_jpeg_kb=float(np.mean(sizes)) / 1024)


def _drain(iterator: Iterator, until: float) -> int:
  """Takes batches until `until` (perf_counter) or the end; at least one."""
  n = 0
  while n == 0 or time.perf_counter() < until:
    try:
      next(iterator)
    except StopIteration:
      break
    n += 1
  return n


def measure(
  dataset: grain.IterDataset, batch: int, seconds: float, warmup: float
) -> dict[str, float]:
  """Start-up time and steady samples/s of one pipeline (closed after).

  Args:
    dataset: a grain IterDataset of batches of `batch` examples.
    batch: examples per batch.
    seconds: how long to measure after the warm-up.
    warmup: seconds of batches taken and not counted after the first one.

  Returns:
    {"startup_s", "batches", "seconds", "samples_per_s"}.
  """
  start = time.perf_counter()
  iterator = iter(dataset)
  try:
    next(iterator)
    first = time.perf_counter()
    _drain(iterator, first + warmup)
    t0 = time.perf_counter()
    n = _drain(iterator, t0 + seconds)
    elapsed = time.perf_counter() - t0
  finally:
    iterator.close()
  return dict(
    startup_s=first - start,
    batches=n,
    seconds=elapsed,
    samples_per_s=n * batch / elapsed,
  )


def _dataset(
  kind: str,
  args: flags.FlagValues,
  data_dir: str,
  workers: int,
  index: np.ndarray,
) -> grain.IterDataset:
  """The training or evaluation pipeline of the benchmark split."""
  common = dict(
    image_size=args.image_size, max_len=args.max_len, num_workers=workers
  )
  if kind == "train":
    return pipeline.train_dataset(
      data_dir, SPLIT, batch_size=args.batch, seed=0, **common
    )
  ds, _ = pipeline.eval_dataset(
    data_dir,
    SPLIT,
    global_batch_size=args.batch,
    canvas=EVAL_CANVAS,
    sentences=index,
    **common,
  )
  return ds


def run(args: flags.FlagValues, data_dir: str) -> dict[str, Any]:
  """Writes the data into `data_dir` and measures every pipeline."""
  manifest = write_dataset(data_dir, args.num_images, progress=not args.tiny)
  index = pipeline.expression_index(data_dir, SPLIT)
  # A long enough evaluation stream for the warm-up and the measurement.
  index = np.tile(index, (-(-50_000 // len(index)), 1))
  table = common.Table(
    [
      ("pipeline", "pipeline", "s"),
      ("workers", "workers", "d"),
      ("startup_s", "startup_s", ".2f"),
      ("samples_per_s", "samples/s", ".1f"),
    ]
  )
  table.header()
  results = []
  for workers in args.workers:
    for kind in ("train", "eval"):
      ds = _dataset(kind, args, data_dir, workers, index)
      r = measure(ds, args.batch, args.seconds, args.warmup)
      results.append(dict(pipeline=kind, workers=workers, **r))
      table.row(results[-1])
  settings = {k: getattr(args, k) for k in _SETTINGS}
  return dict(
    settings=dict(settings, eval_canvas=EVAL_CANVAS),
    dataset=dict(
      refs=manifest["counts"]["refs"],
      expressions=manifest["counts"]["sentences"],
      mean_jpeg_kb=round(manifest["mean_jpeg_kb"], 1),
    ),
    results=results,
  )


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer(
    "num_images", 64, "Images = refs.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "image_size", 416, "Network side S.", lower_bound=32, flag_values=fv
  )
  flags.DEFINE_integer(
    "max_len", 30, "Token length L.", lower_bound=3, flag_values=fv
  )
  cli_flags.define_numbers(
    fv, "workers", [0, 1, 2], "Grain worker counts.", minimum=0
  )
  flags.DEFINE_integer(
    "batch", 10, "Per-process batch.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_float(
    "seconds", 10.0, "Measured seconds per run.", lower_bound=0, flag_values=fv
  )
  flags.DEFINE_float(
    "warmup",
    3.0,
    "Seconds of batches not counted, after the first batch.",
    lower_bound=0,
    flag_values=fv,
  )


def parse_args(argv: Sequence[str] | None) -> flags.FlagValues:
  """The command-line flags (see the module docstring)."""
  args = common.parse_flags(
    argv,
    _define,
    module="bench.data",
    doc=__doc__,
    tiny_help="Smoke run of a few seconds",
    tiny=_TINY,
  )
  if args.batch > args.num_images:
    cli_flags.fail("need --batch <= --num_images")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = parse_args(argv)
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags.

  def bench() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_data_") as data_dir:
      return run(args, data_dir)

  return common.report(
    common.hardware(_PACKAGES),
    f"S={args.image_size}, batch {args.batch}, samples/s over "
    f"{args.seconds:g} s",
    bench,
    args.json,
  )


if __name__ == "__main__":
  sys.exit(main())
