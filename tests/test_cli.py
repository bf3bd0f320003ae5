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
  run = subprocess.run(
    [sys.executable, "-m", "jmceln_jax.train", f"--workdir={workdir}", *args],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert run.returncode == 1
  assert run.stderr.startswith("error: ") and message in run.stderr
  assert "Traceback" not in run.stderr
  assert not workdir.exists()  # Nothing created.


@pytest.mark.parametrize(
  "program", ["train", "evaluate", "summary", "export", "demo"]
)
def test_help_exits_zero(program):
  run = subprocess.run(
    [sys.executable, "-m", f"jmceln_jax.{program}", "--help"],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert run.returncode == 0, run.stderr
  assert "--workdir" in run.stdout or "--config" in run.stdout


@pytest.mark.parametrize(
  "args,message",
  [
    (["--checkpoint", "bset"], "use best, latest or a step number"),
    (["--text", "  "], "must not be empty"),
    (["--mask_out", "m.jpg"], "give a .png file name"),
    (["--display_size", "0"], "at least 64 pixels"),
  ],
)
def test_predict_argument_mistakes(capsys, args, message):
  with pytest.raises(SystemExit):
    predict._parse(
      ["--workdir", "w", "--image", "i", "--text", "t", "--out", "o.png"] + args
    )
  assert message in capsys.readouterr().err


def test_build_model_checks_dtype():
  model = config_lib.base_config().model
  model.dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match="'float32' or 'bfloat16'"):
    jmceln.build_model(model)
