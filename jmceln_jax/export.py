r"""Exports a trained run's prediction function as StableHLO (jax.export).

  python -m jmceln_jax.export --workdir runs/synthetic --out exported/

writes, for the run's best checkpoint (or --checkpoint),

  model.stablehlo     jax.export's serialization of (weights, images, tokens)
                      -> mask logits: letterboxed uint8 images [B, S, S, 3]
                      and CLIP tokens [B, L] int32 in, float32 logits
                      [B, S, S, 2] out; B is symbolic (any batch); lowered
                      for every --platforms (default cpu and cuda)
  params.npz          the weights (params and BatchNorm statistics) as a flat
                      list, in the order the function takes them
  tokenizer.json      the CLIP BPE vocabulary (Hugging Face tokenizers)
  export.json         S, L, the letterbox fill, token ids, provenance
  jmceln_exported.py  a loader that needs only jax, numpy, pillow, regex and
                      tokenizers (jmceln_jax/exported.py)

`python DIR/jmceln_exported.py DIR image.jpg "a sentence"` then segments
without flax or this project's code. The folder is written to a temporary
name and renamed when complete: an interrupted export leaves nothing behind.
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
from absl import app, flags, logging

from jmceln_jax import cli, exported, paths, preprocess, text, train_lib
from jmceln_jax.predict import Predictor

FORMAT_VERSION = 1
PLATFORMS = ("cpu", "cuda")


def export_predictor(
  predictor: Predictor, platforms: Sequence[str] = PLATFORMS
) -> tuple[jax.export.Exported, list[np.ndarray]]:
  """The batch-polymorphic prediction function and its flat weights.

  Returns:
    (exported, weights): `exported.call(weights, images, tokens)` gives
    `train_lib.predict`'s logits.
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
    return train_lib.predict(restored, images, tokens, model=model)

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
    text.build_tokenizer(predictor.tokenizer.vocab).save(
      os.path.join(tmp, "tokenizer.json")
    )
    meta = dict(
      format_version=FORMAT_VERSION,
      image_size=predictor.image_size,
      max_len=predictor.tokenizer.context_length,
      fill=list(preprocess.FILL),
      sot_id=text.SOT_ID,
      eot_id=text.EOT_ID,
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


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_string("out", None, "New folder to write the export to.")
  cli.define_checkpoint_flag()
  flags.DEFINE_list(
    "platforms",
    list(PLATFORMS),
    "Platforms to lower for (cpu, cuda, rocm, tpu).",
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs restores at INFO.
  f = flags.FLAGS
  with cli.user_errors():
    checkpoint = int(f.checkpoint) if f.checkpoint.isdigit() else f.checkpoint
    predictor = Predictor.from_workdir(f.workdir, checkpoint)
    which, step = predictor.checkpoint
    out = write(
      f.out,
      predictor,
      f.platforms,
      provenance=dict(
        workdir=paths.absolute(f.workdir), checkpoint=which, step=step
      ),
    )
  print(
    f"Exported {f.workdir} ({which} checkpoint, step {step}) for "
    f"{', '.join(f.platforms)} to {out}.\nTry: python "
    f"{os.path.join(out, 'jmceln_exported.py')} {out} IMAGE 'a sentence'"
  )


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
