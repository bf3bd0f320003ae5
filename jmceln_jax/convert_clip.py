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

import sys
from collections.abc import Sequence

from absl import flags

from jmceln_jax.convert import clip_weights, torch_pickle
from jmceln_jax.utils import cli_flags


def _define(fv: flags.FlagValues) -> None:
  flags.DEFINE_string(
    "checkpoint",
    None,
    "OpenAI CLIP .pt (e.g. RN101.pt), torch.save archive or .safetensors.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "out",
    None,
    "Output directory (created; must be absent or empty).",
    flag_values=fv,
  )
  flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace a non-empty --out once the conversion has succeeded.",
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "seed",
    0,
    "Seed of the randomly initialised dense-pool `connect` weights.",
    flag_values=fv,
  )
  flags.mark_flags_as_required(["checkpoint", "out"], flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; returns the process exit code."""
  args = cli_flags.parse(
    argv, _define, program="python -m jmceln_jax.convert_clip", doc=__doc__
  )
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
