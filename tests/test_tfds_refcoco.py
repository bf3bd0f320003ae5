"""The tfds route: fake `ref_coco` examples in tfds's layout -> same records.

tensorflow-datasets is not installed in this project, so the examples are
built from the synthetic refer data in the layout tfds ref_coco 1.1.0 returns
(one example per image; see data_prep/tfds_refcoco.py).
"""

import collections
import io
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep import refer_io, synthetic, tfds_refcoco
from jmceln_jax.data import records

pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation:DeprecationWarning"
)
NAME = "syn"


def _tfds_examples(raw, split, decoded_images):
  """The refer data of one split as tfds ref_coco examples, by image id."""
  refs = refer_io.load_refs(os.path.join(raw, NAME, "refs(unc).p"))
  inst = refer_io.load_instances(os.path.join(raw, NAME, "instances.json"))
  by_image = collections.defaultdict(list)
  for r in refs:
    if r["split"] == split:
      by_image[r["image_id"]].append(r)
  examples = []
  for image_id in sorted(by_image):
    info = inst.images[image_id]
    h, w = info["height"], info["width"]
    with open(os.path.join(raw, "images", info["file_name"]), "rb") as f:
      data = f.read()
    if decoded_images:
      data = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    objs = collections.defaultdict(list)
    for r in by_image[image_id]:
      ann = inst.annotations[r["ann_id"]]
      x, y, bw, bh = ann["bbox"]
      rle = refer_io.annotation_rle(ann, h, w)
      mask = mask_utils.decode(rle)
      objs["id"].append(r["ann_id"])
      objs["label"].append(ann["category_id"])
      objs["bbox"].append([y / h, x / w, (y + bh) / h, (x + bw) / w])
      objs["mask"].append(np.repeat(mask[..., None], 3, axis=-1))
      objs["raw"].append([s["raw"].encode() for s in r["sentences"]])
      objs["refexp_id"].append([s["sent_id"] for s in r["sentences"]])
    examples.append(
      {
        "image": data,
        "image/id": image_id,
        "objects": {
          "id": np.array(objs["id"]),
          "label": np.array(objs["label"]),
          "bbox": np.array(objs["bbox"], np.float32),
          "mask": np.stack(objs["mask"]),
          "refexp": {"raw": objs["raw"], "refexp_id": objs["refexp_id"]},
        },
      }
    )
  return examples


@pytest.mark.parametrize("decoded_images", [False, True])
def test_tfds_examples_give_the_refer_records(tmp_path, decoded_images):
  raw = str(tmp_path / "raw")
  synthetic.generate(raw, num_images=8, seed=1, name=NAME, progress=False)
  sources = {
    "train": _tfds_examples(raw, "train", decoded_images),
    "validation": _tfds_examples(raw, "val", decoded_images),
  }
  out = str(tmp_path / "out")
  manifests = tfds_refcoco.convert_examples(
    sources, out, {"tfds": "fake"}, progress=False
  )
  assert sorted(manifests) == ["train", "val"]
  refs = {
    r["ann_id"]: r
    for r in refer_io.load_refs(os.path.join(raw, NAME, "refs(unc).p"))
  }
  inst = refer_io.load_instances(os.path.join(raw, NAME, "instances.json"))
  n = 0
  for split in ("train", "val"):
    for rec in records.iter_records(out, split):
      n += 1
      src = refs[rec["ann_id"]]
      info = inst.images[rec["image_id"]]
      assert rec["split"] == src["split"] == split
      assert rec["sentences"] == [s["raw"] for s in src["sentences"]]
      assert rec["sent_ids"] == src["sent_ids"]
      ann = inst.annotations[rec["ann_id"]]
      np.testing.assert_allclose(rec["bbox"], ann["bbox"], atol=1e-3)
      assert rec["mask"] == refer_io.annotation_rle(
        ann, info["height"], info["width"]
      )
      with open(os.path.join(raw, "images", info["file_name"]), "rb") as f:
        original = f.read()
      if decoded_images:  # Stored losslessly as PNG.
        got = np.asarray(Image.open(io.BytesIO(rec["image"])))
        want = np.asarray(Image.open(io.BytesIO(original)).convert("RGB"))
        np.testing.assert_array_equal(got, want)
      else:
        assert rec["image"] == original
  assert n == sum(r["split"] in ("train", "val") for r in refs.values())
  assert manifests["val"]["counts"]["refs"] == len(
    list(records.iter_records(out, "val"))
  )


def test_unknown_config_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_:
    tfds_refcoco.main(["--config", "refcoco", "--out", str(tmp_path / "o")])
  assert str(exit_.value.code).startswith("error: flag --config=refcoco:")
  assert not (tmp_path / "o").exists()


def test_open_tfds_explains_the_missing_package():
  try:
    import tensorflow_datasets  # noqa: F401
  except ImportError:
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
      tfds_refcoco.open_tfds("refcoco_unc", None)
  else:
    pytest.skip("tensorflow-datasets is installed")
