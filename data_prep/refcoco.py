r"""Converts raw refer data (RefCOCO, RefCOCO+, RefCOCOg) into ArrayRecord shards.

  python -m data_prep.refcoco --refer_root DATA --coco_images DATA/train2014 \
      --dataset refcoco --split_by unc --out data/refcoco_unc

Reads `refs(<split_by>).p` and `instances.json` of the dataset and the COCO
images, and writes `<out>/<split>/<split>-NNNNN-of-NNNNN.array_record` (one
record per referring object, see jmceln_jax/data/records.py) plus
`<out>/<split>/manifest.json` for every split. Bad entries (missing or corrupt
image, empty or out-of-bounds mask, empty sentence) are listed by id in the
manifest and skipped; `--strict` stops at the first one instead. Each split is
written to a temporary folder and renamed into place when complete; a re-run
always rebuilds and replaces a split only once the new one is complete.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import tqdm
from absl import flags
from pycocotools import mask as mask_utils

from data_prep import parallel, prepare, refer_io, shards
from jmceln_jax.utils import cli_flags, paths

_REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
# A polygon mask is out of bounds when less than this share of its area lies
# inside the image (COCO polygons overhang the border by a pixel at times).
_MIN_INSIDE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class ImageTask:
  """The refs of one image: the unit of work of a worker process."""

  path: str
  image: dict[str, Any] | None
  items: tuple[tuple[dict[str, Any], dict[str, Any] | None], ...]


def _check_image(path: str, image: dict[str, Any]) -> tuple[bytes, str]:
  """Reads and fully decodes an image; returns (bytes, "" or the problem)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    return b"", f"missing or unreadable image file {path} ({e.strerror})"
  size, error = prepare.decoded_size(data)
  if error:
    return b"", f"corrupt image file {path} ({error})"
  expected = (int(image["width"]), int(image["height"]))
  if size != expected:
    return b"", (
      f"image {path} is {size[0]}x{size[1]}, instances.json says "
      f"{expected[0]}x{expected[1]}"
    )
  return data, ""


def _mask(
  ref: dict[str, Any], ann: dict[str, Any] | None, height: int, width: int
) -> tuple[dict[str, Any] | None, str]:
  """(compressed RLE, "") of the ref's mask, or (None, the problem)."""
  if ann is None:
    return None, f"annotation {ref['ann_id']} missing from instances.json"
  try:
    rle = refer_io.annotation_rle(ann, height, width)
  except ValueError as e:
    return None, f"bad segmentation: {e}"
  area = int(mask_utils.area(rle))
  full = refer_io.unclipped_area(ann, height, width)
  if area == 0:
    return None, "empty mask"
  if area < _MIN_INSIDE_FRACTION * full:
    return None, (
      f"mask out of bounds: {area} of its {full} pixels lie inside the image"
    )
  return rle, ""


def _ref_result(
  ref: dict[str, Any],
  ann: dict[str, Any] | None,
  image: dict[str, Any],
  data: bytes,
) -> prepare.RefResult:
  """The record of one refer ref whose image decoded fine."""
  rle, problem = _mask(ref, ann, int(image["height"]), int(image["width"]))
  if ann is not None:
    ref = {
      **ref,
      "category_id": ann.get("category_id", ref.get("category_id", 0)),
      "bbox": ann.get("bbox"),
    }
  return prepare.build_result(ref, image, data, rle, problem)


def process_image(task: ImageTask) -> list[prepare.RefResult]:
  """Worker: checks the image once and builds the records of its refs."""
  if task.image is None:
    image_id = task.items[0][0]["image_id"]
    data, problem = b"", f"image {image_id} missing from instances.json"
  else:
    data, problem = _check_image(task.path, task.image)
  if problem:
    return [
      prepare.RefResult(
        r["ref_id"],
        r["image_id"],
        None,
        0,
        (prepare.bad_entry("ref", r, problem),),
      )
      for r, _ in task.items
    ]
  return [_ref_result(r, a, task.image, data) for r, a in task.items]


def _tasks(
  refs: Iterable[dict[str, Any]], inst: refer_io.Instances, image_dir: str
) -> list[ImageTask]:
  """Groups refs by image; images by id, refs of an image by ref id."""
  by_image = collections.defaultdict(list)
  for ref in refs:
    by_image[int(ref["image_id"])].append(ref)
  tasks = []
  for image_id in sorted(by_image):
    image = inst.images.get(image_id)
    name = image["file_name"] if image else ""
    items = tuple(
      (r, inst.annotations.get(int(r["ann_id"])))
      for r in sorted(by_image[image_id], key=lambda r: r["ref_id"])
    )
    tasks.append(ImageTask(os.path.join(image_dir, name), image, items))
  return tasks


def _results(
  pmap: parallel.OrderedMap, tasks: list[ImageTask], desc: str, progress: bool
) -> Iterator[prepare.RefResult]:
  """`process_image` over the tasks, in order, with a progress bar."""
  with tqdm.tqdm(
    total=len(tasks), desc=desc, unit="img", disable=not progress
  ) as bar:
    for batch in pmap(process_image, tasks, 4):
      bar.update()
      yield from batch


def convert(
  refer_root: str,
  coco_images: str,
  dataset: str,
  split_by: str,
  out: str,
  *,
  splits: Sequence[str] | None = None,
  strict: bool = False,
  num_workers: int = 0,
  shard_size: int = 1000,
  progress: bool = True,
) -> dict[str, dict[str, Any]]:
  """Converts one refer dataset into prepared ArrayRecord splits.

  Args:
    refer_root: the refer data folder (or the dataset folder itself).
    coco_images: folder of the COCO train2014 JPEGs (or its parent).
    dataset: "refcoco", "refcoco+", "refcocog" or another folder name.
    split_by: "unc", "umd" or "google" (the refs file is refs(<split_by>).p).
    out: output root; split `s` goes to `out/s`.
    splits: the splits to write; all splits of the refs file when None.
    strict: raise prepare.BadEntryError at the first bad entry.
    num_workers: worker processes that decode images and masks (0: inline).
      The output is identical for every value.
    shard_size: records per ArrayRecord shard.
    progress: show tqdm progress bars.

  Returns:
    split name -> the manifest written for it.
  """
  refs_path, instances_path = refer_io.resolve_dataset_files(
    refer_root, dataset, split_by
  )
  all_refs = refer_io.load_refs(refs_path)
  for ref in all_refs:
    missing = [k for k in _REQUIRED_REF_KEYS if k not in ref]
    if missing:
      raise ValueError(f"{refs_path}: a ref lacks {missing}: {ref}")
  inst = refer_io.load_instances(instances_path)
  available = prepare.split_order(r["split"] for r in all_refs)
  unknown = sorted(set(splits or ()) - set(available))
  if unknown:
    raise ValueError(
      f"Splits {unknown} are not in {refs_path}; it has {available}."
    )
  names = [
    inst.images[r["image_id"]]["file_name"]
    for r in all_refs
    if r["image_id"] in inst.images
  ]
  image_dir = refer_io.resolve_image_dir(coco_images, names)
  source = dict(
    dataset=dataset,
    split_by=split_by,
    refs_file=os.path.abspath(refs_path),
    refs_sha256=refer_io.file_sha256(refs_path),
    instances_file=os.path.abspath(instances_path),
    instances_sha256=refer_io.file_sha256(instances_path),
    image_dir=os.path.abspath(image_dir),
  )
  manifests = {}
  with parallel.ordered_map(num_workers) as pmap:
    for split in prepare.split_order(splits) if splits else available:
      tasks = _tasks(
        [r for r in all_refs if r["split"] == split], inst, image_dir
      )
      with shards.SplitWriter(out, split, shard_size) as writer:
        results = _results(pmap, tasks, split, progress)
        manifests[split] = prepare.write_split(writer, results, strict, source)
  return manifests


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "refer_root",
    None,
    "Refer data folder holding <dataset>/refs(<split_by>).p and "
    "<dataset>/instances.json, or the dataset folder itself.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "coco_images",
    None,
    "Folder of COCO train2014 JPEGs (or its parent).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "dataset",
    "refcoco",
    "refcoco, refcoco+, refcocog (or a synthetic name).",
    flag_values=fv,
  )
  flags.DEFINE_string("split_by", "unc", "unc, umd or google.", flag_values=fv)
  prepare.define_output_flags(
    fv, "Splits to write, comma-separated (default: all in the refs file)."
  )
  flags.DEFINE_integer(
    "num_workers",
    min(8, os.cpu_count() or 1),
    "Image-decoding processes (0: in this process).",
    lower_bound=0,
    flag_values=fv,
  )
  flags.mark_flags_as_required(["refer_root", "coco_images"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point (see the module docstring)."""
  args = cli_flags.parse(
    argv, _define, program="python -m data_prep.refcoco", doc=__doc__
  )
  args.refer_root = paths.absolute(args.refer_root)
  args.coco_images = paths.absolute(args.coco_images)
  args.out = paths.absolute(args.out)
  try:
    manifests = convert(
      args.refer_root,
      args.coco_images,
      args.dataset,
      args.split_by,
      args.out,
      splits=args.splits,
      strict=args.strict,
      num_workers=args.num_workers,
      shard_size=args.shard_size,
    )
  except (
    prepare.BadEntryError,
    FileNotFoundError,
    ValueError,
    refer_io.UnsafePickleError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(prepare.summary(manifests))
  bad = sum(len(m["bad"]) for m in manifests.values())
  if bad:
    print(f"{bad} bad entries skipped; see <out>/<split>/manifest.json 'bad'.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
