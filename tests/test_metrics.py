"""Metrics against hand-computed cases; both conventions; jit == no jit."""

import json

import chex
import jax
import numpy as np
import pytest
from absl.testing import parameterized

from jmceln_jax.data import preprocess as pp
from jmceln_jax.evaluation import metrics, scoring

# Per expression: perfect, empty GT and prediction (U=0), empty prediction,
# partial 3/4, exactly 1/2, exactly 6/10.
INTER = np.array([10, 0, 0, 3, 1, 6])
UNION = np.array([10, 0, 5, 4, 2, 10])


def _logits(pred):
  """[..., 2] logits whose argmax is `pred` (0/1)."""
  pred = np.asarray(pred, np.float32)
  return np.stack([1.0 - pred, pred], -1)


@pytest.mark.parametrize(
  "convention,prs",
  [
    ("network", (4, 3, 2, 1, 1)),  # IoU >= X: 1/2 counts for Pr@0.5.
    ("original", (3, 2, 2, 1, 1)),  # IoU > X: it does not.
  ],
)
def test_summarize_hand_computed(convention, prs):
  res = metrics.summarize(INTER, UNION, convention)
  assert res["convention"] == convention and res["expressions"] == 6
  assert res["oIoU"] == pytest.approx(100 * 20 / 31)
  assert res["mIoU"] == pytest.approx(100 * (1 + 0.75 + 0.5 + 0.6) / 6)
  for k, n in zip(metrics.PR_TENTHS, prs, strict=True):
    assert res[f"Pr@0.{k}"] == pytest.approx(100 * n / 6), k


def test_by_kind_hand_computed():
  # INTER/UNION's expressions in a shuffled evaluation order.
  order = np.array([3, 0, 5, 1, 4, 2])
  per = {"index": order, "original_i": INTER[order], "original_u": UNION[order]}
  kinds = ["colour", "colour", "size", "size", "", "colour"]
  got = scoring.by_kind(per, kinds)
  assert list(got) == ["", "colour", "size"]
  assert got["colour"]["expressions"] == 3
  assert got["colour"]["mIoU"] == pytest.approx(100 * (1 + 0 + 0.6) / 3)
  assert got["colour"]["oIoU"] == pytest.approx(100 * 16 / 20)
  assert got["colour"]["Pr@0.5"] == pytest.approx(100 * 2 / 3)
  assert got["size"]["mIoU"] == pytest.approx(100 * 0.75 / 2)
  assert got[""] == {"expressions": 1, "mIoU": 50.0, "oIoU": 50.0, "Pr@0.5": 0}
  table = scoring.format_by_kind({"val": got}).splitlines()
  assert table[0].split() == [
    "split",
    "kind",
    "exprs",
    "mIoU",
    "oIoU",
    "Pr@0.5",
  ]
  assert table[2].split() == ["val", "colour", "3", "53.33", "80.00", "66.67"]


def test_summarize_edge_cases():
  empty = metrics.summarize([], [], "network")
  assert empty["expressions"] == 0 and empty["oIoU"] == 0.0
  only_empty_gt = metrics.summarize([0], [0], "original")
  assert only_empty_gt["mIoU"] == 0.0 and only_empty_gt["Pr@0.5"] == 0.0
  with pytest.raises(ValueError, match="convention"):
    metrics.summarize(INTER, UNION, "lavt")


def test_accumulator_drops_padding_and_is_json():
  acc = metrics.IoUAccumulator("val", "network")
  acc.update(INTER[:4], UNION[:4], valid=np.ones(4, bool))
  acc.update(
    np.array([1, 6, 0, 0]), np.array([2, 10, 0, 9]), valid=[1, 1, 0, 0]
  )
  res = acc.result()
  assert res == {"split": "val", **metrics.summarize(INTER, UNION, "network")}
  assert json.loads(json.dumps(res)) == res
  other = metrics.IoUAccumulator("testA", "original")
  other.update(INTER, UNION)
  table = metrics.format_table([res, other.result()])
  lines = table.splitlines()
  assert len(lines) == 3 and "Pr@0.9" in lines[0] and "oIoU" in lines[0]
  assert lines[1].startswith("val") and "network" in lines[1]
  assert f"{100 * 20 / 31:.2f}" in lines[2] and "original" in lines[2]
  with pytest.raises(ValueError, match="convention"):
    metrics.IoUAccumulator("val", "cris")


class DeviceIoUTest(parameterized.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_network_iu(self):
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[:, 1:3, 1:3] = 1  # 4 pixels.
    pred = gt.copy()
    pred[1] = 0  # Empty prediction.
    pred[2, 0, :] = 1  # 4 extra pixels.
    gt[3] = 0  # Empty GT and a 2-pixel prediction.
    pred[3] = 0
    pred[3, 0, :2] = 1
    logits = _logits(pred)
    logits[1, 0, 0] = (0.5, 0.5)  # A tie is background.
    inter, union = self.variant(metrics.network_iu)(logits, gt)
    np.testing.assert_array_equal(inter, [4, 0, 4, 0])
    np.testing.assert_array_equal(union, [4, 4, 8, 2])

  @chex.variants(with_jit=True, without_jit=True)
  def test_original_iu(self):
    h, w, size, canvas = 4, 8, 8, 10
    mask = np.zeros((h, w), np.uint8)
    mask[1:3, 2:7] = 1
    box = pp.letterbox_params(h, w, size)
    target = pp.letterbox_mask(mask, box, size)
    gt = np.ones((2, canvas, canvas), np.uint8)  # Outside the image: ignored.
    gt[:, :h, :w] = mask
    logits = np.stack([_logits(target), _logits(np.ones_like(target))])
    boxes = np.stack([box.as_array()] * 2)
    inter, union = self.variant(metrics.original_iu)(logits, boxes, gt)
    np.testing.assert_array_equal(inter, [10, 10])
    np.testing.assert_array_equal(union, [10, h * w])

  def test_network_and_original_agree_without_resizing(self):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 6, 2)).astype(np.float32)
    gt = rng.integers(0, 2, (3, 6, 6)).astype(np.uint8)
    boxes = np.stack([pp.letterbox_params(6, 6, 6).as_array()] * 3)
    net = jax.jit(metrics.network_iu)(logits, gt)
    orig = jax.jit(metrics.original_iu)(
      logits, boxes, np.pad(gt, ((0, 0), (0, 2), (0, 2)))
    )
    chex.assert_trees_all_equal(net, orig)
