"""grain input pipelines over prepared ArrayRecord shards.

Training (`train_dataset`): an endless stream of batches. The refs of this
process's shard are reshuffled every epoch (deterministically from the seed),
and every ref contributes one sentence per epoch, drawn at random (as CRIS and
LAVT do). A batch may straddle an epoch boundary; nothing is dropped. The
iterator's `get_state()` is a small dict saved with each checkpoint, so a
resumed run sees exactly the batches an uninterrupted run would.

Evaluation (`eval_dataset`): every sentence of every ref exactly once, in
record order, padded at the end to whole global batches; padded rows carry
`valid = False` and never count.

Every example goes through `jmceln_jax.data.preprocess` (the same code as
prediction): decode, letterbox to S x S, CLIP normalisation, tokenisation to L.
Training can add `jmceln_jax.data.augmentation` (flip with mirrored sentence,
letterbox jitter; off by default).

Batch fields (per process, leading dimension = per-process batch B):
  image     [B, S, S, 3] uint8    letterboxed image (normalised on device)
  tokens    [B, L] int32          CLIP BPE ids, SOT ... EOT, 0-padded
  target    [B, S, S] uint8       letterboxed mask (the training target)
  box       [B, 6] int32          preprocess.Letterbox rows
  ref_id    [B] int32
eval only:
  gt        [B, M, M] uint8       original mask at the top-left of M x M
  sent_idx  [B] int32             index of the sentence within its ref
  index     [B] int32             position in the split's expression order
  valid     [B] bool              False on padding rows
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np
from absl import flags

from jmceln_jax.data import augmentation, preprocess, records, tokenizer

# Batches built concurrently and held ready per process (see `_finish`).
_PREFETCH = 4


@dataclasses.dataclass(frozen=True)
class Example:
  """Decodes one record and builds one (image, sentence, mask) example.

  Picklable (sent to grain worker processes); the tokenizer is rebuilt per
  process from its vocabulary path.
  """

  image_size: int
  max_len: int
  vocab: str
  canvas: int = 0  # M for evaluation's original-size masks; 0 = training.

  @functools.cached_property
  def _tokenizer(self) -> tokenizer.Tokenizer:
    return tokenizer.Tokenizer(self.max_len, self.vocab)

  def __call__(
    self,
    record: dict[str, Any],
    sentence: str,
    sent_idx: int,
    rng: np.random.Generator | None = None,
  ) -> dict[str, Any]:
    """One example; `rng` (training only) enables `augmentation.augment`."""
    image = preprocess.load_image(record["image"])
    mask = records.decode_mask(record)
    box = None
    if rng is not None:
      image, mask, sentence, box = augmentation.augment(
        image, mask, sentence, self.image_size, rng
      )
    image, box = preprocess.letterbox_image(image, self.image_size, box)
    out = {
      "image": image,
      "tokens": self._tokenizer(sentence)[0],
      "target": preprocess.letterbox_mask(mask, box, self.image_size),
      "box": box.as_array(),
      "ref_id": np.int32(record["ref_id"]),
    }
    if self.canvas:
      h, w = mask.shape
      if max(h, w) > self.canvas:
        raise ValueError(
          f"Image of ref {record['ref_id']} is {h}x{w}, larger than the "
          f"evaluation canvas {self.canvas}; raise "
          "--config.input.max_eval_size."
        )
      gt = np.zeros((self.canvas, self.canvas), np.uint8)
      gt[:h, :w] = mask
      out["gt"] = gt
      out["sent_idx"] = np.int32(sent_idx)
    return out


@dataclasses.dataclass(frozen=True)
class _TrainMap:
  """Record bytes + per-element RNG -> training example (random sentence,
  optionally augmented with the same RNG)."""

  example: Example
  augment: bool = False

  def __call__(self, data: bytes, rng: np.random.Generator) -> dict:
    record = records.decode_record(data)
    idx = int(rng.integers(len(record["sentences"])))
    return self.example(
      record, record["sentences"][idx], idx, rng if self.augment else None
    )


@dataclasses.dataclass(frozen=True)
class _EvalMap:
  """(record, sentence's record, sentence index, position, valid) -> example.

  The sentence normally comes from the example's own record; the shuffled-
  sentence check pairs images with other records' sentences.
  """

  example: Example
  source: Any

  def __call__(self, item: np.ndarray) -> dict:
    rec_idx, sent_rec, sent_idx, index, valid = (int(v) for v in item)
    record = records.decode_record(self.source[rec_idx])
    if sent_rec != rec_idx:
      sentence = records.decode_record(self.source[sent_rec])["sentences"][
        sent_idx
      ]
    else:
      sentence = record["sentences"][sent_idx]
    out = self.example(record, sentence, sent_idx)
    out["index"] = np.int32(index)
    out["valid"] = np.bool_(valid)
    return out


def split_source(
  data_dir: str, split: str
) -> grain.sources.ArrayRecordDataSource:
  """Random access to a prepared split's encoded records, in record order."""
  return grain.sources.ArrayRecordDataSource(
    records.shard_paths(data_dir, split)
  )


def _finish(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  """Batched MapDataset -> IterDataset, optionally in worker processes.

  Each process (this one, or each worker) builds up to `_PREFETCH` batches
  at once in threads and holds at most that many ready. grain's default read
  options (16 threads, 500 elements) would keep up to 500 whole batches in
  memory (about 11 GB at S=416, B=10) while the training step is slower.
  """
  it = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=_PREFETCH, prefetch_buffer_size=_PREFETCH)
  )
  if num_workers > 0:
    # grain's worker processes read absl flags (google/grain#1355); outside
    # an absl app (scripts, notebooks) nothing has parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


def num_refs(data_dir: str, split: str) -> int:
  """Number of refs (records) of a prepared split, from its manifest."""
  return int(records.read_manifest(data_dir, split)["counts"]["refs"])


def train_dataset(
  data_dir: str,
  split: str,
  *,
  image_size: int,
  max_len: int,
  batch_size: int,
  seed: int,
  vocab: str | None = None,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  augment: bool = False,
) -> grain.IterDataset:
  """Endless training batches of this process (see the module docstring).

  Args:
    data_dir: the `--out` directory of data_prep.
    split: e.g. "train".
    image_size: S.
    max_len: L.
    batch_size: per-process batch size.
    seed: shuffling and sentence-sampling seed.
    vocab: tokenizer vocabulary (None: the installed default).
    num_workers: grain worker processes (0 = in the main process).
    process_index, process_count: this host's slice of the refs.
    augment: random flip with mirrored sentence and letterbox jitter (see
      `jmceln_jax.data.augmentation`), drawn per example from `seed`; the
      iterator state still resumes exactly. "box" then holds each example's
      jittered geometry (of the flipped original when flipped).
  """
  example = Example(image_size, max_len, tokenizer.resolve_vocab(vocab))
  ds = grain.MapDataset.source(split_source(data_dir, split))
  ds = ds[process_index::process_count]
  if len(ds) < batch_size:
    raise ValueError(
      f"Split {split!r} has {len(ds)} refs on this process, fewer than one "
      f"batch of {batch_size}. Lower input.global_batch_size or prepare "
      "more data (e.g. more input.synthetic_images)."
    )
  ds = ds.shuffle(seed=seed).repeat(None)
  ds = ds.random_map(_TrainMap(example, augment), seed=seed)
  return _finish(ds.batch(batch_size, drop_remainder=True), num_workers)


def expression_index(data_dir: str, split: str) -> np.ndarray:
  """[N, 3] int64 (record, sentence's record, sentence index) of every
  expression of a split, in record order. Reads each record once."""
  source = split_source(data_dir, split)
  rows = []
  for i in range(len(source)):
    n = len(records.decode_record(source[i])["sentences"])
    rows += [(i, i, s) for s in range(n)]
  return np.asarray(rows, np.int64).reshape(-1, 3)


def expression_kinds(data_dir: str, split: str) -> list[str] | None:
  """The kind of every expression of a split ("colour", "position", ...), in
  `expression_index` order, or None when its records record no kinds
  (RefCOCO). Records without `sentence_kinds` next to ones with get ""."""
  source = split_source(data_dir, split)
  kinds, found = [], False
  for i in range(len(source)):
    record = records.decode_record(source[i])
    own = record.get("sentence_kinds")
    found |= own is not None
    kinds += own or [""] * len(record["sentences"])
  return kinds if found else None


def largest_image(data_dir: str, split: str) -> tuple[int, int]:
  """(longest image side, its ref id) of a split: evaluation's canvas
  (input.max_eval_size) must be at least that side."""
  source = split_source(data_dir, split)
  side, ref = 0, -1
  for i in range(len(source)):
    r = records.decode_record(source[i])
    if max(r["height"], r["width"]) > side:
      side, ref = max(r["height"], r["width"]), r["ref_id"]
  return side, ref


def shuffle_sentences(index: np.ndarray, seed: int) -> np.ndarray:
  """Gives every expression the sentence of another one (a random cyclic
  derangement), keeping images and masks in place: the language ablation.

  Args:
    index: [N, 3] from `expression_index`.
    seed: permutation seed.

  Returns:
    [N, 3] with columns 1-2 (the sentence's record and index) permuted.

  Raises:
    ValueError: for fewer than 2 expressions (no derangement exists).
  """
  if len(index) < 2:
    raise ValueError(
      f"Shuffling sentences needs >= 2 expressions, got {len(index)}."
    )
  order = np.random.default_rng(seed).permutation(len(index))
  donor = np.empty_like(order)
  donor[order] = np.roll(order, 1)
  out = index.copy()
  out[:, 1:] = index[donor, 1:]
  return out


def eval_dataset(
  data_dir: str,
  split: str,
  *,
  image_size: int,
  max_len: int,
  global_batch_size: int,
  canvas: int,
  vocab: str | None = None,
  num_workers: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  sentences: np.ndarray | None = None,
) -> tuple[grain.IterDataset, int]:
  """Every expression of a split once, as padded batches of this process.

  Args:
    global_batch_size: batch size over all processes; must be divisible by
      `process_count`.
    canvas: M, side of the original-size ground-truth canvas.
    sentences: optional [N, 3] expression index (see `expression_index`) to
      use instead of the split's own, e.g. from `shuffle_sentences`.
    (others as in `train_dataset`)

  Returns:
    (dataset, number of real expressions N). Every process yields the same
    number of batches, ceil(N / global_batch_size).
  """
  if global_batch_size % process_count:
    raise ValueError(
      f"Evaluation batch {global_batch_size} is not divisible by "
      f"{process_count} processes."
    )
  index = expression_index(data_dir, split) if sentences is None else sentences
  n = len(index)
  if n == 0:
    raise ValueError(f"Split {split!r} of {data_dir} has no expressions.")
  total = -(-n // global_batch_size) * global_batch_size
  rows = np.zeros((total, 5), np.int64)
  rows[:, :3] = index[np.minimum(np.arange(total), n - 1)]
  rows[:, 3] = np.arange(total)
  rows[:, 4] = np.arange(total) < n
  # Each global batch is split into contiguous per-process slices.
  per = global_batch_size // process_count
  rows = rows.reshape(-1, process_count, per, 5)[:, process_index].reshape(
    -1, 5
  )
  example = Example(image_size, max_len, tokenizer.resolve_vocab(vocab), canvas)
  ds = grain.MapDataset.source(rows).map(
    _EvalMap(example, split_source(data_dir, split))
  )
  return _finish(ds.batch(per, drop_remainder=True), num_workers), n
