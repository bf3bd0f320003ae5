"""Model summary: parameters per module, forward GFLOPs, training-step cost.

  python -m jmceln_jax.summary --config configs/refcoco.py [--devices=2]

Nothing is executed: parameters come from `jax.eval_shape`, FLOPs from XLA's
cost analysis of the forward pass (batch 1, eval mode) and of the training
step, each lowered with every loop unrolled, and the training step's memory
from compiling the trainer's own step (`model_state.jit_train_step`: loss,
gradients with accumulation, the configured optimiser, the config's mesh and
parameter sharding, donated state) on abstract inputs: the global batch
`input.global_batch_size` split over `--devices` devices. So the full paper
model can be summarised on a laptop CPU (compiling its training step takes
about a minute there); --devices simulates that many CPU devices when the
machine has no accelerator.
"""

from __future__ import annotations

import jax
from absl import app, flags
from ml_collections import config_flags

from jmceln_jax import cli
from jmceln_jax.training import costs

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/refcoco.py[:variant].",
  lock_config=True,
)
flags.DEFINE_integer(
  "devices",
  None,
  "Devices sharing input.global_batch_size in the training-step estimate "
  "(default: all devices). Without an accelerator, this many CPU devices "
  "are simulated (the paper used 2 GPUs).",
  lower_bound=1,
)
flags.DEFINE_integer(
  "depth",
  1,
  "Module nesting depth of the parameter table (clip counts as "
  "one level deeper: clip/visual, clip/text).",
)
flags.DEFINE_bool(
  "train_memory",
  True,
  "Also compile the training step for its memory and FLOPs.",
)
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags refuses positional arguments.
  if FLAGS.devices:
    # Before any backend starts: lets a CPU-only machine simulate them.
    jax.config.update("jax_num_cpu_devices", FLAGS.devices)
  print(
    costs.summarize(
      FLAGS.config,
      devices=FLAGS.devices,
      depth=FLAGS.depth,
      train_memory=FLAGS.train_memory,
    )
  )


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
