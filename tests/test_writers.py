"""Metric writers: JSON lines, TensorBoard framing, curves PNG."""

import glob
import json
import os
import struct

import pytest
from PIL import Image

from jmceln_jax import writers


def _read_tfrecords(path):
  """Parses TFRecord framing, checking both masked CRCs of every record."""
  records = []
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos < len(data):
    header = data[pos : pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc_len,) = struct.unpack("<I", data[pos + 8 : pos + 12])
    assert crc_len == writers.masked_crc32c(header)
    payload = data[pos + 12 : pos + 12 + length]
    (crc_data,) = struct.unpack(
      "<I", data[pos + 12 + length : pos + 16 + length]
    )
    assert crc_data == writers.masked_crc32c(payload)
    records.append(payload)
    pos += 16 + length
  return records


def test_crc32c_check_value():
  assert writers.crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value.


def test_metric_writer_jsonl_and_events(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  w.write_scalars(3, {"train/loss": 0.5, "lr": 1e-3})
  w.write_scalars(4, {"train/loss": 0.25})
  w.close()
  recs = writers.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [3, 4]
  assert recs[0]["train/loss"] == 0.5 and recs[1]["train/loss"] == 0.25
  (events,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  records = _read_tfrecords(events)
  assert len(records) == 1 + 3  # Version event + one per scalar.
  assert b"brain.Event:2" in records[0]
  assert b"train/loss" in records[1]
  assert struct.pack("<f", 0.5) in records[1]


def test_disabled_writer_writes_nothing(tmp_path):
  w = writers.MetricWriter(str(tmp_path / "x"), enabled=False)
  w.write_scalars(0, {"a": 1.0})
  w.close()
  assert not os.path.exists(tmp_path / "x")


def test_plot_curves(tmp_path):
  recs = [{"step": s, "loss": 1 / (s + 1)} for s in range(10)]
  recs.append({"step": 9, "val/mIoU": 0.5})
  path = str(tmp_path / "curves.png")
  writers.plot_curves(recs, ("loss", "val/mIoU", "absent"), path)
  img = Image.open(path)
  assert img.size == (480, 2 * 260)


def test_atomic_writes_leave_old_file_on_failure(tmp_path):
  path = str(tmp_path / "sub" / "out.json")
  writers.write_json(path, {"a": 1})  # Creates the folder.
  assert json.load(open(path)) == {"a": 1}
  with pytest.raises(RuntimeError):
    with writers.atomic_path(path) as tmp:
      open(tmp, "w").write("half")
      raise RuntimeError
  assert json.load(open(path)) == {"a": 1}
  assert os.listdir(tmp_path / "sub") == ["out.json"]
