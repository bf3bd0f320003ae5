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
                      tokenizers (jmceln_jax/serving/exported.py)

`python DIR/jmceln_exported.py DIR image.jpg "a sentence"` then segments
without flax or this project's code. The folder is written to a temporary
name and renamed when complete: an interrupted export leaves nothing behind.
"""

from __future__ import annotations

import os

from absl import app, flags

from jmceln_jax import cli
from jmceln_jax.serving import stablehlo
from jmceln_jax.serving.inference import Predictor
from jmceln_jax.utils import paths


def define_flags() -> None:
  """The command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training run directory.")
  flags.DEFINE_string("out", None, "New folder to write the export to.")
  cli.define_checkpoint_flag()
  flags.DEFINE_list(
    "platforms",
    list(stablehlo.PLATFORMS),
    "Platforms to lower for (cpu, cuda, rocm, tpu).",
  )
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags refuses positional arguments.
  f = flags.FLAGS
  with cli.user_errors():
    checkpoint = int(f.checkpoint) if f.checkpoint.isdigit() else f.checkpoint
    predictor = Predictor.from_workdir(f.workdir, checkpoint)
    which, step = predictor.checkpoint
    out = stablehlo.write(
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
