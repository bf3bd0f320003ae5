r"""A synthetic referring-segmentation dataset written in the raw refer format.

  python -m data_prep.synthetic --out data/raw
  python -m data_prep.refcoco --refer_root data/raw \
      --coco_images data/raw/images --dataset synthetic --split_by unc \
      --out data/synthetic

writes, laid out exactly like the refer data,

  <out>/<name>/instances.json   COCO images, annotations (polygons), categories
  <out>/<name>/refs(unc).p      a plain pickle of the list of refs
  <out>/images/<name>_<image_id>.jpg

so that data_prep.refcoco converts it unchanged. Each image (sides 100-140 px
by default, never square) shows 2-3 coloured shapes (data_prep/scenes.py);
sometimes one shape partly hides another, whose polygons then cover only its
visible part. Every shape is a ref with 2-3 expressions that name it and no
other shape of its image (data_prep/expressions.py). Shapes share their shape
(and, with SceneConfig(unique_colours=False), their colour) with neighbours on
purpose, so the sentence is needed to find the target. Splits:
train, val, testA and testB; testA and testB are two held-out sets drawn from
the same distribution (unlike RefCOCO's people / other-objects split).

`--preset balanced` writes the balanced grounding benchmark: the six kinds of
expression in equal shares, and colours shared between shapes (PRESETS).
`--preset position` writes the position probe instead (three identical
shapes per image, told apart only by position words; data_prep/
position_probe.py). The same seed gives byte-identical files, whatever
--num_workers is.
Annotations carry an extra "attributes" entry (shape, colour, size, centre,
occluded) and sentences an extra "kind"; refer-format readers ignore both.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import tqdm
from absl import flags
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep import expressions, parallel, position_probe, scenes, shards
from data_prep.expressions import ExpressionConfig
from jmceln_jax.utils import cli_flags, paths

SPLITS = ("train", "val", "testA", "testB")
EVAL_FRACTION = 0.08  # Of all images, for each of val, testA and testB.


def split_sizes(num_images: int) -> dict[str, int]:
  """Images per split: EVAL_FRACTION each for val/testA/testB (at least 1)."""
  n_eval = max(1, round(num_images * EVAL_FRACTION))
  if num_images - 3 * n_eval < 1:
    raise ValueError(f"num_images={num_images} is too small for four splits.")
  return dict(
    train=num_images - 3 * n_eval, val=n_eval, testA=n_eval, testB=n_eval
  )


def make_image(
  index: int, seed: int, scene: scenes.SceneConfig, config: ExpressionConfig
) -> tuple[bytes, list[scenes.Shape], list[list[tuple[str, str]]]]:
  """Draws image `index` of the dataset with seed `seed` and describes it.

  Returns:
    (JPEG bytes, shapes in drawing order, per shape its [(kind, sentence)]).
  """
  rng = np.random.default_rng([seed, index])
  pixels, shapes = scenes.draw_scene(rng, scene)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "JPEG", quality=scenes.JPEG_QUALITY)
  objects = [s.obj for s in shapes]
  sentences = [
    expressions.describe(i, objects, rng, config) for i in range(len(shapes))
  ]
  return buf.getvalue(), shapes, sentences


# What a synthetic dataset shows and says: (make_image-like function, its
# scene config, the expression config).
PRESETS: dict[str, tuple[Any, Any, ExpressionConfig]] = {
  # Coloured shapes, mostly colour and colour + shape expressions.
  "default": (make_image, scenes.SceneConfig(), ExpressionConfig()),
  # The balanced grounding benchmark: the six kinds in equal shares (about
  # 1/6 each), shapes that share colours as well as shapes, so that no one
  # kind of word finds every target. describe() drops the kinds that cannot
  # single out a target, so the weights below are not equal: they were
  # calibrated (by iterating weight *= (1/6) / share over 600 images) so that
  # the resulting shares are; tests/test_data_prep.py checks them.
  "balanced": (
    make_image,
    scenes.SceneConfig(unique_colours=False),
    ExpressionConfig(
      weights=dict(
        colour=0.65,
        shape=1.0,
        colour_shape=0.41,
        size=0.33,
        position=0.35,
        relation=0.36,
      )
    ),
  ),
  # Three identical shapes in a row, position words only (position_probe).
  "position": (
    position_probe.make_image,
    position_probe.ProbeConfig(),
    ExpressionConfig(),
  ),
}


def _annotation(shape: scenes.Shape, ann_id: int, image: dict) -> dict:
  """The COCO annotation of a shape (polygons of its visible part)."""
  polygons = [[round(float(v), 2) for v in p.ravel()] for p in shape.visible]
  rle = mask_utils.merge(
    mask_utils.frPyObjects(polygons, image["height"], image["width"])
  )
  o = shape.obj
  return dict(
    id=ann_id,
    image_id=image["id"],
    category_id=expressions.SHAPES.index(o.shape) + 1,
    segmentation=polygons,
    area=int(mask_utils.area(rle)),
    bbox=[float(v) for v in mask_utils.toBbox(rle)],
    iscrowd=0,
    attributes=dict(
      shape=o.shape,
      colour=o.colour,
      size=o.size,
      center=[round(o.x, 4), round(o.y, 4)],
      occluded=shape.hidden,
    ),
  )


def _image_entry(task: tuple) -> tuple[dict, list[dict], list[list]]:
  """Worker: draws one image, writes its JPEG, returns its annotations."""
  index, seed, maker, scene, config, image_dir, name = task
  jpeg, shapes, sentences = maker(index, seed, scene, config)
  with Image.open(io.BytesIO(jpeg)) as im:
    width, height = im.size
  image = dict(
    id=index + 1,
    file_name=f"{name}_{index + 1:06d}.jpg",
    height=height,
    width=width,
  )
  shards.write_atomic(os.path.join(image_dir, image["file_name"]), jpeg)
  anns = [
    _annotation(s, image["id"] * 10 + k, image) for k, s in enumerate(shapes)
  ]
  return image, anns, sentences


def _ref(
  ann: dict[str, Any],
  image: dict[str, Any],
  split: str,
  ids: tuple[int, int],
  described: list[tuple[str, str]],
  rng: np.random.Generator,
) -> dict[str, Any]:
  """A ref in the refer schema.

  `sent` is the lower-case sentence, `raw` the same as a person might type it
  (capitalised, a full stop). Like refer's, the ref's `file_name` is the image
  name with the annotation id appended, not a file on disk.
  """
  ref_id, first_sent_id = ids
  sentences = []
  for i, (kind, text) in enumerate(described):
    raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text
    sentences.append(
      dict(
        tokens=text.split(),
        raw=raw + ("." if rng.random() < 0.2 else ""),
        sent_id=first_sent_id + i,
        sent=text,
        kind=kind,
      )
    )
  stem = image["file_name"].rsplit(".", 1)[0]
  return dict(
    ref_id=ref_id,
    ann_id=ann["id"],
    image_id=image["id"],
    split=split,
    sentences=sentences,
    sent_ids=[s["sent_id"] for s in sentences],
    category_id=ann["category_id"],
    file_name=f"{stem}_{ann['id']}.jpg",
  )


def generate(
  out_dir: str,
  *,
  num_images: int = 3000,
  seed: int = 0,
  name: str = "synthetic",
  preset: str = "default",
  scene: Any = None,
  config: ExpressionConfig | None = None,
  num_workers: int = 0,
  progress: bool = True,
) -> dict[str, Any]:
  """Writes the synthetic dataset in the raw refer format (module docstring).

  Args:
    out_dir: root folder; gets `<name>/` and `images/`.
    num_images: images over all splits (see `split_sizes`).
    seed: the dataset seed; the same seed gives byte-identical files.
    name: the dataset folder name (the `--dataset` of data_prep.refcoco).
    preset: a PRESETS key: what is drawn and said.
    scene: how images are drawn (default: the preset's; a
      scenes.SceneConfig, or a position_probe.ProbeConfig for "position").
    config: which expressions are written (default: the preset's).
    num_workers: drawing processes (0: this process); output is the same.
    progress: show a tqdm bar.

  Returns:
    {"counts": split -> {images, refs, sentences}, "kinds": kind -> count}.
  """
  if preset not in PRESETS:
    raise ValueError(
      f"Unknown preset {preset!r}; choose one of {sorted(PRESETS)}."
    )
  maker, default_scene, default_config = PRESETS[preset]
  scene = scene or default_scene
  config = config or default_config
  sizes = split_sizes(num_images)
  image_dir = os.path.join(out_dir, "images")
  data_dir = os.path.join(out_dir, name)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(data_dir, exist_ok=True)
  tasks = [
    (i, seed, maker, scene, config, image_dir, name) for i in range(num_images)
  ]
  with parallel.ordered_map(num_workers) as pmap:
    results = list(
      tqdm.tqdm(
        pmap(_image_entry, tasks, 16),
        total=num_images,
        desc="images",
        disable=not progress,
      )
    )
  splits = [s for s in SPLITS for _ in range(sizes[s])]
  images, annotations, refs = [], [], []
  counts = {
    s: collections.Counter(images=0, refs=0, sentences=0) for s in SPLITS
  }
  kinds = collections.Counter()
  rng = np.random.default_rng([seed, num_images])  # For `raw` spellings only.
  next_sent_id = 1
  for split, (image, anns, described) in zip(splits, results, strict=True):
    images.append(image)
    annotations.extend(anns)
    counts[split]["images"] += 1
    for ann, exprs in zip(anns, described, strict=True):
      ids = (len(refs) + 1, next_sent_id)
      refs.append(_ref(ann, image, split, ids, exprs, rng))
      next_sent_id += len(exprs)
      counts[split]["refs"] += 1
      counts[split]["sentences"] += len(exprs)
      kinds.update(k for k, _ in exprs)
  instances = dict(
    images=images,
    annotations=annotations,
    categories=[
      dict(id=i + 1, name=s, supercategory="shape")
      for i, s in enumerate(expressions.SHAPES)
    ],
    info=dict(description=f"jmceln_jax synthetic referring data, seed {seed}"),
  )
  shards.write_atomic(
    os.path.join(data_dir, "instances.json"),
    json.dumps(instances, separators=(",", ":")).encode("utf-8"),
  )
  shards.write_atomic(
    os.path.join(data_dir, "refs(unc).p"), pickle.dumps(refs, protocol=2)
  )
  return dict(counts={s: dict(c) for s, c in counts.items()}, kinds=dict(kinds))


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "out", None, "Root folder; gets <name>/ and images/.", flag_values=fv
  )
  flags.DEFINE_integer(
    "num_images",
    3000,
    "Images over all splits; val, testA and testB get "
    f"{EVAL_FRACTION * 100:.0f}% each.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Dataset seed.", flag_values=fv)
  flags.DEFINE_enum(
    "preset",
    "default",
    sorted(PRESETS),
    "What is drawn and said: default (coloured shapes, mostly colour "
    "words), balanced (the six kinds of expression in equal shares, shared "
    "colours) or position (three identical shapes told apart by position "
    "words).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "name",
    "synthetic",
    "Dataset folder name (the --dataset of data_prep.refcoco).",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "num_workers",
    min(8, os.cpu_count() or 1),
    "Drawing processes (0: this process); the output does not change.",
    lower_bound=0,
    flag_values=fv,
  )
  flags.mark_flag_as_required("out", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = cli_flags.parse(
    argv, _define, program="python -m data_prep.synthetic", doc=__doc__
  )
  args.out = paths.absolute(args.out)
  start = time.perf_counter()
  info = generate(
    args.out,
    num_images=args.num_images,
    seed=args.seed,
    name=args.name,
    preset=args.preset,
    num_workers=args.num_workers,
  )
  print(f"Wrote {args.out} in {time.perf_counter() - start:.1f} s")
  for split, c in info["counts"].items():
    print(
      f"{split:<6} images {c['images']:>6}  refs {c['refs']:>6}  "
      f"sentences {c['sentences']:>6}"
    )
  total = sum(info["kinds"].values())
  mix = ", ".join(f"{k} {v / total:.0%}" for k, v in info["kinds"].items())
  print(f"expression kinds: {mix}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
