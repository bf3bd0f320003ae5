"""Metric writers: JSON lines, TensorBoard scalars and images, curves PNG."""

import glob
import io
import json
import os
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from jmceln_jax.utils import writers


def _read_events(path):
  """The Event protos of a TensorBoard event file (TFRecord framing)."""
  with open(path, "rb") as f:
    data = f.read()
  events, pos = [], 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos : pos + 8])
    events.append(
      event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
    )
    pos += 16 + length
  return events


def test_metric_writer_jsonl_scalars_and_images(tmp_path):
  w = writers.MetricWriter(str(tmp_path))
  w.write_scalars(3, {"train/loss": 0.5, "lr": 1e-3})
  w.write_scalars(4, {"train/loss": 0.25})
  picture = np.zeros((20, 30, 3), np.uint8)
  picture[:, :10] = (255, 0, 0)
  w.write_images(4, {"val/predictions": picture})
  w.close()
  recs = writers.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in recs] == [3, 4]
  assert recs[0]["train/loss"] == 0.5 and recs[1]["train/loss"] == 0.25
  (path,) = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  values = [(e.step, v) for e in _read_events(path) for v in e.summary.value]
  scalars = [
    (s, v.tag, v.simple_value) for s, v in values if v.HasField("simple_value")
  ]
  assert scalars == [
    (3, "train/loss", 0.5),
    (3, "lr", pytest.approx(1e-3)),
    (4, "train/loss", 0.25),
  ]
  ((step, image),) = [(s, v) for s, v in values if v.HasField("image")]
  assert step == 4 and image.tag == "val/predictions"
  decoded = np.asarray(Image.open(io.BytesIO(image.image.encoded_image_string)))
  np.testing.assert_array_equal(decoded, picture)


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
  assert img.format == "PNG" and img.size == (640, 2 * 240)  # Two panels.


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
