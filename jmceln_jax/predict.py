r"""Segments what a sentence refers to in any image, with a trained workdir.

  python -m jmceln_jax.predict --workdir runs/refcoco --image photo.jpg \
      --text "the dog on the left" [--text "the red car" ...] --out out.png \
      [--mask_out mask.png] [--checkpoint best|latest|STEP]

From Python:

  from jmceln_jax.predict import inference.Predictor
  predictor = inference.Predictor.from_workdir("runs/refcoco")
  masks = predictor("photo.jpg", ["the dog on the left"])  # [N, h, w] bool

The preprocessing is the training pipeline's own (preprocess.prepare_image:
EXIF rotation, any PIL mode to RGB, letterbox to S x S, CLIP normalisation;
tokenizer.tokenize with input.max_len), and masks are mapped back to the original
resolution exactly as evaluation's "original" convention scores them
(preprocess.unletterbox_numpy, then argmax of the 2 classes). The checkpoint
is restored once onto one device; the forward pass is compiled once per
sentence-batch bucket (1, 2, 4, ... up to `max_batch`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from PIL import UnidentifiedImageError

from jmceln_jax import cli
from jmceln_jax.data import preprocess, tokenizer
from jmceln_jax.evaluation import visualize
from jmceln_jax.serving import inference
from jmceln_jax.training import model_state


def mask_paths(path: str, n: int) -> list[str]:
  """`path` for one mask; `<stem>_<k><ext>` for k = 0..n-1 otherwise."""
  if n == 1:
    return [path]
  stem, ext = os.path.splitext(path)
  return [f"{stem}_{k}{ext or '.png'}" for k in range(n)]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    prog="python -m jmceln_jax.predict",
    description="Segment the object each sentence refers to in an image.",
  )
  p.add_argument("--workdir", required=True, help="training run directory")
  p.add_argument("--image", required=True, help="image file (any size/mode)")
  p.add_argument(
    "--text",
    action="append",
    required=True,
    type=cli.sentence_arg,
    help="referring expression; repeat for several (one panel each)",
  )
  p.add_argument(
    "--out",
    required=True,
    type=cli.png_arg,
    help="PNG to write: overlays with captions",
  )
  p.add_argument(
    "--checkpoint",
    default="best",
    type=cli.checkpoint_arg,
    help="best (by validation mIoU, else latest), latest or a step number",
  )
  p.add_argument(
    "--mask_out",
    type=cli.png_arg,
    help="also write the raw mask(s) at original size as 0/255 PNG "
    "(several sentences: <stem>_<k>.png)",
  )
  p.add_argument(
    "--display_size",
    type=int,
    default=512,
    help="longer side of each panel in --out, in pixels",
  )
  args = p.parse_args(argv)
  if args.display_size < 64:
    p.error(f"--display_size {args.display_size}: give at least 64 pixels")
  return args


def _run(args: argparse.Namespace) -> None:
  # Missing or unreadable inputs fail before slow loading.
  model_state.checkpoints_dir(args.workdir, args.checkpoint)
  try:
    image = preprocess.load_image(inference.image_source(args.image))
  except UnidentifiedImageError:
    raise SystemExit(f"error: {args.image} is not an image file.") from None
  t0 = time.time()
  predictor = inference.Predictor.from_workdir(args.workdir, args.checkpoint)
  t1 = time.time()
  pred = predictor.predict(image, args.text)
  t2 = time.time()
  h, w = pred.image.shape[:2]
  which, step = predictor.checkpoint
  print(
    f"Checkpoint {which} (step {step}), loaded in {t1 - t0:.1f} s; "
    f"{len(pred.texts)} sentence(s) on a {w}x{h} image in {t2 - t1:.1f} s."
  )
  for mask, prob, sentence in zip(
    pred.masks, pred.probabilities, pred.texts, strict=True
  ):
    conf = float(prob[mask].mean()) if mask.any() else 0.0
    print(
      f"  {100.0 * mask.mean():5.1f}% of the image, mean P(object) "
      f"{conf:.2f}: {sentence}"
    )
  limit = predictor.tokenizer.context_length - 2  # Without SOT and EOT.
  vocab = predictor.tokenizer.vocab
  lengths = [len(ids) for ids in tokenizer.encode(pred.texts, vocab=vocab)]
  for sentence, n in zip(pred.texts, lengths, strict=True):
    if n > limit:
      print(
        f"  note: {n} tokens; the model read the first {limit} "
        f"(input.max_len): {sentence}",
        file=sys.stderr,
      )
  visualize.save_png(inference.render(pred, size=args.display_size), args.out)
  print(f"Wrote {args.out}")
  if args.mask_out:
    paths = mask_paths(args.mask_out, len(pred.masks))
    for mask, path in zip(pred.masks, paths, strict=True):
      visualize.save_png(mask.astype(np.uint8) * 255, path)
      print(f"Wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
  """The command line (see the module docstring).

  Args:
    argv: the arguments after the program name (default sys.argv[1:]).
  """
  args = _parse(sys.argv[1:] if argv is None else argv)
  with cli.user_errors():
    _run(args)


if __name__ == "__main__":
  main()
