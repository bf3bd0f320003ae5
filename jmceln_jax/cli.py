"""What the command lines share: a user's mistake ends in one `error:` line.

Mistakes are the exceptions in USER_ERRORS (files that are missing or in the
way, configs that do not load or name unknown fields, checkpoints of another
model). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from absl import flags, logging

from jmceln_jax import config_lib
from jmceln_jax.training import checkpoints, model_state
from jmceln_jax.utils import cli_flags

USER_ERRORS = (
  FileNotFoundError,
  FileExistsError,
  NotADirectoryError,
  IsADirectoryError,
  checkpoints.MismatchError,
  config_lib.ConfigError,
)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
  """Turns USER_ERRORS raised in the block into `error: ...` and exit
  status 1."""
  try:
    yield
  except USER_ERRORS as e:
    raise SystemExit(f"error: {e}") from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=cli.parse_flags)`.

  Loads --config here, so that a config file that does not load, or an
  override naming an unknown field (`--config.optim.lrr=1`), ends in one
  line before anything runs or is created; so do positional arguments.
  --help, --helpfull and --helpxml exit with status 0 (absl's own exit
  with 1). Logging starts at WARNING (Orbax logs every checkpoint operation
  at INFO) unless --verbosity is given.
  """
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # Raises here if the file did not load.
  except SystemExit as e:
    # Only absl's help flags exit while parsing, after printing the usage.
    raise SystemExit(0 if e.code == 1 else e.code) from None
  except flags.Error as e:
    cli_flags.fail(cli_flags.message(e))
  except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    raise SystemExit(f"error: bad --config: {cli_flags.message(e)}") from None
  if len(rest) > 1:
    cli_flags.fail(f"unexpected arguments: {' '.join(rest[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  return rest


def define_checkpoint_flag() -> None:
  """The absl --checkpoint flag of the programs that restore a run."""
  flags.DEFINE_string(
    "checkpoint",
    "best",
    "best (highest validation mIoU; latest when none has metrics), latest, "
    "or a step number.",
  )
  flags.register_validator(
    "checkpoint",
    model_state.is_checkpoint,
    f"--checkpoint must be {model_state.CHECKPOINT_VALUES}.",
  )
