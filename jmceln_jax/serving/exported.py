"""Runs a model written by `python -m jmceln_jax.export` without this project.

  from jmceln_exported import ExportedModel       # this file, copied to DIR
  model = ExportedModel("DIR")
  masks, probs = model.predict("photo.jpg", ["the man on the left"])

  python DIR/jmceln_exported.py DIR photo.jpg "the man on the left"

It needs jax (with flatbuffers), numpy, pillow, regex and tokenizers (ftfy too, when installed,
for OpenAI's text cleaning; plain text does not need it), no flax and no model
code: the network is the serialized StableHLO in DIR (jax.export, any batch
size, lowered for CPU and CUDA), its weights are DIR/params.npz and the CLIP
BPE vocabulary is DIR/tokenizer.json. The steps around it are the project's
own (jmceln_jax.data.preprocess and jmceln_jax.data.tokenizer): a letterbox of the image into
S x S (bicubic, centred, CLIP-mean border), CLIP token rows (SOT, BPE ids,
EOT, zeros), and the logits mapped back to the image's own size (bilinear,
half-pixel centres) before the argmax. tests/test_export.py checks that its
masks equal `jmceln_jax.serving.inference.Predictor`'s.
"""

from __future__ import annotations

import html
import json
import os
import sys

import jax
import numpy as np
import regex
import tokenizers
from PIL import Image, ImageOps

try:
  import ftfy
except ImportError:  # Optional: only unusual text needs fixing.
  ftfy = None

SPLIT = regex.compile(
  r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
  r"|[^\s\p{L}\p{N}]+",
  regex.IGNORECASE,
)


class ExportedModel:
  """An exported JMCELN: images and sentences in, masks out.

  Args:
    folder: the --out folder of `python -m jmceln_jax.export`.
    platform: "cpu" or "cuda" (default: JAX's default backend).
  """

  def __init__(self, folder: str, platform: str | None = None):
    with open(os.path.join(folder, "export.json"), encoding="utf-8") as f:
      self.meta = json.load(f)
    with open(os.path.join(folder, "model.stablehlo"), "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    device = jax.devices(platform)[0] if platform else jax.devices()[0]
    with np.load(os.path.join(folder, "params.npz")) as z:
      leaves = [z[f"p{i:05d}"] for i in range(len(z.files))]
    self.params = jax.device_put(leaves, device)
    self.device = device
    self.tokenizer = tokenizers.Tokenizer.from_file(
      os.path.join(folder, "tokenizer.json")
    )
    self.size = int(self.meta["image_size"])
    self.max_len = int(self.meta["max_len"])
    self._call = jax.jit(self.exported.call)

  def tokens(self, texts: list[str]) -> np.ndarray:
    """[N, L] int32 CLIP token rows, cut so that EOT stays last."""
    sot, eot = self.meta["sot_id"], self.meta["eot_id"]
    rows = np.zeros((len(texts), self.max_len), np.int32)
    for row, t in zip(rows, texts, strict=True):
      t = ftfy.fix_text(t) if ftfy else t
      t = " ".join(html.unescape(html.unescape(t)).split()).lower()
      ids = self.tokenizer.encode(SPLIT.findall(t), is_pretokenized=True).ids
      ids = ids[: self.max_len - 2]
      row[: len(ids) + 2] = [sot, *ids, eot]
    return rows

  def letterbox(self, rgb: np.ndarray) -> tuple[np.ndarray, tuple]:
    """[S, S, 3] uint8 canvas and (h, w, nh, nw, top, left)."""
    h, w, s = *rgb.shape[:2], self.size
    scale = min(s / h, s / w)
    nh = min(s, max(1, int(np.floor(h * scale + 0.5))))
    nw = min(s, max(1, int(np.floor(w * scale + 0.5))))
    top, left = (s - nh) // 2, (s - nw) // 2
    canvas = np.empty((s, s, 3), np.uint8)
    canvas[...] = self.meta["fill"]
    if (nh, nw) != (h, w):
      rgb = np.asarray(
        Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BICUBIC)
      )
    canvas[top : top + nh, left : left + nw] = rgb
    return canvas, (h, w, nh, nw, top, left)

  def _back(self, logits: np.ndarray, box: tuple) -> np.ndarray:
    """[S, S, K] -> [h, w, K]: bilinear, half-pixel centres, image part."""
    h, w, nh, nw, top, left = box

    def weights(orig, new, start):
      src = start + (np.arange(orig) + 0.5) * (new / orig) - 0.5
      src = np.clip(src, start, start + new - 1)
      return np.maximum(0.0, 1.0 - np.abs(src[:, None] - np.arange(self.size)))

    out = np.tensordot(weights(h, nh, top), logits.astype(np.float64), (1, 0))
    out = np.swapaxes(np.tensordot(weights(w, nw, left), out, (1, 1)), 0, 1)
    return out.astype(np.float32)

  def predict(self, image, texts) -> tuple[np.ndarray, np.ndarray]:
    """Masks [N, h, w] bool and foreground probabilities [N, h, w] float32.

    Args:
      image: a file path, a PIL image or a uint8 [H, W, 3] RGB array.
      texts: one sentence or a list of N.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not isinstance(image, np.ndarray):
      image = image if isinstance(image, Image.Image) else Image.open(image)
      image = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    canvas, box = self.letterbox(image)
    images = np.broadcast_to(canvas, (len(texts), *canvas.shape))
    logits = np.asarray(self._call(self.params, images, self.tokens(texts)))
    maps = np.stack([self._back(x, box) for x in logits])
    probs = 0.5 + 0.5 * np.tanh(0.5 * (maps[..., 1] - maps[..., 0]))
    return maps.argmax(-1) == 1, probs.astype(np.float32)


if __name__ == "__main__":
  if len(sys.argv) < 4:
    sys.exit(f"usage: python {sys.argv[0]} DIR IMAGE SENTENCE [SENTENCE ...]")
  model = ExportedModel(sys.argv[1])
  masks, _ = model.predict(sys.argv[2], sys.argv[3:])
  for k, (mask, text) in enumerate(zip(masks, sys.argv[3:], strict=True)):
    path = f"mask_{k}.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    print(f"{path}: {mask.mean():.1%} of the image, {text!r}")
