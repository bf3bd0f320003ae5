"""Users' mistakes on the command lines end in one `error:` line."""

import os
import subprocess
import sys

import pytest

from jmceln_jax import config_lib, predict
from jmceln_jax.models import jmceln

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.py")
REFCOCO = os.path.join(ROOT, "configs", "refcoco.py")


def _run(program: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", program, *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )


def _assert_one_error_line(run: subprocess.CompletedProcess, text: str):
  assert run.returncode == 1, run.stderr
  assert run.stderr.startswith("error: ") and text in run.stderr
  assert run.stderr.rstrip().endswith("Pass --help for usage.")
  assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
  "args,message",
  [
    ([f"--config={TINY}x"], "error: bad --config: Configuration is not"),
    ([f"--config={TINY}", "--config.optim.lrr=1"], 'Did you mean "lr"'),
    ([f"--config={TINY}:nosuch"], "Unknown variant 'nosuch'"),
    ([f"--config={TINY}", "--config.model.dtype=bf16"], "model.dtype='bf16'"),
    ([f"--config={REFCOCO}"], "No pretrained CLIP"),
    (
      [
        f"--config={TINY}",
        "--config.model.deep_supervision=True",
        "--config.loss.stage_weight=0",
      ],
      "would get no gradient",
    ),
    (
      [f"--config={TINY}:lsran", "--config.model.deep_supervision=True"],
      "needs cascade stages",
    ),
  ],
)
def test_train_config_mistakes(tmp_path, args, message):
  workdir = tmp_path / "run"
  run = _run("jmceln_jax.train", f"--workdir={workdir}", *args)
  assert run.returncode == 1
  assert run.stderr.startswith("error: ") and message in run.stderr
  assert "Traceback" not in run.stderr
  assert not workdir.exists()  # Nothing created.


PROGRAMS = [
  *(
    f"jmceln_jax.{name}"
    for name in (
      "train",
      "evaluate",
      "summary",
      "export",
      "demo",
      "predict",
      "convert_clip",
    )
  ),
  *(f"data_prep.{n}" for n in ("synthetic", "refcoco", "inspect")),
  *(
    f"bench.{n}"
    for n in (
      "ablations",
      "data",
      "encoders",
      "evaluation",
      "position_probe",
      "query_init",
      "train_step",
    )
  ),
]


@pytest.mark.parametrize("program", PROGRAMS)
def test_help_exits_zero(program):
  """Every command line: absl flags, --help lists them and exits 0."""
  run = _run(program, "--help")
  assert run.returncode == 0, run.stderr
  assert "absl" not in run.stderr
  assert "  --" in run.stdout and "--helpfull" not in run.stderr


@pytest.mark.parametrize("program", PROGRAMS)
def test_unknown_flag_is_one_error_line(program):
  _assert_one_error_line(_run(program, "--nosuch=1"), "nosuch")


@pytest.mark.parametrize(
  "program,args",
  [
    ("jmceln_jax.train", [f"--config={TINY}", "--workdir=w", "extra"]),
    ("jmceln_jax.summary", [f"--config={TINY}", "extra"]),
    ("jmceln_jax.evaluate", ["--workdir=w", "extra"]),
    ("jmceln_jax.demo", ["--workdir=w", "extra"]),
    ("jmceln_jax.export", ["--workdir=w", "--out=o", "extra"]),
  ],
)
def test_positional_argument_is_one_error_line(tmp_path, program, args):
  run = subprocess.run(
    [sys.executable, "-m", program, *args],
    capture_output=True,
    text=True,
    cwd=tmp_path,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT),
    timeout=300,
  )
  _assert_one_error_line(run, "unexpected arguments: extra")
  assert not list(tmp_path.iterdir())  # Nothing created.


def test_summary_requires_config():
  _assert_one_error_line(_run("jmceln_jax.summary"), "--config")


@pytest.mark.parametrize(
  "args,message",
  [
    (["--checkpoint", "bset"], "use best, latest or a step number"),
    (["--workdir"], "Missing value for flag --workdir"),
    (["--out", "x.png", "extra"], "unexpected arguments: extra"),
    (["--text", "  "], "must not be empty"),
    (["--mask_out", "m.jpg"], "give a .png file name"),
    (["--display_size", "0"], "at least 64 pixels"),
  ],
)
def test_predict_argument_mistakes(args, message):
  with pytest.raises(SystemExit) as exit_:
    predict._parse(
      ["--workdir", "w", "--image", "i", "--text", "t", "--out", "o.png"] + args
    )
  text = str(exit_.value.code)
  assert text.startswith("error: ") and message in text, text
  assert text.endswith("Pass --help for usage.")


def test_build_model_checks_dtype():
  model = config_lib.base_config().model
  model.dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match="'float32' or 'bfloat16'"):
    jmceln.build_model(model)
