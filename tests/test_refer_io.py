"""Reading refer files safely, COCO masks, and the prepared-record schema."""

import os
import pickle
import struct

import msgpack
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_prep import refcoco, refer_io
from jmceln_jax.data import records

pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation:DeprecationWarning"
)


def _py2_pickle(obj) -> bytes:
  """Protocol-2 opcodes as Python 2 writes them: `bytes` become py2 `str`."""

  def enc(o):
    if isinstance(o, bytes):  # SHORT_BINSTRING: a Python-2 str.
      return b"U" + bytes([len(o)]) + o
    if isinstance(o, str):  # BINUNICODE: a Python-2 unicode.
      data = o.encode("utf-8")
      return b"X" + struct.pack("<I", len(data)) + data
    if isinstance(o, int):
      return b"J" + struct.pack("<i", o)
    if isinstance(o, float):
      return b"G" + struct.pack(">d", o)
    if isinstance(o, list):
      return b"](" + b"".join(enc(v) for v in o) + b"e"
    if isinstance(o, dict):
      return b"}(" + b"".join(enc(k) + enc(v) for k, v in o.items()) + b"u"
    raise TypeError(o)

  return b"\x80\x02" + enc(obj) + b"."


def test_python2_pickle_loads_as_str():
  ref = {
    b"ref_id": 7,
    b"split": b"testA",
    b"bbox": [1.5, 2.0],
    b"sentences": [
      {b"sent": "caf\u00e9 on the left".encode(), b"sent_id": 3},
      {b"sent": b"na\xefve", b"sent_id": 4},  # Latin-1, not UTF-8.
      {b"sent": "unicode \u2192 ok", b"sent_id": 5},
    ],
  }
  data = _py2_pickle([ref])
  assert pickle.loads(data, encoding="bytes")[0][b"ref_id"] == 7  # Valid.
  (loaded,) = refer_io.loads_refs(data)
  assert loaded == {
    "ref_id": 7,
    "split": "testA",
    "bbox": [1.5, 2.0],
    "sentences": [
      {"sent": "caf\u00e9 on the left", "sent_id": 3},
      {"sent": "na\u00efve", "sent_id": 4},
      {"sent": "unicode \u2192 ok", "sent_id": 5},
    ],
  }


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused(tmp_path, protocol):
  marker = tmp_path / "pwned"
  data = pickle.dumps([{"ref_id": 1, "x": _Evil(marker)}], protocol=protocol)
  with pytest.raises(refer_io.UnsafePickleError, match=r"global \w+\.system"):
    refer_io.loads_refs(data)
  assert not marker.exists()
  with pytest.raises(refer_io.UnsafePickleError, match="builtins.eval"):
    refer_io.loads_refs(b"cbuiltins\neval\n(S'1+1'\ntR.")
  with pytest.raises(refer_io.UnsafePickleError, match=r"__builtin__\.set"):
    refer_io.loads_refs(pickle.dumps([{1, 2}], protocol=2))


def test_malicious_refs_file_fails_the_cli(tmp_path, capsys):
  marker = tmp_path / "pwned"
  folder = tmp_path / "refcoco"
  folder.mkdir()
  (folder / "refs(unc).p").write_bytes(pickle.dumps([_Evil(marker)]))
  (folder / "instances.json").write_text('{"images": [], "annotations": []}')
  argv = ["--refer_root", str(tmp_path), "--coco_images", str(tmp_path)]
  assert refcoco.main(argv + ["--out", str(tmp_path / "out")]) == 1
  assert "Refusing to load global" in capsys.readouterr().err
  assert not marker.exists() and not (tmp_path / "out").exists()


def test_non_list_pickle_is_rejected():
  with pytest.raises(ValueError, match="list of dicts"):
    refer_io.loads_refs(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="Not a readable refs pickle"):
    refer_io.loads_refs(b"not a pickle")


def test_annotation_rle_polygons_rle_and_crowd():
  h, w = 6, 7
  square = [1.0, 1.0, 4.0, 1.0, 4.0, 4.0, 1.0, 4.0]
  shifted = [v + 1.0 for v in square]
  rle = refer_io.annotation_rle({"segmentation": [square, shifted]}, h, w)
  union = mask_utils.decode(mask_utils.frPyObjects([square, shifted], h, w))
  np.testing.assert_array_equal(mask_utils.decode(rle), union.max(axis=2))
  assert mask_utils.area(rle) == 3 * 3 + 3 * 3 - 2 * 2

  counts = [5, 4, 10, 3, 20]  # Column-major runs starting with zeros.
  flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
  expected = flat.reshape(w, h).T
  crowd = {"segmentation": {"size": [h, w], "counts": counts}, "iscrowd": 1}
  np.testing.assert_array_equal(
    mask_utils.decode(refer_io.annotation_rle(crowd, h, w)), expected
  )
  compressed = mask_utils.encode(np.asfortranarray(expected))
  as_text = {"size": [h, w], "counts": compressed["counts"].decode()}
  got = refer_io.annotation_rle({"segmentation": as_text}, h, w)
  np.testing.assert_array_equal(mask_utils.decode(got), expected)
  assert isinstance(got["counts"], bytes)

  with pytest.raises(ValueError, match="not the image size"):
    refer_io.annotation_rle(crowd, h + 1, w)
  for seg in ([], [[1.0, 2.0, 3.0, 4.0]], None):
    with pytest.raises(ValueError):
      refer_io.annotation_rle({"segmentation": seg}, h, w)


def test_resolve_dataset_files(tmp_path):
  ds = tmp_path / "data" / "refcocog"
  ds.mkdir(parents=True)
  for name in ("refs(umd).p", "instances.json"):
    (ds / name).write_text("x")
  expected = (str(ds / "refs(umd).p"), str(ds / "instances.json"))
  for root in (tmp_path / "data", tmp_path, ds):
    assert refer_io.resolve_dataset_files(str(root), "refcocog", "umd") == (
      expected
    )
  with pytest.raises(FileNotFoundError) as e:
    refer_io.resolve_dataset_files(str(tmp_path), "refcocog", "google")
  assert "refs(google).p" in str(e.value) and str(ds) in str(e.value)


def test_resolve_image_dir(tmp_path):
  (tmp_path / "train2014").mkdir()
  (tmp_path / "train2014" / "a.jpg").write_bytes(b"")
  assert refer_io.resolve_image_dir(str(tmp_path), ["a.jpg"]) == str(
    tmp_path / "train2014"
  )
  with pytest.raises(FileNotFoundError, match="--coco_images"):
    refer_io.resolve_image_dir(str(tmp_path), ["b.jpg"])


def _record(**overrides):
  mask = np.zeros((4, 5), np.uint8)
  mask[1:3, 2:4] = 1
  rec = dict(
    ref_id=1,
    image_id=2,
    ann_id=3,
    category_id=4,
    split="val",
    file_name="a.jpg",
    height=4,
    width=5,
    bbox=[2, 1, 2, 2],
    image=b"\xff\xd8jpeg",
    mask=mask_utils.encode(np.asfortranarray(mask)),
    sentences=["the red one", "left"],
    sent_ids=[10, 11],
  )
  rec.update(overrides)
  return rec, mask


def test_record_roundtrip():
  rec, mask = _record()
  decoded = records.decode_record(records.encode_record(rec))
  assert decoded["schema_version"] == records.SCHEMA_VERSION
  assert decoded["bbox"] == [2.0, 1.0, 2.0, 2.0]
  assert {k: decoded[k] for k in ("sentences", "sent_ids", "image")} == {
    k: rec[k] for k in ("sentences", "sent_ids", "image")
  }
  got = records.decode_mask(decoded)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, mask)
  assert "sentence_kinds" not in decoded  # Optional: RefCOCO has none.
  kinds = ["colour"] * len(rec["sentences"])
  with_kinds = records.encode_record({**rec, "sentence_kinds": kinds})
  assert records.decode_record(with_kinds)["sentence_kinds"] == kinds


def test_record_validation_errors():
  rec, _ = _record()
  future = msgpack.packb({**rec, "schema_version": 99}, use_bin_type=True)
  with pytest.raises(records.RecordError, match="schema version 99.*reads"):
    records.decode_record(future)
  with pytest.raises(records.RecordError, match="Not a msgpack record"):
    records.decode_record(b"\xc1")
  with pytest.raises(records.RecordError, match=r"missing keys \['image'\]"):
    records.encode_record({k: v for k, v in rec.items() if k != "image"})
  with pytest.raises(records.RecordError, match="one sent_id per sentence"):
    records.encode_record({**rec, "sent_ids": [1]})
  with pytest.raises(records.RecordError, match="one str per sentence"):
    records.encode_record({**rec, "sentence_kinds": ["colour", "x", "y"]})
  with pytest.raises(records.RecordError, match="mask size"):
    records.encode_record({**rec, "height": 9})
  with pytest.raises(FileNotFoundError, match="data_prep"):
    records.read_manifest("/nonexistent", "train")
