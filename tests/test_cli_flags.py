"""The one flag system (jmceln_jax/utils/cli_flags.py): lists, checks,
--help and the one-line errors every command line shares."""

import pytest
from absl import flags

from jmceln_jax.utils import cli_flags


def _define(fv):
  cli_flags.define_numbers(fv, "seeds", [0, 1], "Seeds.", minimum=0)
  cli_flags.define_numbers(fv, "stds", [0.5], "Stds.", kind=float, minimum=0.0)
  cli_flags.define_choices(
    fv, "scan", None, "Scan.", {"true": True, "false": False}
  )
  flags.DEFINE_string("out", None, "Output PNG.", flag_values=fv)
  flags.DEFINE_bool("tiny", False, "Smoke run.", flag_values=fv)
  cli_flags.validate(
    fv, "out", lambda v: v.endswith(".png"), "--out: give a .png file name"
  )


def _parse(*argv):
  return cli_flags.parse(list(argv), _define, program="prog", doc="Does X.")


def test_defaults_and_values():
  args = _parse()
  assert args.seeds == [0, 1] and args.stds == [0.5] and args.scan is None
  assert args.out is None and args.tiny is False
  args = _parse("--seeds", "3, 4", "--stds=0.02,1", "--scan=TRUE,false")
  assert args.seeds == [3, 4] and args.stds == [0.02, 1.0]
  assert args.scan == [True, False]
  args = _parse("--tiny", "--out", "a.png")
  assert args.tiny and args.out == "a.png"
  cli_flags.override(args, {"seeds": [7]})
  assert args.seeds == [7]
  assert cli_flags.values(args, exclude=("stds", "scan")) == dict(
    out="a.png", seeds=[7], tiny=True
  )


@pytest.mark.parametrize(
  "argv,message",
  [
    (["--seeds=1,-1"], "want integers >= 0, comma-separated; got '1,-1'"),
    (["--stds=x"], "want numbers >= 0.0"),
    (["--scan=maybe"], "want true and/or false"),
    (["--out=a.jpg"], "--out: give a .png file name"),
    (["--nosuch=1"], "Unknown command line flag 'nosuch'"),
    (["extra"], "unexpected arguments: extra"),
  ],
)
def test_mistakes_end_in_one_error_line(argv, message):
  with pytest.raises(SystemExit) as exit_:
    _parse(*argv)
  text = exit_.value.code
  assert isinstance(text, str) and text.startswith("error: "), text
  assert message in text and text.endswith("\nPass --help for usage.")
  assert text.count("\n") == 1


def test_help_exits_zero(capsys):
  with pytest.raises(SystemExit) as exit_:
    _parse("--help")
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: prog [flags]\n\nDoes X.")
  assert "--seeds" in out and "--out" in out


def test_each_parse_gets_fresh_flags():
  """main(argv) can run again (tests do): nothing is left from before."""
  assert _parse("--seeds=5").seeds == [5]
  assert _parse().seeds == [0, 1]
