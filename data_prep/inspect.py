"""Counts, sentence lengths and a picture grid of a prepared split.

  python -m data_prep.inspect --data_dir data/synthetic --split val --out grid.png

Prints the numbers of refs, sentences and images, histograms of sentence
length in words and (when jmceln_jax.data.tokenizer and its vocabulary are available) in
CLIP tokens including SOT and EOT, and writes a PNG grid of random refs: the
image with the mask overlaid (translucent fill and outline) and its sentences
below.
"""

from __future__ import annotations

import collections
import io
import sys
import textwrap
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import Image, ImageDraw, ImageFilter

from jmceln_jax.data import records
from jmceln_jax.utils import cli_flags, paths

_OVERLAY = np.array([255, 40, 200], np.float32)  # Magenta: rare in photos.
_ALPHA = 0.3  # Opacity of the overlay inside the mask.
_TEXT_LINE = 12  # Pixel height of one line of PIL's default font.


def clip_token_lengths(sentences: Sequence[str]) -> np.ndarray | None:
  """CLIP BPE lengths (SOT/EOT included, at most 77), or None if unavailable."""
  try:
    from jmceln_jax.data import tokenizer

    tokens = np.asarray(tokenizer.tokenize(list(sentences), 77))
  except (ImportError, OSError) as e:
    print(f"(no CLIP token lengths: {e})")
    return None
  return (tokens != 0).sum(axis=-1)


def histogram(lengths: np.ndarray, title: str, width: int = 40) -> str:
  """A text histogram with one row per length."""
  counts = collections.Counter(int(v) for v in lengths)
  top = max(counts.values())
  rows = [f"{title}: mean {lengths.mean():.1f}, max {lengths.max()}"]
  for n in range(int(lengths.min()), int(lengths.max()) + 1):
    bar = "#" * round(width * counts[n] / top)
    rows.append(f"  {n:>3} {counts[n]:>7} {bar}")
  return "\n".join(rows)


def tile(record: dict, size: int, text_lines: int) -> Image.Image:
  """One grid cell: the image letterboxed to `size`, mask overlay, sentences.

  Args:
    record: a decoded record.
    size: the side of the picture part in pixels.
    text_lines: lines reserved for sentences below the picture.

  Returns:
    An RGB image of size (size, size + text_lines * line height).
  """
  with Image.open(io.BytesIO(record["image"])) as im:
    picture = im.convert("RGB")
  scale = size / max(picture.size)
  shape = (round(picture.width * scale), round(picture.height * scale))
  picture = picture.resize(shape, Image.Resampling.BICUBIC)
  mask = Image.fromarray(records.decode_mask(record) * 255).resize(
    shape, Image.Resampling.NEAREST
  )
  edge = mask.filter(ImageFilter.FIND_EDGES).filter(ImageFilter.MaxFilter(3))
  image = np.asarray(picture, np.float32)
  inside, edge = np.asarray(mask) > 0, np.asarray(edge) > 0
  image[inside] = (1 - _ALPHA) * image[inside] + _ALPHA * _OVERLAY
  image[edge] = _OVERLAY
  picture = Image.fromarray(image.astype(np.uint8))
  cell = Image.new("RGB", (size, size + text_lines * _TEXT_LINE), "white")
  cell.paste(
    picture, ((size - picture.width) // 2, (size - picture.height) // 2)
  )
  lines = []
  for s in record["sentences"]:
    lines += textwrap.wrap(f"- {s}", width=size // 6)
  draw = ImageDraw.Draw(cell)
  for i, line in enumerate(lines[:text_lines]):
    draw.text((3, size + i * _TEXT_LINE), line, fill="black")
  return cell


def grid(
  recs: Sequence[dict], cols: int = 4, size: int = 192, text_lines: int = 5
) -> Image.Image:
  """Tiles records into one image, row by row."""
  cells = [tile(r, size, text_lines) for r in recs]
  rows = -(-len(cells) // cols)
  h = cells[0].height
  out = Image.new("RGB", (cols * (size + 4), rows * (h + 4)), "grey")
  for i, c in enumerate(cells):
    out.paste(c, ((i % cols) * (size + 4) + 2, (i // cols) * (h + 4) + 2))
  return out


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "data_dir",
    None,
    "Prepared data folder (--out of data_prep).",
    flag_values=fv,
  )
  flags.DEFINE_string("split", "train", "Split to inspect.", flag_values=fv)
  flags.DEFINE_string(
    "out", None, "PNG path of the sample grid.", flag_values=fv
  )
  flags.DEFINE_integer(
    "num", 16, "Refs in the grid.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer("seed", 0, "Picks the refs.", flag_values=fv)
  flags.DEFINE_integer(
    "cols", 4, "Grid columns.", lower_bound=1, flag_values=fv
  )
  flags.mark_flag_as_required("data_dir", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = cli_flags.parse(
    argv, _define, program="python -m data_prep.inspect", doc=__doc__
  )
  args.data_dir = paths.absolute(args.data_dir)
  try:
    manifest = records.read_manifest(args.data_dir, args.split)
  except (FileNotFoundError, records.RecordError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  recs = list(records.iter_records(args.data_dir, args.split))
  sentences = [s for r in recs for s in r["sentences"]]
  print(
    f"{args.split}: {len(recs)} refs, {len(sentences)} sentences, "
    f"{len({r['image_id'] for r in recs})} images; "
    f"{len(manifest['bad'])} bad entries in the manifest"
  )
  print(histogram(np.array([len(s.split()) for s in sentences]), "words"))
  tokens = clip_token_lengths(sentences)
  if tokens is not None:
    print(histogram(tokens, "CLIP tokens incl. SOT/EOT"))
  if args.out:
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(recs), size=min(args.num, len(recs)), replace=False)
    grid([recs[i] for i in sorted(pick)], cols=args.cols).save(args.out)
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
