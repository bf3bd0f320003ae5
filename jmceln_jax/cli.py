"""What the command lines share: a user's mistake ends in one `error:` line.

Mistakes are the exceptions in USER_ERRORS (files that are missing or in the
way, configs that do not load or name unknown fields, checkpoints of another
model). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
from collections.abc import Iterator

from absl import flags

from jmceln_jax import config_lib
from jmceln_jax.training import checkpoints, model_state

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


def _message(error: BaseException) -> str:
  """An exception's text, unquoted (ml_collections wraps its KeyErrors'
  repr, newlines escaped, in an AttributeError), without the traceback a
  config file's own error carries, with its cause."""
  text = str(error)
  if text[:1] in "'\"":
    with contextlib.suppress(ValueError, SyntaxError):
      text = str(ast.literal_eval(text))
  if "Traceback" in text:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = f"{lines[0]} {lines[-1]}"
  cause = error.__cause__
  if cause is None or str(cause) in text:
    return text
  return f"{text} ({cause})"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=cli.parse_flags)`.

  Loads --config here, so that a config file that does not load, or an
  override naming an unknown field (`--config.optim.lrr=1`), ends in one
  line before anything runs or is created. --help, --helpfull and --helpxml
  exit with status 0 (absl's own exit with 1).
  """
  try:
    rest = flags.FLAGS(argv)
    if "config" in flags.FLAGS and flags.FLAGS["config"].present:
      flags.FLAGS.config.keys()  # Raises here if the file did not load.
  except SystemExit as e:
    # Only absl's help flags exit while parsing, after printing the usage.
    raise SystemExit(0 if e.code == 1 else e.code) from None
  except flags.Error as e:
    raise SystemExit(f"error: {_message(e)}\nPass --help for usage.") from None
  except (OSError, AttributeError, KeyError, TypeError, ValueError) as e:
    raise SystemExit(f"error: bad --config: {_message(e)}") from None
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


def checkpoint_arg(value: str) -> str:
  """argparse type of --checkpoint."""
  if not model_state.is_checkpoint(value):
    raise argparse.ArgumentTypeError(f"use {model_state.CHECKPOINT_VALUES}")
  return value


def png_arg(value: str) -> str:
  """argparse type of an output PNG file name."""
  if not value.lower().endswith(".png"):
    raise argparse.ArgumentTypeError(f"{value}: give a .png file name")
  return value


def sentence_arg(value: str) -> str:
  """argparse type of a referring expression."""
  if not value.strip():
    raise argparse.ArgumentTypeError("a sentence must not be empty")
  return value
