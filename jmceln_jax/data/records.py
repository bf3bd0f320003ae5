"""The record format of prepared referring data (one record per referring object).

`data_prep` writes these records into ArrayRecord shards; the input pipeline
reads them back. A record holds everything one referring object (a "ref") needs:

| key            | type                     | meaning                                |
|----------------|--------------------------|----------------------------------------|
| schema_version | int                      | `SCHEMA_VERSION` of the writer         |
| ref_id         | int                      | refer ref id                           |
| image_id       | int                      | COCO image id                          |
| ann_id         | int                      | COCO annotation id of the target       |
| category_id    | int                      | COCO category id of the target         |
| split          | str                      | "train", "val", "testA", ...           |
| file_name      | str                      | image file name (from instances.json)  |
| height, width  | int                      | image size in pixels                   |
| bbox           | list[float] (4)          | target box [x, y, w, h], COCO pixels   |
| image          | bytes                    | the original image file (JPEG) bytes   |
| mask           | {"size": [H, W], "counts": bytes} | COCO compressed RLE of the mask |
| sentences      | list[str] (>= 1)         | the referring expressions              |
| sent_ids       | list[int]                | refer sentence ids, same order         |
| sentence_kinds | list[str] (optional)     | kind of each sentence, same order      |

`sentence_kinds` is written only when the raw refs record a kind per sentence
(the synthetic data does: "colour", "position", ...; RefCOCO does not), and
lets evaluation report results per kind. Records without it stay valid.

Records are msgpack maps: reading prepared data never runs code (no pickle).
Shards of a split live in `<data_dir>/<split>/` next to `manifest.json`, which
lists them (see `shard_paths`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader
from pycocotools import mask as mask_utils

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

# Required keys and the Python types their decoded values must have.
_FIELDS: dict[str, type | tuple[type, ...]] = {
  "schema_version": int,
  "ref_id": int,
  "image_id": int,
  "ann_id": int,
  "category_id": int,
  "split": str,
  "file_name": str,
  "height": int,
  "width": int,
  "bbox": list,
  "image": bytes,
  "mask": dict,
  "sentences": list,
  "sent_ids": list,
}

_REBUILD_HINT = (
  "Re-create the prepared data with this version of the code "
  "(python -m data_prep.refcoco ... or python -m data_prep.synthetic ...)."
)


class RecordError(ValueError):
  """A record (or manifest) does not follow this module's schema."""


def _check(record: Any) -> None:
  """Raises RecordError unless `record` follows the schema."""
  if not isinstance(record, Mapping):
    raise RecordError(f"Expected a record map, got {type(record).__name__}.")
  what = f"Record of ref {record.get('ref_id', '?')!r}"
  version = record.get("schema_version")
  if version != SCHEMA_VERSION:
    raise RecordError(
      f"{what}: schema version {version!r}, but this code reads version "
      f"{SCHEMA_VERSION}. {_REBUILD_HINT}"
    )
  missing = sorted(set(_FIELDS) - set(record))
  if missing:
    raise RecordError(f"{what}: missing keys {missing}. {_REBUILD_HINT}")
  for key, kind in _FIELDS.items():
    if not isinstance(record[key], kind) or (
      kind is int and isinstance(record[key], bool)
    ):
      raise RecordError(
        f"{what}: key {key!r} has type {type(record[key]).__name__}, "
        f"expected {getattr(kind, '__name__', kind)}."
      )
  mask = record["mask"]
  if set(mask) != {"size", "counts"} or not isinstance(mask["counts"], bytes):
    raise RecordError(f"{what}: 'mask' must be a COCO compressed RLE dict.")
  if list(mask["size"]) != [record["height"], record["width"]]:
    raise RecordError(
      f"{what}: mask size {mask['size']} differs from the image size "
      f"{[record['height'], record['width']]}."
    )
  sentences, sent_ids = record["sentences"], record["sent_ids"]
  if not sentences or len(sentences) != len(sent_ids):
    raise RecordError(
      f"{what}: needs >= 1 sentence and one sent_id per sentence, got "
      f"{len(sentences)} sentences and {len(sent_ids)} ids."
    )
  if not all(isinstance(s, str) for s in sentences):
    raise RecordError(f"{what}: every sentence must be a str.")
  kinds = record.get("sentence_kinds")
  if kinds is not None and (
    not isinstance(kinds, list)
    or len(kinds) != len(sentences)
    or not all(isinstance(k, str) for k in kinds)
  ):
    raise RecordError(
      f"{what}: 'sentence_kinds' must be one str per sentence, got {kinds!r}."
    )
  if len(record["bbox"]) != 4:
    raise RecordError(f"{what}: bbox must be [x, y, w, h].")


def encode_record(record: Mapping[str, Any]) -> bytes:
  """Serialises one ref record (see the module docstring) with msgpack.

  Args:
    record: the fields of the table above; `schema_version` may be omitted and
      is then set to `SCHEMA_VERSION`.

  Returns:
    The msgpack bytes.

  Raises:
    RecordError: when a field is missing or has the wrong type.
  """
  record = {"schema_version": SCHEMA_VERSION, **record}
  record["bbox"] = [float(v) for v in record.get("bbox", ())]
  _check(record)
  return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
  """Parses and validates bytes written by `encode_record`.

  Args:
    data: one record as stored in a shard.

  Returns:
    The record dict (see the module docstring).

  Raises:
    RecordError: for bytes that are not a record of this schema version.
  """
  try:
    record = msgpack.unpackb(data, raw=False, strict_map_key=True)
  except (ValueError, msgpack.UnpackException) as e:
    raise RecordError(f"Not a msgpack record ({e}). {_REBUILD_HINT}") from e
  _check(record)
  return record


def decode_mask(record: Mapping[str, Any]) -> np.ndarray:
  """Decodes the target mask of a record.

  Args:
    record: a dict from `decode_record`.

  Returns:
    mask: [H, W] uint8, 1 on the referred object, 0 elsewhere.
  """
  return np.ascontiguousarray(mask_utils.decode(dict(record["mask"])))


def read_manifest(data_dir: str, split: str) -> dict[str, Any]:
  """Reads `<data_dir>/<split>/manifest.json` and checks its schema version.

  Args:
    data_dir: the `--out` directory of data_prep.
    split: e.g. "train", "val", "testA".

  Returns:
    The manifest dict (counts, shards, source, bad entries).

  Raises:
    FileNotFoundError: when the split was never (completely) prepared.
    RecordError: when it was prepared by another schema version.
  """
  path = os.path.join(data_dir, split, MANIFEST_NAME)
  if not os.path.isfile(path):
    available = sorted(
      d
      for d in (os.listdir(data_dir) if os.path.isdir(data_dir) else ())
      if os.path.isfile(os.path.join(data_dir, d, MANIFEST_NAME))
    )
    raise FileNotFoundError(
      f"No prepared split {split!r}: {path} does not exist (prepared splits "
      f"in {data_dir}: {available or 'none'}). Run python -m data_prep.refcoco"
      " (RefCOCO) or python -m data_prep.synthetic then data_prep.refcoco."
    )
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  if manifest.get("schema_version") != SCHEMA_VERSION:
    raise RecordError(
      f"{path}: schema version {manifest.get('schema_version')!r}, this code "
      f"reads {SCHEMA_VERSION}. {_REBUILD_HINT}"
    )
  return manifest


def shard_paths(data_dir: str, split: str) -> list[str]:
  """The ArrayRecord shard paths of a prepared split, in record order.

  Args:
    data_dir: the `--out` directory of data_prep.
    split: e.g. "train".

  Returns:
    Absolute paths, one per shard, as listed by the split's manifest.
  """
  manifest = read_manifest(data_dir, split)
  paths = [
    os.path.abspath(os.path.join(data_dir, split, s["file"]))
    for s in manifest["shards"]
  ]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(
      f"Split {split!r} of {data_dir} lists shards that do not exist: "
      f"{missing[:3]}. Re-run data_prep for this split."
    )
  return paths


def iter_records(data_dir: str, split: str) -> Iterator[dict[str, Any]]:
  """Decoded records of a prepared split, in stored order (for tools/tests).

  Args:
    data_dir: the `--out` directory of data_prep.
    split: e.g. "val".

  Yields:
    One dict per ref (see `decode_record`).
  """
  for path in shard_paths(data_dir, split):
    reader = ArrayRecordReader(path)
    try:
      n = reader.num_records()
      for start in range(0, n, 64):
        for data in reader.read(start, min(start + 64, n)):
          yield decode_record(data)
    finally:
      reader.close()
