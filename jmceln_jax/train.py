"""Trains JMCELN.

  python -m jmceln_jax.train --config configs/refcoco.py --workdir runs/x \\
      [--config.FIELD=VALUE ...]

The workdir receives checkpoints (resumed automatically), metrics.jsonl,
TensorBoard scalars and validation previews, config.json, curves.png and
results.json.

Main config fields (override with --config.FIELD=VALUE):
  input.data_dir            prepared data (python -m data_prep.refcoco)
  input.synthetic_images    >0 and no data_dir: generate synthetic data
  input.global_batch_size   examples per step over all devices (paper: 20)
  input.image_size, input.max_len   416 and 30 in the paper
  init.clip_dir             converted CLIP (python -m jmceln_jax.convert_clip)
  optim.lr, optim.lr_mults, optim.weight_decay, optim.grad_clip_norm,
  optim.grad_accum_steps, optim.warmup_steps
  num_epochs / total_steps, eval_every_epochs, checkpoint_every_steps
  model.dtype (float32 | bfloat16), model.remat, model.num_stages, ...
  mesh.data, mesh.fsdp      device mesh (-1 = all remaining devices)
Variants: --config configs/refcoco.py:wo_pan (see configs/refcoco.py).
"""

from absl import app, flags
from ml_collections import config_flags

from jmceln_jax import cli
from jmceln_jax.training import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/refcoco.py[:variant].",
  lock_config=True,
)
flags.DEFINE_string(
  "workdir", None, "Output directory (checkpoints, metrics, logs)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags refuses positional arguments.
  with cli.user_errors():
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
