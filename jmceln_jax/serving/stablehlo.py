"""A run's prediction function as a jax.export (StableHLO) artifact with its
weights, tokenizer and standalone loader.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jmceln_jax.data import preprocess, tokenizer
from jmceln_jax.serving import exported
from jmceln_jax.serving.inference import Predictor
from jmceln_jax.training import steps
from jmceln_jax.utils import paths

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda")


def export_predictor(
  predictor: Predictor, platforms: Sequence[str] = PLATFORMS
) -> tuple[jax.export.Exported, list[np.ndarray]]:
  """The batch-polymorphic prediction function and its flat weights.

  Returns:
    (exported, weights): `exported.call(weights, images, tokens)` gives
    `steps.predict`'s logits.
  """
  state = predictor.state
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  leaves, treedef = jax.tree.flatten(variables)
  model = predictor.model

  def forward(weights, images, tokens):
    params = jax.tree.unflatten(treedef, weights)
    restored = state.replace(
      params=params["params"], batch_stats=params["batch_stats"]
    )
    return steps.predict(restored, images, tokens, model=model)

  (b,) = jax.export.symbolic_shape("b")
  s, length = predictor.image_size, predictor.tokenizer.context_length
  args = (
    [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
    jax.ShapeDtypeStruct((b, s, s, 3), jnp.uint8),
    jax.ShapeDtypeStruct((b, length), jnp.int32),
  )
  out = jax.export.export(jax.jit(forward), platforms=tuple(platforms))(*args)
  return out, [np.asarray(jax.device_get(x)) for x in leaves]


def write(
  out_dir: str,
  predictor: Predictor,
  platforms: Sequence[str] = PLATFORMS,
  provenance: dict[str, Any] | None = None,
) -> str:
  """Exports `predictor` into `out_dir` (see the module docstring).

  Raises:
    FileExistsError: `out_dir` exists (nothing is overwritten).
  """
  out_dir = paths.absolute(out_dir)
  if os.path.exists(out_dir):
    raise FileExistsError(f"{out_dir} exists; give a new --out folder.")
  function, weights = export_predictor(predictor, platforms)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  try:
    with open(os.path.join(tmp, "model.stablehlo"), "wb") as f:
      f.write(function.serialize())
    np.savez(
      os.path.join(tmp, "params.npz"),
      **{f"p{i:05d}": w for i, w in enumerate(weights)},
    )
    tokenizer.build_tokenizer(predictor.tokenizer.vocab).save(
      os.path.join(tmp, "tokenizer.json")
    )
    meta = dict(
      format_version=FORMAT_VERSION,
      image_size=predictor.image_size,
      max_len=predictor.tokenizer.context_length,
      fill=list(preprocess.FILL),
      sot_id=tokenizer.SOT_ID,
      eot_id=tokenizer.EOT_ID,
      platforms=list(platforms),
      inputs="images [B, S, S, 3] uint8 letterboxed; tokens [B, L] int32",
      outputs="logits [B, S, S, 2] float32 (argmax 1 = object)",
      jax_version=jax.__version__,
      **(provenance or {}),
    )
    with open(os.path.join(tmp, "export.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    shutil.copyfile(exported.__file__, os.path.join(tmp, "jmceln_exported.py"))
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
