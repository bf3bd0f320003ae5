"""One flag system for every command line: absl flags.

The training-side programs (train, evaluate, summary, demo, export) define
theirs on absl's global FLAGS and run under `absl.app`. The others (predict,
convert_clip, data_prep, bench) parse into a fresh `flags.FlagValues` with
`parse`, so that `main(argv)` can be called again and again (tests). Either
way `--help` prints the flags and exits with 0, and a mistake ends in

  error: <what is wrong>
  Pass --help for usage.

with exit status 1 (`fail`).
"""

from __future__ import annotations

import ast
import contextlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from absl import flags

HELP = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def message(error: BaseException) -> str:
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


def fail(text: str) -> NoReturn:
  """Ends the program with `error: text` and a pointer to --help."""
  raise SystemExit(f"error: {text}\nPass --help for usage.")


def parse(
  argv: Sequence[str] | None,
  define: Callable[[flags.FlagValues], None],
  *,
  program: str,
  doc: str,
) -> flags.FlagValues:
  """Parses `argv` (default sys.argv[1:]) into fresh flags.

  Args:
    argv: the arguments after the program name.
    define: defines the flags on the FlagValues it is given
      (`flags.DEFINE_*(..., flag_values=fv)` and the helpers below).
    program: the name in the usage line, e.g. "python -m data_prep.refcoco".
    doc: what the program does (its module docstring).

  Returns:
    The parsed flags; `fv.name` reads a flag's value.
  """
  fv = flags.FlagValues()
  define(fv)
  args = list(sys.argv[1:] if argv is None else argv)
  if any(a in HELP for a in args):
    print(f"usage: {program} [flags]\n\n{doc.strip()}\n\n{fv.get_help()}")
    raise SystemExit(0)
  try:
    rest = fv([program, *args])
  except flags.Error as e:
    fail(message(e))
  if len(rest) > 1:
    fail(f"unexpected arguments: {' '.join(rest[1:])}")
  return fv


class _ListParser(flags.ArgumentParser):
  """Comma-separated items, each checked and converted by `item`."""

  def __init__(self, item: Callable[[str], Any], what: str):
    self.item = item
    self.what = what

  def parse(self, argument: Any) -> list[Any]:
    if isinstance(argument, list):
      return argument
    words = [w.strip() for w in str(argument).split(",") if w.strip()]
    try:
      out = [self.item(w) for w in words]
    except (ValueError, KeyError):
      out = []
    if not out:
      raise ValueError(f"want {self.what}, comma-separated; got {argument!r}")
    return out

  def flag_type(self) -> str:
    return "list"


def _define_list(
  fv: flags.FlagValues,
  name: str,
  default: Sequence[Any] | None,
  help_: str,
  item: Callable[[str], Any],
  what: str,
) -> None:
  flags.DEFINE(
    _ListParser(item, what),
    name,
    None if default is None else ",".join(str(v) for v in default),
    help_,
    flag_values=fv,
    serializer=flags.CsvListSerializer(","),
  )


def define_numbers(
  fv: flags.FlagValues,
  name: str,
  default: Sequence[float] | None,
  help_: str,
  *,
  kind: Callable[[str], Any] = int,
  minimum: float = 1,
) -> None:
  """A comma-separated list of numbers (`kind` int or float) >= minimum."""

  def item(word: str) -> Any:
    value = kind(word)
    if value < minimum:
      raise ValueError(word)
    return value

  noun = "integers" if kind is int else "numbers"
  _define_list(fv, name, default, help_, item, f"{noun} >= {minimum}")


def define_choices(
  fv: flags.FlagValues,
  name: str,
  default: Sequence[str] | None,
  help_: str,
  choices: Mapping[str, Any],
) -> None:
  """A comma-separated list of words among `choices` (case ignored), each
  read as its value, e.g. "true,false" -> [True, False]."""
  _define_list(
    fv,
    name,
    default,
    help_,
    lambda word: choices[word.lower()],
    " and/or ".join(choices),
  )


def validate(
  fv: flags.FlagValues, name: str, check: Callable[[Any], bool], text: str
) -> None:
  """`check(value)` must hold (None, an unset optional flag, passes)."""
  flags.register_validator(
    name, lambda v: v is None or check(v), text, flag_values=fv
  )


def override(fv: flags.FlagValues, values: Mapping[str, Any]) -> None:
  """Sets flags to values (e.g. a --tiny mode's), as if they were given."""
  for name, value in values.items():
    setattr(fv, name, value)


def values(fv: flags.FlagValues, exclude: Sequence[str] = ()) -> dict[str, Any]:
  """The program's own flags as {name: value} (to record with results)."""
  return {name: fv[name].value for name in sorted(fv) if name not in exclude}
