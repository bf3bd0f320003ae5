"""Converts OpenAI-style ResNet CLIP weights to a Flax/Orbax directory.

  python -m jmceln_jax.convert_clip --checkpoint RN101.pt --out clip_rn101

Reads (without torch, without running any code from the file) OpenAI's
TorchScript archives, torch.save zip archives (state dicts, possibly nested
under "state_dict"/"model", "module." prefixes stripped) and safetensors files;
upcasts to float32; renames torch keys to the Flax tree of
`jmceln_jax.models.clip.CLIP`; checks every key and shape against the model;
and writes DIR/checkpoint (Orbax: {"params", "batch_stats"}) and
DIR/clip_config.json (hyperparameters and provenance) atomically.

The CRIS `connect` residual of the dense attention pool is new (not in OpenAI
checkpoints) and is initialised randomly from --seed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from jmceln_jax.convert import clip_weights, torch_pickle


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit code."""
  parser = argparse.ArgumentParser(
    prog="python -m jmceln_jax.convert_clip",
    description=__doc__.split("\n\n")[0],
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help="OpenAI CLIP .pt (e.g. RN101.pt), torch.save archive or .safetensors.",
  )
  parser.add_argument(
    "--out",
    required=True,
    help="Output directory (created; must be absent or empty).",
  )
  parser.add_argument(
    "--overwrite",
    action="store_true",
    help="Replace a non-empty --out once the conversion has succeeded.",
  )
  parser.add_argument(
    "--seed",
    type=int,
    default=0,
    help="Seed of the randomly initialised dense-pool `connect` weights.",
  )
  args = parser.parse_args(argv)
  try:
    clip_weights.convert(
      args.checkpoint, args.out, overwrite=args.overwrite, seed=args.seed
    )
  except (
    torch_pickle.CheckpointError,
    clip_weights.ConversionError,
    OSError,
  ) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
