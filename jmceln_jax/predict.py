r"""Segments what a sentence refers to in any image, with a trained workdir.

  python -m jmceln_jax.predict --workdir runs/refcoco --image photo.jpg \
      --text "the dog on the left" [--text "the red car" ...] --out out.png \
      [--mask_out mask.png] [--checkpoint best|latest|STEP]

From Python:

  from jmceln_jax.serving.inference import Predictor
  predictor = Predictor.from_workdir("runs/refcoco")
  masks = predictor("photo.jpg", ["the dog on the left"])  # [N, h, w] bool

The preprocessing is the training pipeline's own (preprocess.prepare_image:
EXIF rotation, any PIL mode to RGB, letterbox to S x S, CLIP normalisation;
tokenizer.tokenize with input.max_len), and masks are mapped back to the
original resolution exactly as evaluation's "original" convention scores them
(preprocess.unletterbox_numpy, then argmax of the 2 classes). The checkpoint
is restored once onto one device; the forward pass is compiled once per
sentence-batch bucket (1, 2, 4, ... up to `max_batch`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import flags
from PIL import UnidentifiedImageError

from jmceln_jax import cli
from jmceln_jax.data import preprocess, tokenizer
from jmceln_jax.evaluation import visualize
from jmceln_jax.serving import inference
from jmceln_jax.training import model_state
from jmceln_jax.utils import cli_flags


def mask_paths(path: str, n: int) -> list[str]:
  """`path` for one mask; `<stem>_<k><ext>` for k = 0..n-1 otherwise."""
  if n == 1:
    return [path]
  stem, ext = os.path.splitext(path)
  return [f"{stem}_{k}{ext or '.png'}" for k in range(n)]


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "workdir", None, "Training run directory.", flag_values=fv
  )
  flags.DEFINE_string(
    "image", None, "Image file (any size or mode).", flag_values=fv
  )
  flags.DEFINE_multi_string(
    "text",
    None,
    "Referring expression; repeat for several (one panel each).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out", None, "PNG to write: overlays with captions.", flag_values=fv
  )
  flags.DEFINE_string(
    "checkpoint",
    "best",
    "best (by validation mIoU, else latest), latest or a step number.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "mask_out",
    None,
    "Also write the raw mask(s) at original size as 0/255 PNG (several "
    "sentences: <stem>_<k>.png).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "display_size",
    512,
    "Longer side of each panel in --out, in pixels.",
    flag_values=fv,
  )
  flags.mark_flags_as_required(
    ["workdir", "image", "text", "out"], flag_values=fv
  )
  png = lambda v: v.lower().endswith(".png")  # noqa: E731
  cli_flags.validate(fv, "out", png, "--out: give a .png file name")
  cli_flags.validate(fv, "mask_out", png, "--mask_out: give a .png file name")
  cli_flags.validate(
    fv,
    "checkpoint",
    model_state.is_checkpoint,
    f"--checkpoint: use {model_state.CHECKPOINT_VALUES}",
  )
  cli_flags.validate(
    fv,
    "text",
    lambda texts: all(t.strip() for t in texts),
    "--text: a sentence must not be empty",
  )
  cli_flags.validate(
    fv,
    "display_size",
    lambda v: v >= 64,
    "--display_size: give at least 64 pixels",
  )


def _parse(argv: Sequence[str] | None) -> flags.FlagValues:
  return cli_flags.parse(
    argv, _define, program="python -m jmceln_jax.predict", doc=__doc__
  )


def _run(args: flags.FlagValues) -> None:
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
  args = _parse(argv)
  with cli.user_errors():
    _run(args)


if __name__ == "__main__":
  main()
