"""OpenAI ResNet CLIP state dicts to Flax variables: the key and layout
mapping, the strict check, and the atomic Orbax write.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util
from tqdm import tqdm

from jmceln_jax.config_lib import CLIP_RN101
from jmceln_jax.convert import torch_pickle
from jmceln_jax.models import clip, clip_resnet
from jmceln_jax.utils import paths

# Keys are (collection, *module path, leaf), e.g.
# ("params", "visual", "conv1", "kernel").
FlatTree = dict[tuple[str, ...], np.ndarray]
# Parameters that OpenAI checkpoints lack; initialised fresh from --seed.
NEW_PREFIX = ("visual", "attnpool", "connect")
_MAX_LISTED = 25
_VISION_HPARAMS = ("image_resolution", "vision_layers", "vision_width")


class ConversionError(ValueError):
  """A checkpoint that does not match the Flax CLIP."""


def _flax_path(key: str, leaf: str) -> tuple[str, ...]:
  """Torch key -> Flax module path + new leaf; text keys go under "text"."""
  parts = key.split(".")[:-1]
  root = () if parts[:1] == ["visual"] else ("text",)
  return (*root, *parts, leaf)


def _as_is(key: str, x: np.ndarray) -> FlatTree:
  return {("params", *_flax_path(key, key.split(".")[-1])): x}


def _embedding(key: str, x: np.ndarray) -> FlatTree:
  return {("params", *_flax_path(key, "embedding")): x}


def _conv(key: str, x: np.ndarray) -> FlatTree:  # OIHW -> HWIO
  return {("params", *_flax_path(key, "kernel")): x.transpose(2, 3, 1, 0)}


def _dense(key: str, x: np.ndarray) -> FlatTree:  # [out, in] -> [in, out]
  if key.endswith(".weight"):
    return {("params", *_flax_path(key, "kernel")): x.T}
  return {("params", *_flax_path(key, "bias")): x}


def _layer_norm(key: str, x: np.ndarray) -> FlatTree:
  leaf = "scale" if key.endswith(".weight") else "bias"
  return {("params", *_flax_path(key, leaf)): x}


_BN_LEAVES = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def _batch_norm(key: str, x: np.ndarray) -> FlatTree:
  collection, leaf = _BN_LEAVES[key.split(".")[-1]]
  return {(collection, *_flax_path(key, leaf)): x}


def _in_proj(key: str, x: np.ndarray) -> FlatTree:
  """Fused attn.in_proj_{weight [3D, D], bias [3D]} -> q/k/v_proj."""
  is_weight = key.endswith("_weight")
  module = key.rsplit(".", 1)[0]
  out = {}
  for name, part in zip(
    ("q_proj", "k_proj", "v_proj"), np.split(x, 3), strict=True
  ):
    sub = f"{module}.{name}.{'weight' if is_weight else 'bias'}"
    out.update(_dense(sub, part))
  return out


def _drop(key: str, x: np.ndarray) -> FlatTree:
  del key, x
  return {}


_BLOCK = r"visual\.layer\d\.\d+\."
_RESBLOCK = r"transformer\.resblocks\.\d+\."
# (regex fully matching a torch key, handler). First match wins.
_RULES: tuple[tuple[str, Callable[[str, np.ndarray], FlatTree]], ...] = (
  (r"logit_scale|input_resolution|context_length|vocab_size", _drop),
  (r"visual\..*\.num_batches_tracked", _drop),
  (r"(visual\.attnpool\.)?positional_embedding|text_projection", _as_is),
  (r"token_embedding\.weight", _embedding),
  (rf"visual\.conv\d\.weight|{_BLOCK}(conv\d|downsample\.0)\.weight", _conv),
  (r"visual\.attnpool\.connect\.0\.weight", _conv),
  (
    rf"(visual\.bn\d|{_BLOCK}(bn\d|downsample\.1)|visual\.attnpool\.connect\.1)"
    r"\.(weight|bias|running_mean|running_var)",
    _batch_norm,
  ),
  (r"visual\.attnpool\.[qkvc]_proj\.(weight|bias)", _dense),
  (
    rf"{_RESBLOCK}(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)",
    _dense,
  ),
  (rf"{_RESBLOCK}attn\.in_proj_(weight|bias)", _in_proj),
  (rf"({_RESBLOCK}ln_[12]|ln_final)\.(weight|bias)", _layer_norm),
)


def map_state_dict(
  state: Mapping[str, np.ndarray],
) -> tuple[FlatTree, list[str]]:
  """Renames and reshapes torch CLIP tensors into the Flax tree (float32).

  Args:
    state: torch key -> array (OpenAI names).

  Returns:
    (flat Flax tree keyed by (collection, *path), torch keys no rule knows).
  """
  flat, unknown = {}, []
  for key, value in tqdm(state.items(), desc="mapping", unit="tensor"):
    for pattern, handler in _RULES:
      if re.fullmatch(pattern, key):
        if np.issubdtype(value.dtype, np.floating) or (
          value.dtype == ml_dtypes.bfloat16
        ):
          value = np.asarray(value, np.float32)
        flat.update(handler(key, value))
        break
    else:
      unknown.append(key)
  return flat, unknown


def _listing(title: str, items: Sequence[str]) -> str:
  shown = "\n".join(f"    {item}" for item in items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return f"  {title} ({len(items)}):\n{shown}" + (
    f"\n    ... and {more} more" if more > 0 else ""
  )


def _params_first(key: tuple[str, ...]) -> tuple[bool, tuple[str, ...]]:
  return key[0] != "params", key


def _key_diff(
  flat: FlatTree, unknown: Sequence[str], expected: FlatTree
) -> list[str]:
  """Human-readable missing / unexpected / shape-mismatch listings."""
  missing = [
    "/".join(k)
    for k in sorted(expected.keys() - flat.keys(), key=_params_first)
    if k[1 : 1 + len(NEW_PREFIX)] != NEW_PREFIX
  ]
  unexpected = sorted(unknown) + sorted(
    "/".join(k) for k in flat.keys() - expected.keys()
  )
  mismatched = sorted(
    f"{'/'.join(k)}: checkpoint {flat[k].shape}, model {expected[k].shape}"
    for k in flat.keys() & expected.keys()
    if flat[k].shape != expected[k].shape
  )
  return [
    _listing(title, items)
    for title, items in (
      ("missing", missing),
      ("unexpected", unexpected),
      ("shape mismatch", mismatched),
    )
    if items
  ]


def _fresh_new_params(hparams: Mapping[str, Any], seed: int) -> FlatTree:
  """Random init of the `connect` residual (1x1 conv + BN) for the pool."""
  module = clip_resnet.PoolConvBN(hparams["embed_dim"])
  x = np.zeros((1, 1, 1, 32 * hparams["vision_width"]), np.float32)
  init = jax.jit(functools.partial(module.init, use_running_average=True))
  variables = init(jax.random.key(seed), x)
  flat = traverse_util.flatten_dict(jax.device_get(variables))
  return {(k[0], *NEW_PREFIX, *k[1:]): np.asarray(v) for k, v in flat.items()}


def convert_state_dict(
  state: Mapping[str, np.ndarray], *, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
  """Torch CLIP state dict -> (hyperparameters, {"params", "batch_stats"}).

  Args:
    state: torch key -> array (OpenAI names, any float dtype).
    seed: PRNG seed of the new `connect` parameters.

  Returns:
    (hyperparameters as in `clip.HPARAMS`, Flax variables of numpy float32).

  Raises:
    ConversionError: with the missing / unexpected / mismatched key lists
      when the checkpoint is not a ResNet CLIP the model can hold.
  """
  flat, unknown = map_state_dict(state)
  shapes = {k: v.shape for k, v in state.items()}
  try:
    hparams = clip.text_hparams_from_shapes(shapes)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  try:
    hparams.update(clip.vision_hparams_from_shapes(shapes))
    problem = None
  except ValueError as e:  # Still list the key diff, against RN101's tower.
    hparams.update({k: CLIP_RN101[k] for k in _VISION_HPARAMS})
    problem = f"{e} Key diff against an RN101 image tower:"
  hparams = {k: hparams[k] for k in clip.HPARAMS}
  abstract = clip.abstract_variables(clip.CLIP(**hparams))
  expected = traverse_util.flatten_dict(abstract)
  diff = _key_diff(flat, unknown, expected)
  if problem or diff:
    title = problem or "The checkpoint does not match the CLIP model:"
    raise ConversionError("\n".join([title, *diff]))
  for key, value in _fresh_new_params(hparams, seed).items():
    flat.setdefault(key, value)
  return hparams, traverse_util.unflatten_dict(flat)


def _sha256(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def _sibling(path: str, tag: str) -> str:
  """Creates a new hidden directory next to `path` (mode from the umask)."""
  parent, base = os.path.split(path)
  sibling = os.path.join(parent, f".{base}.{tag}-{uuid.uuid4().hex[:12]}")
  os.mkdir(sibling)
  return sibling


def _install(tmp: str, out: str, overwrite: bool) -> None:
  """Renames the finished `tmp` to `out`, replacing `out` if allowed."""
  if os.path.isdir(out) and not os.listdir(out):
    os.rmdir(out)
  if not os.path.exists(out):
    os.rename(tmp, out)
    return
  if not overwrite:
    raise FileExistsError(f"{out} appeared during the conversion.")
  old = _sibling(out, "old")
  previous = os.path.join(old, "previous")
  os.rename(out, previous)
  try:
    os.rename(tmp, out)
  except OSError:
    os.rename(previous, out)
    raise
  finally:
    if os.path.exists(previous):
      shutil.rmtree(old)
    else:
      os.rmdir(old)


def convert(
  checkpoint: str, out: str, *, overwrite: bool = False, seed: int = 0
) -> dict[str, Any]:
  """Converts `checkpoint` into the directory `out` (see module docstring).

  Args:
    checkpoint: OpenAI .pt (TorchScript), torch.save zip or .safetensors.
    out: output directory; must not exist or be empty unless `overwrite`.
      Both paths may be relative or start with `~` (paths.absolute).
    overwrite: replace an existing non-empty `out` (only once the new
      conversion is complete).
    seed: PRNG seed of the new `connect` parameters.

  Returns:
    The contents of clip_config.json.
  """
  checkpoint, out = paths.absolute(checkpoint), paths.absolute(out)
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(
      f"{out} exists and is not empty; pass --overwrite to replace it."
    )
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f"{out} exists and is not a directory.")
  start = time.perf_counter()
  print(f"Reading {checkpoint} ...", file=sys.stderr)
  state, fmt = torch_pickle.load_state_dict(checkpoint)
  print(
    f"  {len(state)} tensors ({fmt}) in {time.perf_counter() - start:.1f} s",
    file=sys.stderr,
  )
  hparams, variables = convert_state_dict(state, seed=seed)
  del state
  config = {
    **{k: list(v) if k == "vision_layers" else v for k, v in hparams.items()},
    "source_file": os.path.basename(checkpoint),
    "source_sha256": _sha256(checkpoint),
    "source_format": fmt,
    "connect_init_seed": seed,
  }
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = _sibling(out, "tmp")
  try:
    print("Writing the Orbax checkpoint ...", file=sys.stderr)
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, clip.CHECKPOINT_SUBDIR), variables)
    with open(os.path.join(tmp, clip.CONFIG_FILE), "w") as f:
      json.dump(config, f, indent=2)
    _install(tmp, out, overwrite)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)
  print(f"Done in {time.perf_counter() - start:.1f} s: {out}", file=sys.stderr)
  return config
