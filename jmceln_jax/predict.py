r"""Segments what a sentence refers to in any image, with a trained workdir.

  python -m jmceln_jax.predict --workdir runs/refcoco --image photo.jpg \
      --text "the dog on the left" [--text "the red car" ...] --out out.png \
      [--mask_out mask.png] [--checkpoint best|latest|STEP]

From Python:

  from jmceln_jax.predict import Predictor
  predictor = Predictor.from_workdir("runs/refcoco")
  masks = predictor("photo.jpg", ["the dog on the left"])  # [N, h, w] bool

The preprocessing is the training pipeline's own (preprocess.prepare_image:
EXIF rotation, any PIL mode to RGB, letterbox to S x S, CLIP normalisation;
text.tokenize with input.max_len), and masks are mapped back to the original
resolution exactly as evaluation's "original" convention scores them
(preprocess.unletterbox_numpy, then argmax of the 2 classes). The checkpoint
is restored once onto one device; the forward pass is compiled once per
sentence-batch bucket (1, 2, 4, ... up to `max_batch`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from jmceln_jax import (
  checkpointing,
  cli,
  paths,
  preprocess,
  text,
  train_lib,
  trainer,
  visualize,
  xla_options,
)

CONFIG_NAME = "config.json"
ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples the config schema uses."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def check_workdir(workdir: str) -> None:
  """Raises FileNotFoundError (with what to do) if `workdir` is missing."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(
      f"Workdir {workdir} does not exist. Pass the --workdir of a training "
      "run (python -m jmceln_jax.train --config ... --workdir DIR)."
    )


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a training run saved as `<workdir>/config.json`.

  Returns:
    A locked ConfigDict (JSON lists turned back into tuples).
  """
  check_workdir(workdir)
  path = os.path.join(workdir, CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{path} does not exist; python -m jmceln_jax.train writes it when a "
      "run starts. Is this a training workdir?"
    )
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(_tuples(json.load(f)))
  config.lock()
  return config


def checkpoints_dir(workdir: str, checkpoint: str | int = "best") -> str:
  """`<workdir>/checkpoints`, after checking that it exists and that
  `checkpoint` is "best", "latest" or a step number (clear errors, before
  any slow work)."""
  if not cli.is_checkpoint(str(checkpoint)):
    raise ValueError(
      f"checkpoint must be {cli.CHECKPOINT_VALUES}; got {checkpoint!r}."
    )
  check_workdir(workdir)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"No checkpoints in {workdir} ({directory} does not exist); train "
      "first, or wait for the first checkpoint to be saved."
    )
  return directory


def restore_state(
  workdir: str, abstract_state: Any, checkpoint: str | int = "best"
) -> tuple[train_lib.TrainState, int, str]:
  """Restores one checkpoint of `<workdir>/checkpoints`.

  Args:
    workdir: a training run's directory.
    abstract_state: the TrainState's ShapeDtypeStructs with the shardings to
      restore onto (trainer.build_setup(...).abstract_state or a copy).
    checkpoint: "best" (highest validation mIoU; falls back to "latest",
      with a note, when no checkpoint carries validation metrics), "latest"
      or a step number.

  Returns:
    (state, step, which): which is "best", "latest" or "step".
  """
  which = str(checkpoint)
  ckpt = checkpointing.Checkpointer(
    checkpoints_dir(workdir, checkpoint),
    best_metric=trainer.BEST_METRIC,
    async_save=False,
    read_only=True,
  )
  try:
    if which == "best" and ckpt.all_steps() and ckpt.best_step() is None:
      print(
        "No checkpoint carries validation metrics yet; using the latest.",
        file=sys.stderr,
      )
      which = "latest"
    step = ckpt.resolve(int(which) if which.isdigit() else which)
    state, _ = ckpt.restore(step, abstract_state)
  finally:
    ckpt.close()
  return state, step, "step" if which.isdigit() else which


class Prediction(NamedTuple):
  """What Predictor.predict returns for one image and N sentences."""

  masks: np.ndarray  # [N, h, w] bool, original resolution.
  probabilities: np.ndarray  # [N, h, w] float32, P(object) per pixel.
  image: np.ndarray  # [h, w, 3] uint8, the decoded RGB (EXIF applied).
  texts: tuple[str, ...]


def _as_source(image: ImageInput) -> bytes | str | os.PathLike | Image.Image:
  """Validates an image argument and makes arrays PIL images."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(
        f"Image arrays must be uint8 in 0..255, got {image.dtype}; convert "
        "with (x * 255).round().astype(np.uint8) if it is in 0..1."
      )
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim not in (2, 3) or (
      image.ndim == 3 and image.shape[-1] not in (3, 4)
    ):
      raise ValueError(
        f"Image arrays must be [H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA; "
        f"got shape {image.shape}."
      )
    return Image.fromarray(image)
  if isinstance(image, (str, os.PathLike)) and not os.path.isfile(image):
    what = "is a directory" if os.path.isdir(image) else "does not exist"
    raise FileNotFoundError(f"Image {image} {what}.")
  return image


def _buckets(n: int, max_batch: int) -> list[int]:
  """Chunk sizes (powers of two <= max_batch) whose sum is >= n."""
  sizes = []
  while n > 0:
    size = min(max_batch, 1 << (n - 1).bit_length())
    sizes.append(size)
    n -= size
  return sizes


class Predictor:
  """A restored model that segments referring expressions in any image.

  Args:
    model: the JMCELN module (jmceln.build_model(config.model)).
    state: a TrainState holding at least params and batch_stats (opt_state
      may be None), on the one device to run on (or host arrays: then the
      first device).
    input_cfg: `config.input` of the run (image_size, max_len, vocab).
    max_batch: most sentences per forward pass (a power of two); N
      sentences run in power-of-two buckets, each compiled once.
    checkpoint: (which, step) the state came from, for messages.
  """

  def __init__(
    self,
    model: Any,
    state: train_lib.TrainState,
    input_cfg: ml_collections.ConfigDict,
    *,
    max_batch: int = 8,
    checkpoint: tuple[str, int] | None = None,
  ):
    if max_batch < 1 or max_batch & (max_batch - 1):
      raise ValueError(f"max_batch must be a power of two, got {max_batch}.")
    leaf = jax.tree.leaves(state.params)[0]
    self.device = (
      min(leaf.devices(), key=lambda d: d.id)
      if isinstance(leaf, jax.Array)
      else jax.devices()[0]
    )
    self.state = jax.device_put(state, self.device)
    self.model = model
    self.image_size = int(input_cfg.image_size)
    self.max_batch = max_batch
    self.checkpoint = checkpoint
    self.tokenizer = text.Tokenizer(int(input_cfg.max_len), input_cfg.vocab)
    self._forward = jax.jit(
      functools.partial(train_lib.predict, model=model),
      compiler_options=xla_options.for_dtype(model.dtype),
    )

  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    checkpoint: str | int = "best",
    *,
    config: ml_collections.ConfigDict | None = None,
    device: jax.Device | None = None,
    max_batch: int = 8,
  ) -> Predictor:
    """Loads a training run's checkpoint (params and statistics) once.

    Args:
      workdir: the run's directory (holds config.json and checkpoints/;
        may be relative, see paths.absolute).
      checkpoint: "best", "latest" or a step (see `restore_state`).
      config: the run's config; default `<workdir>/config.json`.
      device: where to run; default the first device (GPU/TPU if present).
      max_batch: see the class docstring.
    """
    workdir = paths.absolute(workdir)
    config = load_config(workdir) if config is None else config
    config = paths.absolute_config(config)  # A copy.
    # One device: any mesh of the training run restores onto it.
    config.mesh.data, config.mesh.fsdp = -1, 1
    setup = trainer.build_setup(config, num_train_refs=1)
    single = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single),
      setup.abstract_state,
    )
    state, step, which = restore_state(workdir, abstract, checkpoint)
    return cls(
      setup.model,
      state.replace(opt_state=None),
      config.input,
      max_batch=max_batch,
      checkpoint=(which, step),
    )

  def predict(
    self, image: ImageInput, texts: str | Sequence[str]
  ) -> Prediction:
    """Segments each sentence's referent in one image.

    Args:
      image: a file path, encoded bytes, a PIL image (any mode; EXIF
        orientation applied) or a uint8 array [H, W], [H, W, 3] or
        [H, W, 4].
      texts: one sentence or a sequence of N sentences.

    Returns:
      A Prediction: masks [N, h, w] bool and probabilities [N, h, w]
      float32 at the image's own resolution (after EXIF rotation).
    """
    texts = (texts,) if isinstance(texts, str) else tuple(texts)
    if not texts or not all(t.strip() for t in texts):
      raise ValueError(f"Give one or more non-empty sentences, got {texts}.")
    rgb = preprocess.load_image(_as_source(image))
    canvas, box = preprocess.letterbox_image(rgb, self.image_size)
    tokens = self.tokenizer(list(texts))
    pixels = preprocess.normalize(canvas)
    logits = []
    start = 0
    for size in _buckets(len(texts), self.max_batch):
      chunk = tokens[start : start + size]
      chunk = np.pad(chunk, ((0, size - len(chunk)), (0, 0)))
      images = np.broadcast_to(pixels, (size, *pixels.shape))
      images, chunk = jax.device_put((images, chunk), self.device)
      out = self._forward(self.state, images, chunk)
      logits.append(np.asarray(jax.device_get(out)))
      start += size
    logits = np.concatenate(logits)[: len(texts)]
    maps = np.stack([preprocess.unletterbox_numpy(x, box) for x in logits])
    masks = np.argmax(maps, axis=-1) == 1
    # softmax(maps)[..., 1] = sigmoid(l1 - l0), written without overflow.
    probs = 0.5 + 0.5 * np.tanh(0.5 * (maps[..., 1] - maps[..., 0]))
    return Prediction(masks, probs.astype(np.float32), rgb, texts)

  def __call__(
    self, image: ImageInput, texts: str | Sequence[str]
  ) -> np.ndarray:
    """predict(image, texts).masks: [N, h, w] bool at original resolution."""
    return self.predict(image, texts).masks


def render(prediction: Prediction, *, size: int = 512) -> Image.Image:
  """One panel per sentence: overlay, outline and the sentence as caption."""
  panels = [
    visualize.panel(prediction.image, mask, sentence, size=size)
    for mask, sentence in zip(prediction.masks, prediction.texts, strict=True)
  ]
  return visualize.grid(panels, columns=min(len(panels), 4))


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
  checkpoints_dir(args.workdir, args.checkpoint)
  try:
    image = preprocess.load_image(_as_source(args.image))
  except UnidentifiedImageError:
    raise SystemExit(f"error: {args.image} is not an image file.") from None
  t0 = time.time()
  predictor = Predictor.from_workdir(args.workdir, args.checkpoint)
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
  lengths = [len(ids) for ids in text.encode(pred.texts, vocab=vocab)]
  for sentence, n in zip(pred.texts, lengths, strict=True):
    if n > limit:
      print(
        f"  note: {n} tokens; the model read the first {limit} "
        f"(input.max_len): {sentence}",
        file=sys.stderr,
      )
  visualize.save_png(render(pred, size=args.display_size), args.out)
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
