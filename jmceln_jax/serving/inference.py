"""`Predictor`: a trained run's masks for any image and sentences."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from PIL import Image

from jmceln_jax.data import preprocess, tokenizer
from jmceln_jax.evaluation import visualize
from jmceln_jax.ops import xla_options
from jmceln_jax.training import model_state, steps
from jmceln_jax.utils import paths

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray


class Prediction(NamedTuple):
  """What Predictor.predict returns for one image and N sentences."""

  masks: np.ndarray  # [N, h, w] bool, original resolution.
  probabilities: np.ndarray  # [N, h, w] float32, P(object) per pixel.
  image: np.ndarray  # [h, w, 3] uint8, the decoded RGB (EXIF applied).
  texts: tuple[str, ...]


def image_source(image: ImageInput) -> bytes | str | os.PathLike | Image.Image:
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
    state: steps.TrainState,
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
    self.tokenizer = tokenizer.Tokenizer(
      int(input_cfg.max_len), input_cfg.vocab
    )
    self._forward = jax.jit(
      functools.partial(steps.predict, model=model),
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
      checkpoint: "best", "latest" or a step (see `model_state.restore_state`).
      config: the run's config; default `<workdir>/config.json`.
      device: where to run; default the first device (GPU/TPU if present).
      max_batch: see the class docstring.
    """
    workdir = paths.absolute(workdir)
    config = model_state.load_config(workdir) if config is None else config
    config = paths.absolute_config(config)  # A copy.
    # One device: any mesh of the training run restores onto it.
    config.mesh.data, config.mesh.fsdp = -1, 1
    setup = model_state.build_setup(config, num_train_refs=1)
    single = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
    abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single),
      setup.abstract_state,
    )
    state, step, which = model_state.restore_state(
      workdir, abstract, checkpoint
    )
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
    rgb = preprocess.load_image(image_source(image))
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
