"""Metric writers: JSON lines, TensorBoard event files (no TensorFlow) and a
PNG of training curves.

The TensorBoard writer encodes the few protobuf fields a scalar event needs
(Event.wall_time/step/file_version/summary, Summary.Value.tag/simple_value) and
frames records as TFRecords (length, masked CRC32C, data, masked CRC32C), which
is all `tensorboard --logdir` reads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from typing import Any

from PIL import Image, ImageDraw

# ------------------------------------------------------------------- Files


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary name beside `path` that is renamed to `path` when
  the block succeeds: readers never see a half-written file, and a failed
  block leaves `path` as it was and no temporary file behind."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text(path: str, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically (`atomic_path`), creating
  its folder if needed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str, obj: Any, *, indent: int = 2) -> None:
  """Writes `obj` as JSON to `path` atomically (`atomic_path`)."""
  write_text(path, json.dumps(obj, indent=indent) + "\n")


# ------------------------------------------------------------------ CRC32C


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as used by TFRecord framing."""
  crc = 0xFFFFFFFF
  for b in data:
    crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (
    header
    + struct.pack("<I", masked_crc32c(header))
    + data
    + struct.pack("<I", masked_crc32c(data))
  )


# --------------------------------------------------------- protobuf fields


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    bits = value & 0x7F
    value >>= 7
    if value:
      out.append(bits | 0x80)
    else:
      out.append(bits)
      return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
  return _varint((number << 3) | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
  return _field(number, 2, _varint(len(data)) + data)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
  """Serialised `Event{wall_time, step, summary{value{tag, simple_value}}}`."""
  summary_value = _bytes_field(1, tag.encode()) + _field(
    2, 5, struct.pack("<f", value)
  )
  summary = _bytes_field(1, summary_value)
  return (
    _field(1, 1, struct.pack("<d", wall_time))
    + _field(2, 0, _varint(step))
    + _bytes_field(5, summary)
  )


def version_event(wall_time: float) -> bytes:
  return _field(1, 1, struct.pack("<d", wall_time)) + _bytes_field(
    3, b"brain.Event:2"
  )


# ----------------------------------------------------------------- writers


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    tb_dir = os.path.join(workdir, "tensorboard")
    os.makedirs(tb_dir, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._events = open(os.path.join(tb_dir, name), "ab")
    self._events.write(tfrecord_frame(version_event(now)))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    now = time.time()
    values = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": now, **values}
    self._jsonl.write(json.dumps(record) + "\n")
    for tag, value in values.items():
      self._events.write(tfrecord_frame(scalar_event(tag, value, step, now)))
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()


def read_metrics(jsonl_path: str) -> list[dict]:
  """All records of a metrics.jsonl file (last one wins for repeated steps
  of the same keys, which happens after a resume)."""
  with open(jsonl_path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ curves


def plot_curves(
  records: list[dict],
  keys: tuple[str, ...],
  path: str,
  *,
  size: tuple[int, int] = (480, 260),
) -> None:
  """Writes a PNG with one panel per key (value against step), stacked.

  Keys missing from every record are skipped. Written atomically.
  """
  panels = []
  for key in keys:
    points = {}
    for r in records:
      if key in r and math.isfinite(r[key]):
        points[r["step"]] = r[key]  # After a resume, the later value wins.
    if points:
      panels.append((key, sorted(points.items())))
  if not panels:
    return
  w, h = size
  img = Image.new("RGB", (w, h * len(panels)), "white")
  draw = ImageDraw.Draw(img)
  for i, (key, pts) in enumerate(panels):
    _plot_panel(draw, (0, i * h, w, (i + 1) * h), key, pts)
  with atomic_path(path) as tmp:
    img.save(tmp, format="PNG")


def _plot_panel(draw, box, title, pts) -> None:
  x0, y0, x1, y1 = box
  left, right, top, bottom = x0 + 60, x1 - 15, y0 + 25, y1 - 30
  xs, ys = [p[0] for p in pts], [p[1] for p in pts]
  xmin, xmax = min(xs), max(xs)
  ymin, ymax = min(ys), max(ys)
  if xmax == xmin:
    xmax = xmin + 1
  if ymax == ymin:
    ymax = ymin + 1e-6
  draw.rectangle((left, top, right, bottom), outline="black")
  draw.text((left, y0 + 6), title, fill="black")
  draw.text((x0 + 4, top), f"{ymax:.3g}", fill="gray")
  draw.text((x0 + 4, bottom - 10), f"{ymin:.3g}", fill="gray")
  draw.text((left, bottom + 6), f"step {xmin}", fill="gray")
  draw.text((right - 70, bottom + 6), f"{xmax}", fill="gray")

  def to_px(x, y):
    u = left + (x - xmin) / (xmax - xmin) * (right - left)
    v = bottom - (y - ymin) / (ymax - ymin) * (bottom - top)
    return u, v

  line = [to_px(x, y) for x, y in pts]
  if len(line) == 1:
    u, v = line[0]
    draw.ellipse((u - 2, v - 2, u + 2, v + 2), fill="blue")
  else:
    draw.line(line, fill="blue", width=2)
