r"""Converts a tfds-built `ref_coco` dataset into the project's ArrayRecord shards.

  python -m data_prep.tfds_refcoco --tfds_data_dir ~/tensorflow_datasets \
      --config refcoco_unc --out data/refcoco_unc

An alternative to data_prep.refcoco for users who already have TensorFlow
Datasets' `ref_coco` built (version 1.1.0 or later: the one with masks).
Reading it needs `pip install tensorflow-datasets` but not TensorFlow; neither
is a dependency of this project. The output is the same record format and
layout as data_prep.refcoco, with these differences, because tfds keeps less:

* ref_id is the COCO annotation id (refer refs and annotations are 1:1);
* sentences are refer's `raw` text (data_prep.refcoco uses the cleaned `sent`);
* file_name is rebuilt as COCO_train2014_<image id, 12 digits>.jpg;
* split "validation" is written as "val".

tfds layout read here, one example per image (field names of ref_coco 1.1.0):
  image          JPEG bytes (read undecoded) or [H, W, 3] uint8
  image/id       COCO image id
  objects        per referred object:
    id           [N] COCO annotation id
    label        [N] COCO category id
    bbox         [N, 4] (ymin, xmin, ymax, xmax), relative to the image
    mask         [N, H, W, 3] or [N, H, W] (0/1)
    refexp/raw   [N][M] sentences (bytes or str)
    refexp/refexp_id  [N][M] refer sentence ids
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tqdm
from absl import flags
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep import prepare, shards
from jmceln_jax.utils import cli_flags, paths

SPLIT_NAMES = {"validation": "val"}  # tfds split -> refer split.
# The builder configs of tfds's ref_coco (version 1.1.0).
TFDS_CONFIGS = (
  "refcoco_unc",
  "refcoco_google",
  "refcocoplus_unc",
  "refcocog_umd",
  "refcocog_google",
)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _image(value: Any) -> tuple[bytes, tuple[int, int] | None, str]:
  """(file bytes, (width, height), problem) of a tfds image feature.

  Undecoded JPEG bytes are kept as they are; decoded pixels are stored
  losslessly as PNG.
  """
  if isinstance(value, bytes | np.bytes_):
    data = bytes(value)
  else:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(value, np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
  size, error = prepare.decoded_size(data)
  return data, size, f"corrupt image ({error})" if error else ""


def _mask(value: Any, height: int, width: int) -> tuple[dict | None, str]:
  """Compressed RLE of a tfds mask ([H, W] or [H, W, C], nonzero = object)."""
  m = np.asarray(value)
  m = (m.max(axis=-1) if m.ndim == 3 else m) > 0
  if m.shape != (height, width):
    return None, f"mask is {m.shape}, the image {(height, width)}"
  if not m.any():
    return None, "empty mask"
  rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
  return {"size": [height, width], "counts": bytes(rle["counts"])}, ""


def example_results(
  example: Mapping[str, Any], split: str
) -> list[prepare.RefResult]:
  """Flattens one tfds example (an image) into one result per object.

  Args:
    example: a `ref_coco` example in the layout of the module docstring.
    split: the refer split name to record.

  Returns:
    One `prepare.RefResult` per referred object, in stored order.
  """
  image_id = int(example["image/id"])
  data, size, problem = _image(example["image"])
  width, height = size or (0, 0)
  image = dict(
    file_name=f"COCO_train2014_{image_id:012d}.jpg", height=height, width=width
  )
  objs = example["objects"]
  results = []
  for i in range(len(objs["id"])):
    ann_id = int(objs["id"][i])
    ymin, xmin, ymax, xmax = (float(v) for v in objs["bbox"][i])
    ref = dict(
      ref_id=ann_id,
      ann_id=ann_id,
      image_id=image_id,
      split=split,
      category_id=int(objs["label"][i]),
      bbox=[
        xmin * width,
        ymin * height,
        (xmax - xmin) * width,
        (ymax - ymin) * height,
      ],
      sentences=[
        dict(sent=_text(raw), sent_id=int(sent_id))
        for raw, sent_id in zip(
          objs["refexp"]["raw"][i], objs["refexp"]["refexp_id"][i], strict=True
        )
      ],
    )
    if problem:
      rle, why = None, problem
    else:
      rle, why = _mask(objs["mask"][i], height, width)
    results.append(prepare.build_result(ref, image, data, rle, why))
  return results


def _results(
  examples: Sequence[Mapping[str, Any]], split: str, progress: bool
) -> Iterator[prepare.RefResult]:
  for i in tqdm.trange(len(examples), desc=split, disable=not progress):
    yield from example_results(examples[i], split)


def convert_examples(
  sources: Mapping[str, Sequence[Mapping[str, Any]]],
  out: str,
  source: dict[str, Any],
  *,
  strict: bool = False,
  shard_size: int = 1000,
  progress: bool = True,
) -> dict[str, dict[str, Any]]:
  """Writes prepared splits from random-access sequences of tfds examples.

  Args:
    sources: tfds split name -> its examples (e.g. a tfds data source).
    out: output root; split `s` goes to `out/s` ("validation" to `out/val`).
    source: provenance recorded in every manifest.
    strict: raise prepare.BadEntryError at the first bad entry.
    shard_size: records per ArrayRecord shard.
    progress: show tqdm progress bars.

  Returns:
    refer split name -> the manifest written for it.
  """
  manifests = {}
  for tfds_split, examples in sources.items():
    split = SPLIT_NAMES.get(tfds_split, tfds_split)
    with shards.SplitWriter(out, split, shard_size) as writer:
      results = _results(examples, split, progress)
      manifests[split] = prepare.write_split(writer, results, strict, source)
  return manifests


def open_tfds(
  config: str, data_dir: str | None, splits: Sequence[str] | None = None
) -> dict[str, Sequence[Mapping[str, Any]]]:
  """Opens the built `ref_coco/<config>` splits as tfds data sources.

  Args:
    config: e.g. "refcoco_unc", "refcocoplus_unc", "refcocog_umd".
    data_dir: the tfds data folder (None: tfds's default).
    splits: tfds split names; all built splits when None.

  Returns:
    tfds split name -> data source (len() and [i]), images left undecoded.
  """
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 (optional)
  except ImportError as e:
    raise ImportError(
      "Reading a tfds-built ref_coco needs `pip install tensorflow-datasets` "
      "(TensorFlow is not needed). Or use python -m data_prep.refcoco on the "
      "raw refer files."
    ) from e
  builder = tfds.builder(f"ref_coco/{config}", data_dir=data_dir)
  if "mask" not in builder.info.features["objects"].feature.keys():
    raise ValueError(
      f"ref_coco/{config} {builder.info.version} in {builder.data_dir} has "
      "no masks; build version 1.1.0 or later."
    )
  names = list(splits or builder.info.splits)
  return {
    name: builder.as_data_source(
      split=name, decoders={"image": tfds.decode.SkipDecoding()}
    )
    for name in names
  }


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "tfds_data_dir",
    None,
    "tfds data folder holding ref_coco/ (default: tfds's).",
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "config",
    "refcoco_unc",
    list(TFDS_CONFIGS),
    "The ref_coco builder config.",
    flag_values=fv,
  )
  prepare.define_output_flags(
    fv, "tfds split names, comma-separated (default: all built)."
  )


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = cli_flags.parse(
    argv, _define, program="python -m data_prep.tfds_refcoco", doc=__doc__
  )
  if args.tfds_data_dir:
    args.tfds_data_dir = paths.absolute(args.tfds_data_dir)
  args.out = paths.absolute(args.out)
  try:
    sources = open_tfds(args.config, args.tfds_data_dir, args.splits)
    source = dict(
      tfds=f"ref_coco/{args.config}",
      data_dir=args.tfds_data_dir or "tfds default",
    )
    manifests = convert_examples(
      sources, args.out, source, strict=args.strict, shard_size=args.shard_size
    )
  except (ImportError, ValueError, prepare.BadEntryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(prepare.summary(manifests))
  return 0


if __name__ == "__main__":
  sys.exit(main())
