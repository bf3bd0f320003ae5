"""data_prep: synthetic refer data -> ArrayRecord shards, and what goes wrong.

The synthetic generator writes raw refer files; data_prep.refcoco converts them;
the records are read back and compared with the sources.
"""

import collections
import filecmp
import io
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep import (
  expressions,
  prepare,
  refcoco,
  refer_io,
  shards,
  synthetic,
  tfds_refcoco,
)
from data_prep import inspect as inspect_tool
from jmceln_jax.data import records

NAME = "syn"
# pycocotools 2.0.11 with numpy 2 warns inside mask.decode; harmless.
pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation:DeprecationWarning"
)


def _generate(root, num_images=12, seed=0, **kw):
  synthetic.generate(
    str(root), num_images=num_images, seed=seed, name=NAME, progress=False, **kw
  )
  return str(root)


def _convert(raw, out, **kw):
  return refcoco.convert(
    raw,
    os.path.join(raw, "images"),
    NAME,
    "unc",
    str(out),
    progress=False,
    **kw,
  )


def _refs(raw):
  return refer_io.load_refs(os.path.join(raw, NAME, "refs(unc).p"))


def _instances(raw):
  return refer_io.load_instances(os.path.join(raw, NAME, "instances.json"))


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
  return _generate(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared")
  return str(out), _convert(raw, out, shard_size=5)


def _records(out):
  return {
    split: list(records.iter_records(out, split)) for split in synthetic.SPLITS
  }


def _refer_mask(ann, height, width):
  """refer's getMask: decode every polygon and sum them (then binarise)."""
  rles = mask_utils.frPyObjects(ann["segmentation"], height, width)
  return (mask_utils.decode(rles).sum(axis=2) > 0).astype(np.uint8)


def test_roundtrip_matches_sources(raw, prepared):
  out, manifests = prepared
  recs = _records(out)
  inst = _instances(raw)
  refs = {r["ref_id"]: r for r in _refs(raw)}
  for split, manifest in manifests.items():
    assert manifest == records.read_manifest(out, split)
    assert manifest["bad"] == []
    c = manifest["counts"]
    assert (
      c["refs"]
      == len(recs[split])
      == sum(s["records"] for s in manifest["shards"])
    )
    assert c["sentences"] == sum(len(r["sentences"]) for r in recs[split])
    assert c["images"] == len({r["image_id"] for r in recs[split]})
    assert c["refs"] == sum(r["split"] == split for r in refs.values())
  assert len(manifests["train"]["shards"]) > 1  # shard_size=5.
  seen = collections.Counter()
  for rec in (r for split in recs.values() for r in split):
    src = refs[rec["ref_id"]]
    image = inst.images[rec["image_id"]]
    seen.update(
      (rec["ref_id"], i, s, k)
      for i, s, k in zip(
        rec["sent_ids"], rec["sentences"], rec["sentence_kinds"], strict=True
      )
    )
    assert rec["ann_id"] == src["ann_id"] and rec["split"] == src["split"]
    mask = records.decode_mask(rec)
    assert mask.dtype == np.uint8 and mask.shape == (
      image["height"],
      image["width"],
    )
    expected = _refer_mask(inst.annotations[rec["ann_id"]], *mask.shape)
    np.testing.assert_array_equal(mask, expected)
    with open(os.path.join(raw, "images", image["file_name"]), "rb") as f:
      assert rec["image"] == f.read()
  expected = collections.Counter(
    (r["ref_id"], s["sent_id"], s["sent"], s["kind"])
    for r in refs.values()
    for s in r["sentences"]
  )
  assert seen == expected and max(seen.values()) == 1


def test_drawn_shapes_match_their_masks(raw, prepared):
  out, _ = prepared
  inst = _instances(raw)
  for rec in records.iter_records(out, "train"):
    mask = records.decode_mask(rec).astype(bool)
    with Image.open(io.BytesIO(rec["image"])) as im:
      pixels = np.asarray(im.convert("RGB"))
    colour = inst.annotations[rec["ann_id"]]["attributes"]["colour"]
    inner = mask & ~(np.roll(mask, 1, 0) ^ mask) & ~(np.roll(mask, 1, 1) ^ mask)
    mean = pixels[inner].mean(axis=0)
    assert np.abs(mean - synthetic.scenes.COLOUR_RGB[colour]).max() < 40, (
      rec["ref_id"],
      mean,
      colour,
    )


@pytest.mark.slow
def test_output_independent_of_worker_count(raw, prepared, tmp_path):
  out, _ = prepared
  _convert(raw, tmp_path, shard_size=5, num_workers=2)
  for split in synthetic.SPLITS:
    assert list(records.iter_records(str(tmp_path), split)) == list(
      records.iter_records(out, split)
    )


@pytest.mark.slow
def test_synthetic_is_deterministic(tmp_path):
  a = _generate(tmp_path / "a", num_images=6, seed=3)
  b = _generate(tmp_path / "b", num_images=6, seed=3, num_workers=2)
  c = _generate(tmp_path / "c", num_images=6, seed=4)
  files = sorted(
    os.path.relpath(os.path.join(d, f), a)
    for d, _, fs in os.walk(a)
    for f in fs
  )
  assert len(files) == 8  # 6 images, instances.json, refs(unc).p.
  match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
  assert mismatch == [] and errors == []
  match, mismatch, errors = filecmp.cmpfiles(a, c, files, shallow=False)
  assert match == [] and errors == []


@pytest.mark.slow
def test_balanced_preset_has_equal_kinds_and_shared_colours(tmp_path):
  info = synthetic.generate(
    str(tmp_path),
    num_images=300,
    seed=5,
    name=NAME,
    progress=False,
    preset="balanced",
  )
  total = sum(info["kinds"].values())
  shares = {k: info["kinds"].get(k, 0) / total for k in expressions.KINDS}
  assert all(0.13 < s < 0.2 for s in shares.values()), shares
  # Distractors: many targets share their colour, many their shape.
  anns = _instances(tmp_path).annotations.values()
  by_image = collections.defaultdict(list)
  for a in anns:
    by_image[a["image_id"]].append(a["attributes"])
  for attr in ("colour", "shape"):
    shared = [
      sum(o[attr] == t[attr] for o in objs) > 1
      for objs in by_image.values()
      for t in objs
    ]
    assert 0.3 < np.mean(shared) < 0.8, attr


def _corrupt_copy(raw, dst):
  """A copy with one truncated JPEG, one missing, and empty sentences."""
  shutil.copytree(raw, dst)
  refs, inst = _refs(dst), _instances(dst)
  train = [r for r in refs if r["split"] == "train"]
  by_image = collections.defaultdict(list)
  for r in train:
    by_image[r["image_id"]].append(r["ref_id"])
  truncated, missing = sorted(by_image)[:2]
  path = os.path.join(dst, "images", inst.images[truncated]["file_name"])
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  os.remove(os.path.join(dst, "images", inst.images[missing]["file_name"]))
  others = [r for r in train if r["image_id"] not in (truncated, missing)]
  one_empty, all_empty = others[0], others[1]
  one_empty["sentences"][0]["sent"] = "   "
  for s in all_empty["sentences"]:
    s["sent"] = ""
  with open(os.path.join(dst, NAME, "refs(unc).p"), "wb") as f:
    pickle.dump(refs, f, protocol=2)
  return dict(
    truncated=by_image[truncated],
    missing=by_image[missing],
    one_empty=one_empty,
    all_empty=all_empty["ref_id"],
  )


def test_bad_entries_are_listed_not_fatal(raw, tmp_path):
  bad = _corrupt_copy(raw, tmp_path / "raw")
  manifests = _convert(
    str(tmp_path / "raw"), tmp_path / "out", splits=["train"]
  )
  m = manifests["train"]
  reasons = collections.defaultdict(list)
  for b in m["bad"]:
    reasons[b["ref_id"]].append((b["kind"], b["reason"]))
  for ref_id in bad["truncated"]:
    assert "corrupt image" in reasons[ref_id][0][1]
  for ref_id in bad["missing"]:
    assert "missing or unreadable image" in reasons[ref_id][0][1]
  one = bad["one_empty"]
  assert reasons[one["ref_id"]] == [("sentence", "empty sentence")]
  assert any(
    b.get("sent_id") == one["sentences"][0]["sent_id"] for b in m["bad"]
  )
  assert ("ref", "no non-empty sentence left") in reasons[bad["all_empty"]]
  n_bad_refs = len(bad["truncated"]) + len(bad["missing"]) + 1
  assert m["counts"]["bad_refs"] == n_bad_refs
  assert m["counts"]["dropped_sentences"] >= 2
  recs = list(records.iter_records(str(tmp_path / "out"), "train"))
  assert len(recs) == m["counts"]["refs"]
  assert {r["ref_id"] for r in recs}.isdisjoint(
    bad["truncated"] + bad["missing"] + [bad["all_empty"]]
  )
  assert all(s.strip() for r in recs for s in r["sentences"])


def test_strict_fails_clearly_and_leaves_nothing(raw, tmp_path):
  _corrupt_copy(raw, tmp_path / "raw")
  out = tmp_path / "out"
  code = refcoco.main(
    [
      "--refer_root",
      str(tmp_path / "raw"),
      "--coco_images",
      str(tmp_path / "raw" / "images"),
      "--dataset",
      NAME,
      "--out",
      str(out),
      "--splits",
      "train",
      "--strict",
      "--num_workers",
      "0",
    ]
  )
  assert code == 1
  with pytest.raises(prepare.BadEntryError, match="without --strict"):
    _convert(str(tmp_path / "raw"), out, splits=["train"], strict=True)
  assert not out.exists()  # Not even an empty --out.


def test_crash_mid_write_keeps_previous_output(raw, tmp_path, monkeypatch):
  out = tmp_path / "out"
  _convert(raw, out, splits=["train"], shard_size=5)
  before = list(records.iter_records(str(out), "train"))
  write = shards.SplitWriter.write
  calls = collections.Counter()

  def failing_write(self, record):
    calls[self._split] += 1
    if calls[self._split] == 2 and self._split != "val":
      raise KeyboardInterrupt("simulated crash")
    write(self, record)

  monkeypatch.setattr(shards.SplitWriter, "write", failing_write)
  with pytest.raises(KeyboardInterrupt):
    _convert(raw, out, splits=["train"], shard_size=5)
  assert sorted(os.listdir(out)) == ["train"]  # No temporary folder left.
  assert list(records.iter_records(str(out), "train")) == before
  with pytest.raises(KeyboardInterrupt):  # val is written before testA.
    _convert(raw, tmp_path / "fresh", splits=["testA", "val"])
  assert sorted(os.listdir(tmp_path / "fresh")) == ["val"]


def test_bad_masks_are_listed(raw, tmp_path):
  shutil.copytree(raw, tmp_path / "raw")
  path = tmp_path / "raw" / NAME / "instances.json"
  inst = json.loads(path.read_text())
  val_refs = [r for r in _refs(raw) if r["split"] == "val"]
  anns = {a["id"]: a for a in inst["annotations"]}
  images = {im["id"]: im for im in inst["images"]}
  shifted, gone = val_refs[0], val_refs[1]
  for ref, inside in ((shifted, 0.3), (gone, -1.0)):  # Share left inside.
    ann = anns[ref["ann_id"]]
    x, _, w, _ = ann["bbox"]
    dx = images[ann["image_id"]]["width"] - x - inside * w
    ann["segmentation"] = [
      [v + dx if i % 2 == 0 else v for i, v in enumerate(p)]
      for p in ann["segmentation"]
    ]
  path.write_text(json.dumps(inst))
  m = _convert(str(tmp_path / "raw"), tmp_path / "out", splits=["val"])["val"]
  reasons = {b["ref_id"]: b["reason"] for b in m["bad"]}
  assert reasons[shifted["ref_id"]].startswith("mask out of bounds")
  assert reasons[gone["ref_id"]] == "empty mask"
  assert m["counts"]["refs"] == len(val_refs) - 2


def test_inspect_prints_counts_and_writes_grid(prepared, tmp_path, capsys):
  out, manifests = prepared
  png = tmp_path / "grid.png"
  assert (
    inspect_tool.main(
      [
        "--data_dir",
        out,
        "--split",
        "train",
        "--out",
        str(png),
        "--num",
        "5",
        "--cols",
        "3",
      ]
    )
    == 0
  )
  printed = capsys.readouterr().out
  c = manifests["train"]["counts"]
  assert f"train: {c['refs']} refs, {c['sentences']} sentences" in printed
  assert "words: mean" in printed
  with Image.open(png) as im:
    assert im.width == 3 * 196 and im.height == 2 * (192 + 5 * 12 + 4)
  assert inspect_tool.main(["--data_dir", out, "--split", "nope"]) == 1


@pytest.mark.parametrize(
  "tool", [refcoco, synthetic, inspect_tool, tfds_refcoco]
)
def test_cli_help(tool, capsys):
  with pytest.raises(SystemExit) as e:
    tool.main(["--help"])
  assert e.value.code == 0
  assert "usage: python -m data_prep." in capsys.readouterr().out
