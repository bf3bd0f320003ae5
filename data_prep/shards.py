"""Atomic writing of one split of prepared records into ArrayRecord shards.

A split is written into a hidden temporary folder `<out>/.<split>.tmp-*` and
renamed to `<out>/<split>` only after every shard and the manifest are closed,
so readers never see a partial split. An existing complete split is replaced
only by a complete new one. If anything fails, the temporary folder is removed,
and so is `<out>` itself when this writer created it and it is left empty.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
import uuid
from typing import Any

from array_record.python.array_record_module import ArrayRecordWriter

from jmceln_jax.data import records
from jmceln_jax.utils import writers

# One record per chunk, so random access reads exactly one record.
_WRITER_OPTIONS = "group_size:1"


def shard_name(split: str, index: int, count: int) -> str:
  """`<split>-00003-of-00012.array_record`."""
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file and a rename."""
  with writers.atomic_path(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_json_atomic(path: str, data: Any) -> None:
  """Writes indented, key-sorted JSON atomically (see `write_atomic`)."""
  text = json.dumps(data, indent=1, sort_keys=True) + "\n"
  write_atomic(path, text.encode("utf-8"))


def _new_dir(parent: str, prefix: str) -> str:
  """Creates a uniquely named folder (permissions follow the umask)."""
  path = os.path.join(parent, f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  os.mkdir(path)
  return path


class SplitWriter:
  """Writes the records of one split, then publishes them atomically.

  Use as a context manager: `write()` each encoded record, then `finish()`.
  Leaving the block without `finish()` (an exception) removes everything.

  Args:
    out_dir: the prepared-data root; the split ends up in `out_dir/split`.
    split: the split name.
    shard_size: records per shard (the last shard may hold fewer).
  """

  def __init__(self, out_dir: str, split: str, shard_size: int):
    if shard_size < 1:
      raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    self._created_out = not os.path.isdir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, f".{split}.*")):
      shutil.rmtree(stale, ignore_errors=True)  # Left by a killed run.
    self._out_dir = out_dir
    self._split = split
    self._shard_size = shard_size
    self._tmp = _new_dir(out_dir, f".{split}.tmp")
    self._writer: ArrayRecordWriter | None = None
    self._counts: list[int] = []

  def __enter__(self) -> SplitWriter:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()

  def _part(self, index: int) -> str:
    return os.path.join(self._tmp, f"part-{index:05d}")

  def write(self, record: bytes) -> None:
    """Appends one encoded record (from `records.encode_record`)."""
    if self._writer is None or self._counts[-1] >= self._shard_size:
      self._close_shard()
      self._writer = ArrayRecordWriter(
        self._part(len(self._counts)), _WRITER_OPTIONS
      )
      self._counts.append(0)
    self._writer.write(record)
    self._counts[-1] += 1

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
    """Closes the shards, writes the manifest and publishes the split.

    Args:
      manifest: split-level information (counts, source, bad entries); the
        shard list, split name, schema version and creation time are added.

    Returns:
      The manifest as written to `<out_dir>/<split>/manifest.json`.
    """
    self._close_shard()
    shards = []
    for i, count in enumerate(self._counts):
      name = shard_name(self._split, i, len(self._counts))
      os.rename(self._part(i), os.path.join(self._tmp, name))
      shards.append({"file": name, "records": count})
    manifest = {
      **manifest,
      "split": self._split,
      "schema_version": records.SCHEMA_VERSION,
      "created": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"
      ),
      "shards": shards,
    }
    write_json_atomic(os.path.join(self._tmp, records.MANIFEST_NAME), manifest)
    final = os.path.join(self._out_dir, self._split)
    old = None
    if os.path.exists(final):
      old = _new_dir(self._out_dir, f".{self._split}.old")
      os.rename(final, os.path.join(old, "split"))
    os.rename(self._tmp, final)
    if old is not None:
      shutil.rmtree(old)
    return manifest

  def abort(self) -> None:
    """Discards everything written so far."""
    try:
      self._close_shard()
    finally:
      shutil.rmtree(self._tmp, ignore_errors=True)
      if self._created_out and not os.listdir(self._out_dir):
        os.rmdir(self._out_dir)
