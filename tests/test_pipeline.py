"""grain pipelines over prepared data: synthetic -> data_prep -> batches.

One tiny synthetic dataset is generated and converted per module; batches are
compared with what preprocess/text make of the raw source files directly.
"""

import json
import multiprocessing
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from bench import data as bench_data
from data_prep import refcoco, refer_io, shards, synthetic
from jmceln_jax.data import (
  augmentation,
  pipeline,
  preprocess,
  records,
  tokenizer,
)

NAME = "syn"
S = 32  # Training image side.
EVAL_S = 160  # >= every synthetic image side: the letterbox only upscales.
M = 160  # Evaluation canvas.
L = 12
pytestmark = pytest.mark.filterwarnings(
  "ignore:__array__ implementation:DeprecationWarning"
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """(raw refer root, prepared data dir) of 16 synthetic images."""
  raw = str(tmp_path_factory.mktemp("raw"))
  prepared = str(tmp_path_factory.mktemp("prepared"))
  synthetic.generate(raw, num_images=16, seed=0, name=NAME, progress=False)
  refcoco.convert(
    raw,
    os.path.join(raw, "images"),
    NAME,
    "unc",
    prepared,
    shard_size=5,
    progress=False,
  )
  return raw, prepared


def _take(dataset, n=None):
  """The first n batches (all for n=None); the iterator is closed after."""
  iterator = iter(dataset)
  try:
    if n is None:
      return list(iterator)
    return [next(iterator) for _ in range(n)]
  finally:
    iterator.close()


def _concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _resume_after(dataset_fn, steps, more):
  """`more` batches of a fresh iterator restored after `steps` batches."""
  iterator = iter(dataset_fn())
  try:
    [next(iterator) for _ in range(steps)]
    state = iterator.get_state()
  finally:
    iterator.close()
  resumed = iter(dataset_fn())
  try:
    resumed.set_state(state)
    return [next(resumed) for _ in range(more)]
  finally:
    resumed.close()


def _train(prepared, split="train", **kw):
  kw = dict(image_size=S, max_len=L, batch_size=4, seed=0) | kw
  return pipeline.train_dataset(prepared, split, **kw)


def _eval(prepared, split="testA", **kw):
  kw = dict(image_size=EVAL_S, max_len=L, global_batch_size=4, canvas=M) | kw
  return pipeline.eval_dataset(prepared, split, **kw)


def _expressions(prepared, split):
  """[(ref_id, sentence index, sentence)] in record order."""
  return [
    (r["ref_id"], i, s)
    for r in records.iter_records(prepared, split)
    for i, s in enumerate(r["sentences"])
  ]


def test_eval_yields_every_expression_once_in_order(data):
  _, prepared = data
  expected = _expressions(prepared, "testA")
  n = len(expected)
  # An even global batch that leaves the last batch padded (any n >= 1).
  gb = next(g for g in range(4, 2 * n + 4, 2) if n % g)
  half = gb // 2
  ds, count = _eval(prepared, global_batch_size=gb)
  batches = _take(ds)
  assert count == n and len(batches) == -(-n // gb)
  b = _concat(batches)
  np.testing.assert_array_equal(b["index"], np.arange(len(b["index"])))
  np.testing.assert_array_equal(b["valid"], np.arange(len(b["valid"])) < n)
  got = list(
    zip(b["ref_id"][:n].tolist(), b["sent_idx"][:n].tolist(), strict=True)
  )
  assert got == [(r, i) for r, i, _ in expected]
  # Every process: the same number of batches, its half of each one.
  slices = [
    _take(
      _eval(prepared, global_batch_size=gb, process_index=p, process_count=2)[0]
    )
    for p in (0, 1)
  ]
  assert len(slices[0]) == len(slices[1]) == len(batches)
  for p, part in enumerate(slices):
    for step, pb in enumerate(part):
      np.testing.assert_array_equal(
        pb["index"], gb * step + half * p + np.arange(half)
      )
      full = {k: v[half * p : half * (p + 1)] for k, v in batches[step].items()}
      _assert_same([pb], [full])
  both = np.concatenate([pb["index"][pb["valid"]] for s in slices for pb in s])
  np.testing.assert_array_equal(np.sort(both), np.arange(n))
  with pytest.raises(ValueError, match="not divisible by 3 processes"):
    _eval(prepared, process_count=3)


def _near_border(mask):
  """[H, W] bool: pixels with an 8-neighbour of the other label."""
  h, w = mask.shape
  padded = np.pad(mask, 1, mode="edge")
  out = np.zeros(mask.shape, bool)
  for dy in range(3):
    for dx in range(3):
      out |= padded[dy : dy + h, dx : dx + w] != mask
  return out


def test_eval_fields_match_the_sources(data):
  raw, prepared = data
  inst = refer_io.load_instances(os.path.join(raw, NAME, "instances.json"))
  recs = {r["ref_id"]: r for r in records.iter_records(prepared, "testA")}
  b = _concat(_take(_eval(prepared)[0]))
  for row in np.flatnonzero(b["valid"]):
    rec = recs[int(b["ref_id"][row])]
    image = inst.images[rec["image_id"]]
    h, w = image["height"], image["width"]
    polygons = inst.annotations[rec["ann_id"]]["segmentation"]
    rles = mask_utils.frPyObjects(polygons, h, w)
    mask = (mask_utils.decode(rles).sum(axis=2) > 0).astype(np.uint8)
    gt = b["gt"][row]
    np.testing.assert_array_equal(gt[:h, :w], mask)
    assert gt.sum() == mask.sum()  # Zeros outside the image.
    box = preprocess.letterbox_params(h, w, EVAL_S)
    np.testing.assert_array_equal(b["box"][row], box.as_array())
    target = b["target"][row]
    np.testing.assert_array_equal(
      target, preprocess.letterbox_mask(mask, box, EVAL_S)
    )
    one_hot = np.stack([1 - target, target], axis=-1).astype(np.float32)
    back = preprocess.unletterbox_numpy(one_hot, box).argmax(-1)
    wrong = back != mask
    assert wrong.mean() < 0.02 and not (wrong & ~_near_border(mask)).any()
    sentence = rec["sentences"][int(b["sent_idx"][row])]
    np.testing.assert_array_equal(
      b["tokens"][row], tokenizer.tokenize(sentence, L)[0]
    )
    pixels = preprocess.load_image(
      os.path.join(raw, "images", image["file_name"])
    )
    assert b["image"].dtype == np.uint8  # Normalised on device.
    np.testing.assert_array_equal(
      b["image"][row], preprocess.letterbox_image(pixels, EVAL_S)[0]
    )


def test_train_batches_are_reproducible(data):
  _, prepared = data
  first = _take(_train(prepared), 5)
  assert {k: (v.shape, v.dtype) for k, v in first[0].items()} == {
    "image": ((4, S, S, 3), np.uint8),
    "tokens": ((4, L), np.int32),
    "target": ((4, S, S), np.uint8),
    "box": ((4, 6), np.int32),
    "ref_id": ((4,), np.int32),
  }
  _assert_same(_take(_train(prepared), 5), first)
  other = _take(_train(prepared, seed=1), 5)
  assert not np.array_equal(_concat(other)["ref_id"], _concat(first)["ref_id"])
  # Resume mid-epoch from the state a checkpoint would hold.
  _assert_same(_resume_after(lambda: _train(prepared), 2, 3), first[2:])


def _which_flip(image, target, pixels, mask, box):
  """The flips (False/True) of the source image and mask that letterbox
  under `box` to exactly `image` and `target`."""
  found = []
  for flip in (False, True):
    if flip:
      pixels, mask = pixels[:, ::-1].copy(), mask[:, ::-1].copy()
    canvas, _ = preprocess.letterbox_image(pixels, S, box)
    if np.array_equal(canvas, image) and np.array_equal(
      preprocess.letterbox_mask(mask, box, S), target
    ):
      found.append(flip)
  return found


def test_train_augmentation(data):
  _, prepared = data
  recs = {r["ref_id"]: r for r in records.iter_records(prepared, "train")}
  steps = 6
  plain = _concat(_take(_train(prepared), steps))
  batches = _take(_train(prepared, augment=True), steps)
  _assert_same(_take(_train(prepared, augment=True), steps), batches)
  _assert_same(
    _resume_after(lambda: _train(prepared, augment=True), 2, 3), batches[2:5]
  )
  aug = _concat(batches)
  # Augmentation draws after the sentence: the same refs and sentences.
  np.testing.assert_array_equal(aug["ref_id"], plain["ref_id"])
  flips, mirrored, jittered = [], [], 0
  for row, ref_id in enumerate(aug["ref_id"].tolist()):
    rec = recs[ref_id]
    pixels, mask = preprocess.load_image(rec["image"]), records.decode_mask(rec)
    h, w = mask.shape
    fit = preprocess.letterbox_params(h, w, S)
    np.testing.assert_array_equal(plain["box"][row], fit.as_array())  # Off.
    box = preprocess.Letterbox(*aug["box"][row].tolist())
    assert (box.height, box.width) == (h, w)
    for new, full in (
      (box.new_height, fit.new_height),
      (box.new_width, fit.new_width),
    ):
      assert np.floor(augmentation.MIN_SCALE * full) <= new <= full
    assert box.top + box.new_height <= S and box.left + box.new_width <= S
    jittered += box != fit
    (flip,) = _which_flip(
      aug["image"][row], aug["target"][row], pixels, mask, box
    )
    # The sentence is mirrored exactly when the image and mask are flipped.
    sentence = next(
      s
      for s in rec["sentences"]
      if np.array_equal(tokenizer.tokenize(s, L)[0], plain["tokens"][row])
    )
    want = augmentation.mirror_sentence(sentence) if flip else sentence
    np.testing.assert_array_equal(
      aug["tokens"][row], tokenizer.tokenize(want, L)[0]
    )
    flips.append(flip)
    mirrored.append(flip and want != sentence)
  assert 0 < sum(flips) < len(flips) and any(mirrored)
  assert jittered > len(flips) // 2


def test_flip_mirrors_left_and_right(data):
  _, prepared = data
  rec = next(records.iter_records(prepared, "train"))
  pixels, mask = preprocess.load_image(rec["image"]), records.decode_mask(rec)
  example = pipeline.Example(S, L, tokenizer.resolve_vocab(None))
  flips = set()
  for seed in range(6):
    for sentence, mirrored in (
      ("the leftover cup on the left", "the leftover cup on the right"),
      ("the cup right next to the plate", None),  # Never flipped.
    ):
      out = example(rec, sentence, 0, np.random.default_rng(seed))
      box = preprocess.Letterbox(*out["box"].tolist())
      (flip,) = _which_flip(out["image"], out["target"], pixels, mask, box)
      assert not (flip and mirrored is None)
      want = mirrored if flip else sentence
      np.testing.assert_array_equal(
        out["tokens"], tokenizer.tokenize(want, L)[0]
      )
      flips.add(flip)
  assert flips == {False, True}
  with pytest.raises(ValueError, match="letterbox is for a"):
    preprocess.letterbox_image(pixels[1:], S, box)
  with pytest.raises(ValueError, match="min_scale"):
    preprocess.random_letterbox_params(4, 4, S, np.random.default_rng(0), 0.0)


@pytest.mark.parametrize(
  "sentence, mirrored",
  [
    ("the cup on the left", "the cup on the right"),
    (
      "Right guy, LEFT of the Left-hand door",
      "Left guy, RIGHT of the Right-hand door",
    ),
    ("leftmost of the rightmost two", "rightmost of the leftmost two"),
    ("leftover pie, alright, upright", "leftover pie, alright, upright"),
    ("guy on right in red", "guy on left in red"),
    ("far right by the door", "far left by the door"),
    ("the man right next to the bus", None),
    ("girl right behind the left bench", None),
  ],
)
def test_mirror_sentence(sentence, mirrored):
  assert augmentation.mirror_sentence(sentence) == mirrored


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data):
  _, prepared = data
  before = len(multiprocessing.active_children())
  iterator = iter(_train(prepared, num_workers=2))
  try:
    batches = [next(iterator) for _ in range(4)]
    assert len(multiprocessing.active_children()) == before + 2
  finally:
    iterator.close()
  _assert_same(batches, _take(_train(prepared), 4))


def test_each_epoch_visits_every_ref_once(data):
  _, prepared = data
  recs = {r["ref_id"]: r for r in records.iter_records(prepared, "train")}
  n = len(recs)
  # Batches that tile an epoch: n's largest proper divisor (n if prime).
  batch = max((d for d in range(2, n // 2 + 1) if n % d == 0), default=n)
  steps = n // batch
  epochs = 3
  b = _concat(_take(_train(prepared, batch_size=batch), steps * epochs))
  ref_ids = b["ref_id"].reshape(epochs, n)
  for epoch in ref_ids:
    assert sorted(epoch.tolist()) == sorted(recs)
  assert len({tuple(e) for e in ref_ids.tolist()}) == epochs  # Reshuffled.
  choices = {}
  for ref_id, tokens in zip(b["ref_id"].tolist(), b["tokens"], strict=True):
    options = tokenizer.tokenize(recs[ref_id]["sentences"], L)
    matches = np.flatnonzero((options == tokens).all(axis=1))
    assert len(matches) >= 1, ref_id
    choices.setdefault(ref_id, set()).add(int(matches[0]))
  assert sum(len(c) > 1 for c in choices.values()) >= n // 3
  # Processes see disjoint refs that together are the whole split.
  seen = set()
  for p in (0, 1):
    part = _train(prepared, process_index=p, process_count=2)
    steps = -(-n // 8)  # A whole epoch of each half.
    ids = set(_concat(_take(part, steps))["ref_id"].tolist())
    assert seen.isdisjoint(ids)
    seen |= ids
  assert seen == set(recs)


def test_shuffle_sentences(data):
  _, prepared = data
  index = pipeline.expression_index(prepared, "testA")
  assert index.shape == (len(_expressions(prepared, "testA")), 3)
  shuffled = pipeline.shuffle_sentences(index, seed=0)
  np.testing.assert_array_equal(shuffled[:, 0], index[:, 0])
  assert not (shuffled[:, 1:] == index[:, 1:]).all(axis=1).any()
  assert sorted(map(tuple, shuffled[:, 1:])) == sorted(map(tuple, index[:, 1:]))
  np.testing.assert_array_equal(pipeline.shuffle_sentences(index, 0), shuffled)
  assert not np.array_equal(pipeline.shuffle_sentences(index, 1), shuffled)
  with pytest.raises(ValueError, match=">= 2 expressions"):
    pipeline.shuffle_sentences(index[:1], 0)
  plain = _concat(_take(_eval(prepared)[0]))
  mixed = _concat(_take(_eval(prepared, sentences=shuffled)[0]))
  for k in ("image", "target", "gt", "box", "ref_id", "index", "valid"):
    np.testing.assert_array_equal(mixed[k], plain[k], err_msg=k)
  sentences = [r["sentences"] for r in records.iter_records(prepared, "testA")]
  n = len(index)
  donors = [sentences[r][s] for _, r, s in shuffled]
  np.testing.assert_array_equal(
    mixed["tokens"][:n], tokenizer.tokenize(donors, L)
  )
  np.testing.assert_array_equal(mixed["sent_idx"][:n], shuffled[:, 2])


def test_expression_kinds_follow_the_index(data, tmp_path):
  raw, prepared = data
  index = pipeline.expression_index(prepared, "testA")
  kinds = pipeline.expression_kinds(prepared, "testA")
  refs = {
    r["ref_id"]: r for r in refer_io.load_refs(f"{raw}/{NAME}/refs(unc).p")
  }
  recs = list(records.iter_records(prepared, "testA"))
  want = [refs[recs[r]["ref_id"]]["sentences"][s]["kind"] for r, _, s in index]
  assert kinds == want and len(set(kinds)) > 1
  # The same records without kinds (as RefCOCO's): None.
  plain = str(tmp_path / "plain")
  with shards.SplitWriter(plain, "testA", shard_size=4) as writer:
    for rec in recs:
      del rec["sentence_kinds"]
      writer.write(records.encode_record(rec))
    writer.finish({})
  assert pipeline.expression_kinds(plain, "testA") is None
  np.testing.assert_array_equal(
    pipeline.expression_index(plain, "testA"), index
  )


def test_clear_errors(data):
  _, prepared = data
  n_val = pipeline.num_refs(prepared, "val")
  with pytest.raises(ValueError, match="fewer than one batch"):
    pipeline.train_dataset(
      prepared, "val", image_size=S, max_len=L, batch_size=n_val + 1, seed=0
    )
  with pytest.raises(ValueError, match="larger than the evaluation canvas"):
    _take(_eval(prepared, canvas=64)[0], 1)
  with pytest.raises(FileNotFoundError, match="prepared splits") as e:
    _train(prepared, split="nope")
  assert "['testA', 'testB', 'train', 'val']" in str(e.value)


def test_bench_tiny(tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert bench_data.main(["--tiny", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert [(r["pipeline"], r["workers"]) for r in result["results"]] == [
    ("train", 0),
    ("eval", 0),
  ]
  assert all(r["samples_per_s"] > 0 for r in result["results"])
  assert result["hardware"]["cpu_count"] >= 1
  assert result["dataset"]["refs"] == 6
  assert "samples/s" in capsys.readouterr().out
