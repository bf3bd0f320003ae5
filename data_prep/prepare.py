"""Shared by the data_prep converters: check refs, write records, summarise.

A converter turns each referring object into a `RefResult` (its encoded
record, or why it is bad) with `build_result`; `write_split` streams the
results of a split into a `shards.SplitWriter` and publishes the split with a
manifest that lists every bad entry by id.
"""

from __future__ import annotations

import collections
import dataclasses
import io
from collections.abc import Iterable
from typing import Any

from absl import flags
from PIL import Image
from pycocotools import mask as mask_utils

from data_prep import shards
from jmceln_jax.data import records

# Canonical order of the refer splits; unknown split names follow, sorted.
SPLIT_ORDER = ("train", "val", "test", "testA", "testB", "testC")


class BadEntryError(RuntimeError):
  """A bad input entry under --strict."""


@dataclasses.dataclass(frozen=True)
class RefResult:
  """A worker's verdict on one ref: a record, or the reason it is bad."""

  ref_id: int
  image_id: int
  record: bytes | None
  num_sentences: int
  bad: tuple[dict[str, Any], ...]


def bad_entry(kind: str, ref: dict[str, Any], reason: str, **ids: Any) -> dict:
  """A manifest entry: kind ("ref" or "sentence"), ids and the reason."""
  return dict(
    kind=kind,
    ref_id=ref["ref_id"],
    image_id=ref["image_id"],
    reason=reason,
    **ids,
  )


def decoded_size(data: bytes) -> tuple[tuple[int, int] | None, str]:
  """Fully decodes image bytes: ((width, height), "") or (None, the error)."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()  # Raises on truncated or corrupt data.
      return im.size, ""
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return None, str(e)


def build_result(
  ref: dict[str, Any],
  image: dict[str, Any],
  data: bytes,
  mask: dict[str, Any] | None,
  problem: str = "",
) -> RefResult:
  """Drops empty sentences and encodes the record of one ref, or marks it bad.

  Args:
    ref: refer-style ref: ref_id, image_id, ann_id, split, category_id and
      sentences [{sent (or raw), sent_id, optional kind}]. When every
      sentence has a "kind" (the synthetic data), the record keeps them as
      `sentence_kinds`, for per-kind evaluation.
    image: file_name, height and width of its image.
    data: the image file bytes.
    mask: the target's compressed RLE (None when `problem`).
    problem: why the ref is bad, "" when it is not.

  Returns:
    The encoded record and every bad entry found.
  """
  sentences, sent_ids, kinds, bad = [], [], [], []
  for s in ref["sentences"]:
    text = str(s.get("sent", s.get("raw", ""))).strip()
    if text:
      sentences.append(text)
      sent_ids.append(int(s["sent_id"]))
      kinds.append(s.get("kind"))
    else:
      bad.append(
        bad_entry("sentence", ref, "empty sentence", sent_id=s["sent_id"])
      )
  if not problem and not sentences:
    problem = "no non-empty sentence left"
  if problem:
    bad.append(bad_entry("ref", ref, problem))
    return RefResult(ref["ref_id"], ref["image_id"], None, 0, tuple(bad))
  fields = {}
  if kinds and all(isinstance(k, str) for k in kinds):
    fields["sentence_kinds"] = kinds
  record = records.encode_record(
    dict(
      **fields,
      ref_id=int(ref["ref_id"]),
      image_id=int(ref["image_id"]),
      ann_id=int(ref["ann_id"]),
      category_id=int(ref["category_id"]),
      split=str(ref["split"]),
      file_name=str(image["file_name"]),
      height=int(image["height"]),
      width=int(image["width"]),
      bbox=list(ref.get("bbox") or mask_utils.toBbox(mask).tolist()),
      image=data,
      mask=mask,
      sentences=sentences,
      sent_ids=sent_ids,
    )
  )
  return RefResult(
    ref["ref_id"], ref["image_id"], record, len(sentences), tuple(bad)
  )


def write_split(
  writer: shards.SplitWriter,
  results: Iterable[RefResult],
  strict: bool,
  source: dict[str, Any],
) -> dict[str, Any]:
  """Writes the good records, collects the bad entries, publishes the split."""
  counts = collections.Counter(refs=0, sentences=0)
  images, bad = set(), []
  for res in results:
    if strict and res.bad:
      raise BadEntryError(
        f"{res.bad[0]['kind'].capitalize()} of ref {res.ref_id} (image "
        f"{res.image_id}): {res.bad[0]['reason']}. Fix the input, or run "
        "without --strict to skip bad entries and list them in the manifest."
      )
    bad.extend(res.bad)
    if res.record is not None:
      writer.write(res.record)
      images.add(res.image_id)
      counts["refs"] += 1
      counts["sentences"] += res.num_sentences
  counts["images"] = len(images)
  counts["bad_refs"] = sum(b["kind"] == "ref" for b in bad)
  counts["dropped_sentences"] = sum(b["kind"] == "sentence" for b in bad)
  return writer.finish(dict(counts=dict(counts), source=source, bad=bad))


def split_order(names: Iterable[str]) -> list[str]:
  """Sorts split names: refer's canonical order first, others alphabetically."""
  names = set(names)
  return [s for s in SPLIT_ORDER if s in names] + sorted(
    names - set(SPLIT_ORDER)
  )


def summary(manifests: dict[str, dict[str, Any]]) -> str:
  """A table of refs, sentences, images and bad entries per split."""
  lines = [f"{'split':<8}{'refs':>9}{'sents':>9}{'images':>9}{'bad':>6}"]
  for split, m in manifests.items():
    c = m["counts"]
    lines.append(
      f"{split:<8}{c['refs']:>9}{c['sentences']:>9}{c['images']:>9}"
      f"{c['bad_refs'] + c['dropped_sentences']:>6}"
    )
  return "\n".join(lines)


def define_output_flags(fv: flags.FlagValues, splits_help: str) -> None:
  """The converters' shared flags: --out, --splits, --strict, --shard_size.

  Args:
    fv: the converter's flags.
    splits_help: what --splits names and defaults to for this converter.
  """
  flags.DEFINE_string("out", None, "Output root folder.", flag_values=fv)
  flags.DEFINE_list("splits", None, splits_help, flag_values=fv)
  flags.DEFINE_bool(
    "strict",
    False,
    "Stop at the first bad entry instead of listing it.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "shard_size",
    1000,
    "Records per ArrayRecord shard.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.mark_flag_as_required("out", flag_values=fv)
