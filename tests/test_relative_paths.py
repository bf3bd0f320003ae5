"""The command lines as users type them: relative paths and `~`.

Orbax refuses relative paths; every other test passes absolute temporary
paths. Here the train CLI runs from a temporary current directory with a
relative --workdir and data_dir, is SIGKILLed after two checkpoint saves and
resumed; the run is then evaluated and used for prediction from another
directory. See tests/train_utils.py for the shared config.
"""

import json
import os
import subprocess
import sys

import pytest
import train_utils as tu
from PIL import Image

from jmceln_jax import predict
from jmceln_jax.utils import paths

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
  """(top, its train log, the data's absolute path): `top/run` trained by the CLI from the current
  directory `top` with relative --workdir and data_dir, killed after two
  completed checkpoints and resumed to the end."""
  data_dir = tu.prepared_data(tmp_path_factory)
  top = tmp_path_factory.mktemp("cwd")
  rel_data = os.path.relpath(data_dir, top)
  log_path = top / "log.txt"
  with open(log_path, "w") as log:
    proc = tu.start_cli(rel_data, "run", log, cwd=str(top))
    completed = tu.kill_when(
      proc,
      str(top / "run"),
      lambda entries: sum(e.isdigit() for e in entries) >= 2,
    )
    assert completed is not None and len(completed) >= 2, log_path.read_text()[
      -3000:
    ]
    proc = tu.start_cli(rel_data, "run", log, cwd=str(top))
    assert proc.wait(timeout=600) == 0, log_path.read_text()[-3000:]
  return top, log_path.read_text(), data_dir


def test_train_resumes_and_records_absolute_paths(relative_run):
  top, log, data_dir = relative_run
  assert f"Resumed from {top / 'run' / 'checkpoints'} at step" in log
  config = json.loads((top / "run" / "config.json").read_text())
  assert config["input"]["data_dir"] == data_dir
  assert os.path.isfile(top / "run" / "results.json")


def test_evaluate_and_predict_from_another_directory(relative_run, monkeypatch):
  top, _, _ = relative_run
  elsewhere = top / "elsewhere"
  elsewhere.mkdir()
  proc = subprocess.run(
    [
      sys.executable, "-m", "jmceln_jax.evaluate", "--workdir=../run",
      "--splits=val", "--num_examples=0",
    ],
    cwd=elsewhere,
    env=tu.subprocess_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "val" in proc.stdout and "Wrote" in proc.stdout
  assert (top / "run" / "eval").is_dir()
  monkeypatch.chdir(elsewhere)
  Image.new("RGB", (40, 30), (200, 30, 30)).save("photo.png")
  predict.main([
    "--workdir", "../run", "--checkpoint", "latest", "--image", "photo.png",
    "--text", "the red one", "--out", "out.png", "--mask_out", "mask.png",
  ])  # fmt: skip
  assert Image.open("mask.png").size == (40, 30)


def test_absolute_expands_home_and_config_paths(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  assert paths.absolute("~/w") == str(tmp_path / "home" / "w")
  assert paths.absolute("runs/x/") == str(tmp_path / "runs" / "x")
  config = tu.make_config("data")
  config.init.clip_dir = "~/clip"
  resolved = paths.absolute_config(config)
  assert resolved.input.data_dir == str(tmp_path / "data")
  assert resolved.init.clip_dir == str(tmp_path / "home" / "clip")
  assert resolved.input.vocab is None  # Unset stays unset.
  assert config.input.data_dir == "data"  # A copy.
  assert resolved.is_locked == config.is_locked
