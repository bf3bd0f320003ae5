"""Torch-free readers and the CLIP converter: formats, safety, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
import zipfile

import clip_torch_ref as ref
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from jmceln_jax import convert_clip
from jmceln_jax.convert import clip_weights, torch_pickle
from jmceln_jax.models import clip

torch = ref.torch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny CLIP: (torch model, dir with its archives, state dict)."""
  model = ref.random_clip(ref.TINY)
  directory = tmp_path_factory.mktemp("tiny")
  ref.save_torchscript(model, str(directory / "fp16.pt"), fp16=True)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  torch.save(model.state_dict(), directory / "state.pt")
  return model, directory, state


def _cli(*args) -> int:
  return convert_clip.main([str(a) for a in args])


def _tree_equal(a, b) -> bool:
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  return fa.keys() == fb.keys() and all(
    np.array_equal(fa[k], fb[k]) for k in fa
  )


@pytest.mark.parametrize("name", ["fp16.pt", "state.pt"])
def test_reader_matches_torch(tiny, name):
  _, directory, _ = tiny
  path = directory / name
  state, fmt = torch_pickle.load_state_dict(str(path))
  if name == "fp16.pt":
    assert fmt == "torchscript"
    with warnings.catch_warnings():  # torch.jit.load is deprecated.
      warnings.simplefilter("ignore", DeprecationWarning)
      expected = torch.jit.load(str(path)).state_dict()
  else:
    assert fmt == "torch_zip"
    expected = torch.load(path, weights_only=True)
  assert state.keys() == expected.keys()
  for key, value in expected.items():
    assert state[key].dtype == value.numpy().dtype, key
    np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
  assert state["logit_scale"].shape == ()  # 0-d tensors stay arrays.


def test_formats_read_identically(tiny, tmp_path):
  _, _, state = tiny
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  ddp = {f"module.{k}": v for k, v in tensors.items()}
  torch.save({"epoch": 3, "state_dict": ddp}, tmp_path / "ddp.pt")
  params = {k: torch.nn.Parameter(v, False) for k, v in tensors.items()}
  torch.save(params, tmp_path / "params.pt")
  save_file(state, str(tmp_path / "model.safetensors"))
  for name in ("ddp.pt", "params.pt", "model.safetensors"):
    loaded, _ = torch_pickle.load_state_dict(str(tmp_path / name))
    assert loaded.keys() == state.keys(), name
    for key, value in state.items():
      np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_fp16_archive_upcasts_exactly(tiny):
  model, directory, _ = tiny
  fp16_state, fmt = torch_pickle.load_state_dict(str(directory / "fp16.pt"))
  assert fmt == "torchscript"
  assert fp16_state["visual.conv1.weight"].dtype == np.float16
  # `model` was turned back to float32 after tracing: same values.
  float_state = {k: v.numpy() for k, v in model.state_dict().items()}
  a, unknown = clip_weights.map_state_dict(fp16_state)
  b, _ = clip_weights.map_state_dict(float_state)
  assert not unknown and a.keys() == b.keys()
  for key, value in a.items():
    assert value.dtype == np.float32, key
    np.testing.assert_array_equal(value, b[key])


def test_safetensors_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {
    "half": rng.normal(size=(3, 4)).astype(np.float16),
    "bf16": rng.normal(size=(5,)).astype(ml_dtypes.bfloat16),
    "single": rng.normal(size=(2, 3, 4)).astype(np.float32),
    "double": rng.normal(size=(2,)),
    "long": np.arange(6, dtype=np.int64).reshape(2, 3),
    "scalar": np.array(2.5, np.float32),
  }
  path = str(tmp_path / "t.safetensors")
  save_file(tensors, path, metadata={"format": "np"})
  got = torch_pickle.read_safetensors(path)
  assert got.keys() == tensors.keys()
  for key, value in tensors.items():
    assert got[key].dtype == value.dtype and got[key].shape == value.shape
    np.testing.assert_array_equal(got[key], value)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:-8])
  with pytest.raises(torch_pickle.CheckpointError, match="truncated"):
    torch_pickle.read_safetensors(path)


class _Evil:
  def __init__(self, func, arg):
    self.func, self.arg = func, arg

  def __reduce__(self):
    return self.func, (self.arg,)


@pytest.mark.parametrize(
  "func, protocol, name",
  [(os.system, 2, "posix.system"), (eval, 4, "builtins.eval")],
)
def test_malicious_pickle_is_refused(tmp_path, func, protocol, name):
  marker = tmp_path / "pwned"
  command = (
    f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w')"
  )
  archive = tmp_path / "evil.pt"
  with zipfile.ZipFile(archive, "w") as z:
    data = pickle.dumps({"w": _Evil(func, command)}, protocol=protocol)
    z.writestr("evil/data.pkl", data)
  with pytest.raises(
    torch_pickle.CheckpointError, match=f"refusing to load global '{name}'"
  ):
    torch_pickle.load_state_dict(str(archive))
  out = tmp_path / "out"
  assert _cli("--checkpoint", archive, "--out", out) == 1
  assert not marker.exists() and not out.exists()
  assert os.listdir(tmp_path) == ["evil.pt"]


def test_damaged_files_give_clear_errors(tiny, tmp_path):
  _, directory, _ = tiny
  data = (directory / "fp16.pt").read_bytes()
  (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_pickle.CheckpointError, match="truncated"):
    torch_pickle.load_state_dict(str(tmp_path / "truncated.pt"))
  legacy = io.BytesIO()
  torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
  (tmp_path / "legacy.pt").write_bytes(legacy.getvalue())
  with pytest.raises(torch_pickle.CheckpointError, match="legacy"):
    torch_pickle.load_state_dict(str(tmp_path / "legacy.pt"))
  (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
  with pytest.raises(torch_pickle.CheckpointError, match="unrecognised"):
    torch_pickle.load_state_dict(str(tmp_path / "junk.bin"))
  out = tmp_path / "out"
  for name in ("truncated.pt", "legacy.pt", "junk.bin"):
    assert _cli("--checkpoint", tmp_path / name, "--out", out) == 1
  assert not out.exists()
  assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def _vit_like(state: dict) -> dict:
  """The text tower of `state` plus a ViT image tower."""
  vit = {k: v for k, v in state.items() if not k.startswith("visual.")}
  vit["visual.class_embedding"] = np.zeros(64, np.float32)
  vit["visual.positional_embedding"] = np.zeros((5, 64), np.float32)
  vit["visual.conv1.weight"] = np.zeros((64, 3, 32, 32), np.float32)
  vit["visual.ln_pre.weight"] = np.zeros(64, np.float32)
  vit["visual.transformer.resblocks.0.attn.in_proj_weight"] = np.zeros(
    (192, 64), np.float32
  )
  vit["visual.proj"] = np.zeros((64, 32), np.float32)
  return vit


def test_key_mismatches_are_listed(tiny):
  _, _, state = tiny
  with pytest.raises(clip_weights.ConversionError) as error:
    clip_weights.convert_state_dict(_vit_like(state))
  message = str(error.value)
  assert "ViT CLIP" in message
  assert "missing (" in message
  assert "params/visual/attnpool/positional_embedding" in message
  assert "unexpected" in message and "visual.class_embedding" in message
  assert "shape mismatch" in message and "params/visual/conv1/kernel" in message
  broken = dict(state, **{"extra.weight": np.zeros(3, np.float32)})
  broken["ln_final.bias"] = np.zeros(7, np.float32)
  del broken["visual.layer4.0.bn2.running_var"]
  with pytest.raises(clip_weights.ConversionError) as error:
    clip_weights.convert_state_dict(broken)
  message = str(error.value)
  assert "extra.weight" in message
  assert "params/text/ln_final/bias: checkpoint (7,), model (64,)" in message
  assert "batch_stats/visual/layer4/0/bn2/var" in message


@pytest.mark.slow
def test_cli_output_and_overwrite(tiny, tmp_path):
  _, directory, state = tiny
  source = str(directory / "fp16.pt")
  out = tmp_path / "clip"
  assert _cli("--checkpoint", source, "--out", out, "--seed", "1") == 0
  assert sorted(os.listdir(out)) == ["checkpoint", "clip_config.json"]
  config = json.loads((out / "clip_config.json").read_text())
  assert (
    config["source_sha256"]
    == hashlib.sha256((directory / "fp16.pt").read_bytes()).hexdigest()
  )
  assert config["source_format"] == "torchscript"
  assert {k: config[k] for k in clip.HPARAMS} == {
    k: list(v) if isinstance(v, tuple) else v for k, v in ref.TINY.items()
  }
  flax_model, variables = clip.load_clip(str(out))
  assert flax_model.vision_layers == ref.TINY["vision_layers"]
  _, expected = clip_weights.convert_state_dict(state, seed=1)
  assert _tree_equal(variables, expected)
  before = (out / "clip_config.json").read_bytes()
  # Refused without --overwrite; a failed conversion keeps the old output.
  assert _cli("--checkpoint", source, "--out", out) == 1
  bad = tmp_path / "bad.pt"
  bad.write_bytes(b"PK\x03\x04 not really")
  assert _cli("--checkpoint", bad, "--out", out, "--overwrite") == 1
  assert (out / "clip_config.json").read_bytes() == before
  assert _cli("--checkpoint", source, "--out", out, "--overwrite") == 0
  assert (
    json.loads((out / "clip_config.json").read_text())["connect_init_seed"] == 0
  )
  _, reseeded = clip.load_clip(str(out))  # Only `connect` depends on --seed.
  connect = ("params", "visual", "attnpool", "connect", "0", "kernel")
  flat, new = (traverse_util.flatten_dict(v) for v in (variables, reseeded))
  assert not np.array_equal(flat[connect], new[connect])
  unseeded = [k for k in flat if k[1:4] != clip_weights.NEW_PREFIX]
  assert all(np.array_equal(flat[k], new[k]) for k in unseeded)
  assert sorted(os.listdir(tmp_path)) == ["bad.pt", "clip"]


def test_cli_relative_and_home_paths(tiny, tmp_path, monkeypatch):
  """--checkpoint relative to the current directory, --out under `~`; the
  result loads by a relative path from elsewhere and by its `~` path."""
  _, directory, _ = tiny
  home = tmp_path / "home"
  (tmp_path / "src").mkdir()
  (tmp_path / "src" / "RN.pt").write_bytes((directory / "fp16.pt").read_bytes())
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(tmp_path)
  assert _cli("--checkpoint", "src/RN.pt", "--out", "~/weights/clip") == 0
  assert sorted(os.listdir(home / "weights" / "clip")) == [
    "checkpoint",
    "clip_config.json",
  ]
  _, by_home = clip.load_clip("~/weights/clip")
  monkeypatch.chdir(home)
  _, by_relative = clip.load_clip("weights/clip")
  assert _tree_equal(by_home, by_relative)
  assert sorted(os.listdir(tmp_path)) == ["home", "src"]
