"""Metric writers: JSON lines, TensorBoard events (tensorboardX, no
TensorFlow) with scalars and images, a PNG of training curves (matplotlib),
and atomic JSON/text files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorboardX

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


# ----------------------------------------------------------------- writers


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and, with images, to
  TensorBoard event files in `<workdir>/tensorboard`.

  Only process 0 writes; other processes get a writer that does nothing.
  """

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One metrics.jsonl line and one TensorBoard scalar per key."""
    if not self.enabled:
      return
    now = time.time()
    values = {k: float(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": now, **values}
    self._jsonl.write(json.dumps(record) + "\n")
    for tag, value in values.items():
      self._tb.add_scalar(tag, value, int(step), walltime=now)
    self.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """TensorBoard images: tag -> [H, W, 3] uint8 RGB."""
    if not self.enabled:
      return
    for tag, image in images.items():
      self._tb.add_image(tag, np.asarray(image), int(step), dataformats="HWC")
    self.flush()

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


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
) -> None:
  """Writes a PNG with one panel per key (value against step), stacked, with
  axes and labels; losses on a log scale.

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
  from matplotlib import figure  # noqa: PLC0415 (slow import, used once)

  fig = figure.Figure(figsize=(6.4, 2.4 * len(panels)), layout="constrained")
  for ax, (key, pts) in zip(
    fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels, strict=True
  ):
    steps, values = zip(*pts, strict=True)
    ax.plot(steps, values, marker="o" if len(pts) < 20 else None, ms=3)
    if "loss" in key and min(values) > 0:
      ax.set_yscale("log")
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.set_ylabel(key.rsplit("/", 1)[-1])
    ax.grid(True, alpha=0.3)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=100)
