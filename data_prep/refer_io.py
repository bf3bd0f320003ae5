"""Reading the raw refer files: `refs(<split_by>).p` and `instances.json`.

The refer data (github.com/lichengunc/refer) is one folder per dataset:

  <refer_root>/<dataset>/refs(<split_by>).p   a Python-2 pickle: list of refs
  <refer_root>/<dataset>/instances.json       COCO images/annotations/categories

A ref is a dict with ref_id, ann_id, image_id, split, category_id, file_name,
sent_ids and sentences ([{sent, sent_id, tokens, raw}]). The pickle is read with
a restricted unpickler that builds only lists, dicts, tuples, numbers and
strings and refuses every global, so a tampered file cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils


class UnsafePickleError(pickle.UnpicklingError):
  """The refs pickle asked for a Python global (class or function)."""


class _PlainDataUnpickler(pickle.Unpickler):
  """Unpickler that refuses every global: plain containers and scalars only."""

  def find_class(self, module: str, name: str) -> Any:
    raise UnsafePickleError(
      f"Refusing to load global {module}.{name}: refer pickles contain only "
      "lists, dicts, strings and numbers, so this file is not a refs file or "
      "has been tampered with. Nothing from it was executed."
    )


def _text(value: Any) -> Any:
  """Recursively turns Python-2 byte strings into str (UTF-8, else Latin-1)."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value.decode("latin-1")
  if isinstance(value, dict):
    return {_text(k): _text(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return type(value)(_text(v) for v in value)
  return value


def loads_refs(data: bytes) -> list[dict[str, Any]]:
  """Safely unpickles the contents of a refs file.

  Python-2 `str` objects are read as bytes (encoding="bytes") and then decoded
  as UTF-8 (Latin-1 when that fails), so keys and sentences come out as str
  whether the file was written by Python 2 or 3.

  Args:
    data: the bytes of `refs(<split_by>).p`.

  Returns:
    The list of ref dicts.

  Raises:
    UnsafePickleError: when the pickle references any global.
    ValueError: when the pickle is not a list of dicts.
  """
  try:
    refs = _text(_PlainDataUnpickler(io.BytesIO(data), encoding="bytes").load())
  except UnsafePickleError:
    raise
  except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
    raise ValueError(f"Not a readable refs pickle: {e}") from e
  if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
    raise ValueError(
      f"A refs pickle must hold a list of dicts, got {type(refs).__name__}."
    )
  return refs


def load_refs(path: str) -> list[dict[str, Any]]:
  """Reads `refs(<split_by>).p` safely (see `loads_refs`)."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return loads_refs(data)
  except (UnsafePickleError, ValueError) as e:
    raise type(e)(f"{path}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Instances:
  """The parts of a COCO `instances.json` that refs point into.

  Attributes:
    images: image id -> image entry (file_name, height, width, ...).
    annotations: annotation id -> annotation (segmentation, bbox, ...).
    categories: category id -> category entry (name, supercategory).
  """

  images: dict[int, dict[str, Any]]
  annotations: dict[int, dict[str, Any]]
  categories: dict[int, dict[str, Any]]


def load_instances(path: str) -> Instances:
  """Reads a COCO-style `instances.json`.

  Args:
    path: the file.

  Returns:
    Its images, annotations and categories indexed by id.
  """
  with open(path, encoding="utf-8") as f:
    data = json.load(f)
  missing = {"images", "annotations"} - set(data)
  if missing:
    raise ValueError(
      f"{path}: not a COCO instances file, no {sorted(missing)}."
    )
  return Instances(
    images={int(im["id"]): im for im in data["images"]},
    annotations={int(a["id"]): a for a in data["annotations"]},
    categories={int(c["id"]): c for c in data.get("categories", ())},
  )


def annotation_rle(ann: dict[str, Any], height: int, width: int) -> dict:
  """The mask of a COCO annotation as one compressed RLE (pycocotools).

  Polygons are rasterised with `frPyObjects` and merged (union): the binary
  mask is `refer.getMask(ref)["mask"] > 0`. Uncompressed (crowd) RLE is
  compressed with `frPyObjects`; compressed RLE is used as is.

  Args:
    ann: the annotation; its "segmentation" is a list of polygons
      [x1, y1, x2, y2, ...] or an RLE dict {"size": [H, W], "counts": ...}.
    height: image height in pixels.
    width: image width in pixels.

  Returns:
    {"size": [height, width], "counts": bytes}.

  Raises:
    ValueError: for a missing, empty or malformed segmentation, or an RLE
      whose size is not the image size.
  """
  seg = ann.get("segmentation")
  if isinstance(seg, list):
    polygons = [p for p in seg if isinstance(p, list) and len(p) >= 6]
    if not polygons or len(polygons) != len(seg):
      raise ValueError("segmentation has no valid polygon (>= 3 points each)")
    try:
      rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    except (TypeError, ValueError, IndexError) as e:
      raise ValueError(f"malformed polygon segmentation ({e})") from e
  elif isinstance(seg, dict) and {"size", "counts"} <= set(seg):
    if [int(s) for s in seg["size"]] != [height, width]:
      raise ValueError(
        f"RLE size {list(seg['size'])} is not the image size {[height, width]}"
      )
    if isinstance(seg["counts"], list):
      rle = mask_utils.frPyObjects(seg, height, width)
    else:
      counts = seg["counts"]
      counts = counts.encode("ascii") if isinstance(counts, str) else counts
      rle = {"size": [height, width], "counts": counts}
  else:
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")
  return {"size": [int(height), int(width)], "counts": bytes(rle["counts"])}


def unclipped_area(ann: dict[str, Any], height: int, width: int) -> int:
  """Pixel area of a polygon mask before clipping to the image; 0 for RLE.

  The polygons are rasterised on a canvas three times the image size with
  the image in the middle, so parts up to one image size outside count.
  """
  seg = ann.get("segmentation")
  if not isinstance(seg, list) or not seg:
    return 0
  shifted = [
    (np.asarray(p, np.float64).reshape(-1, 2) + [width, height])
    .ravel()
    .tolist()
    for p in seg
  ]
  rles = mask_utils.frPyObjects(shifted, 3 * height, 3 * width)
  return int(mask_utils.area(mask_utils.merge(rles)))


def resolve_dataset_files(
  refer_root: str, dataset: str, split_by: str
) -> tuple[str, str]:
  """Finds `refs(<split_by>).p` and `instances.json` of a dataset.

  Accepts the refer data folder (`<root>/<dataset>/...`), a refer checkout
  (`<root>/data/<dataset>/...`) or the dataset folder itself (`<root>/...`).

  Args:
    refer_root: the folder given on the command line.
    dataset: e.g. "refcoco", "refcoco+", "refcocog".
    split_by: e.g. "unc", "umd", "google".

  Returns:
    (refs path, instances path).

  Raises:
    FileNotFoundError: listing every place that was looked at.
  """
  refs_name = f"refs({split_by}).p"
  folders = [
    os.path.join(refer_root, dataset),
    os.path.join(refer_root, "data", dataset),
    refer_root,
  ]
  for folder in folders:
    refs = os.path.join(folder, refs_name)
    instances = os.path.join(folder, "instances.json")
    if os.path.isfile(refs) and os.path.isfile(instances):
      return refs, instances
  looked = "\n".join(
    f"  {os.path.join(f, n)}"
    for f in folders
    for n in (refs_name, "instances.json")
  )
  present = sorted(os.listdir(refer_root)) if os.path.isdir(refer_root) else []
  raise FileNotFoundError(
    f"Could not find both {refs_name} and instances.json for dataset "
    f"{dataset!r} (split_by {split_by!r}). Looked for:\n{looked}\n"
    f"Contents of {refer_root}: {present[:20] or 'missing or empty'}.\n"
    "Point --refer_root at the refer 'data' folder (holding refcoco/, "
    "refcoco+/, refcocog/) or at one dataset folder; refcocog uses "
    "--split_by umd or google, refcoco/refcoco+ use unc (or google)."
  )


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file's contents."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def resolve_image_dir(coco_images: str, file_names: Sequence[str]) -> str:
  """The folder holding the images: `coco_images` or its `train2014/`."""
  sample = list(file_names[:20])
  for folder in (coco_images, os.path.join(coco_images, "train2014")):
    if any(os.path.isfile(os.path.join(folder, n)) for n in sample):
      return folder
  raise FileNotFoundError(
    f"None of the first {len(sample)} images of the refs (e.g. "
    f"{sample[:1]}) is in {coco_images} or {coco_images}/train2014. Point "
    "--coco_images at the folder of COCO train2014 JPEGs."
  )
