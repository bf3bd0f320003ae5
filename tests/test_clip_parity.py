"""Flax CLIP vs OpenAI's PyTorch CLIP, end to end through the converter.

Random RN101 (fp16 TorchScript archive, like OpenAI's) and RN50 (fp32) models
are converted with the CLI's `main`, loaded with `load_clip` and compared in
float32: max |diff| <= 1e-4 * max |reference| for every output.
"""

from __future__ import annotations

import functools

import clip_torch_ref as ref
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax_test_utils import RN50, random_variables

from jmceln_jax import convert_clip
from jmceln_jax.config_lib import CLIP_RN101
from jmceln_jax.models import clip, clip_resnet

pytestmark = pytest.mark.slow  # The fast tier: pytest -m 'not slow'.

torch = ref.torch
F = ref.F
TOL = 1e-4
SOT, EOT = 49406, 49407


@pytest.fixture(scope="module", autouse=True)
def _two_torch_threads():
  threads = torch.get_num_threads()
  torch.set_num_threads(2)
  yield
  torch.set_num_threads(threads)


def _converted(tmp_path_factory, name: str, hparams: dict, fp16: bool):
  """(torch model, Flax model, variables) of one random CLIP."""
  torch_model = ref.random_clip(hparams)
  directory = tmp_path_factory.mktemp(name)
  archive = directory / f"{name}.pt"
  ref.save_torchscript(torch_model, str(archive), fp16=fp16)
  out = directory / "converted"
  assert (
    convert_clip.main(["--checkpoint", str(archive), "--out", str(out)]) == 0
  )
  archive.unlink()
  model, variables = clip.load_clip(str(out))
  return torch_model, model, variables


@pytest.fixture(scope="module")
def rn101(tmp_path_factory):
  return _converted(tmp_path_factory, "rn101", CLIP_RN101, fp16=True)


@pytest.fixture(scope="module")
def rn50(tmp_path_factory):
  return _converted(tmp_path_factory, "rn50", RN50, fp16=False)


def _encode_image(model, variables, images, **kwargs):
  fn = jax.jit(
    lambda v, x: model.apply(v, x, method=model.encode_image, **kwargs)
  )
  return fn(variables, jnp.asarray(images))


def _check_image(torch_model, variables, out, images, pooled: bool):
  """Compares the Flax image outputs with the torch reference."""
  with torch.no_grad():
    x = ref.to_nchw(images)
    expected = dict(
      zip(
        ("layer2", "layer3", "layer4"),
        ref.trunk(torch_model.visual, x),
        strict=True,
      )
    )
    heads = torch_model.visual.attnpool.num_heads
    pool = ref.flax_pool_params(
      variables["params"]["visual"]["attnpool"],
      variables["batch_stats"]["visual"]["attnpool"],
    )
    expected["dense"] = ref.dense_pool(expected["layer4"], pool, heads)
    expected = {k: ref.to_nhwc(v) for k, v in expected.items()}
    if pooled:
      expected["pooled"] = torch_model.visual(x).numpy()
  assert set(out) == set(expected) | {"layer1"}
  for name, value in expected.items():
    assert out[name].shape == value.shape, name
    assert ref.max_rel_diff(out[name], value) <= TOL, name


def test_rn101_image_non_square(rn101):
  torch_model, model, variables = rn101
  images = np.random.default_rng(0).normal(size=(1, 160, 224, 3))
  images = images.astype(np.float32)
  out = _encode_image(model, variables, images)
  assert out["dense"].shape == (1, 5, 7, 512)
  _check_image(torch_model, variables, out, images, pooled=False)


def test_rn101_pooled_native_resolution(rn101):
  """The original pool on torch's layer4 at 224 (RN50 runs it end to end)."""
  torch_model, _, variables = rn101
  images = np.random.default_rng(1).normal(size=(1, 224, 224, 3))
  with torch.no_grad():
    layer4 = ref.trunk(
      torch_model.visual, ref.to_nchw(images.astype(np.float32))
    )[2]
    expected = torch_model.visual.attnpool(layer4).numpy()
  pool = clip_resnet.AttentionPool2d(
    grid=7, width=2048, num_heads=32, output_dim=512
  )
  params = {"params": variables["params"]["visual"]["attnpool"]}
  got = jax.jit(functools.partial(pool.apply, method="pool"))(
    params, ref.to_nhwc(layer4)
  )
  assert ref.max_rel_diff(got, expected) <= TOL


def _tokens(length: int) -> np.ndarray:
  """Two rows: a short padded sentence and a full-length one."""
  rng = np.random.default_rng(length)
  tokens = np.zeros((2, length), np.int32)
  tokens[0, :6] = [SOT, *rng.integers(1, SOT, 4), EOT]
  tokens[1] = [SOT, *rng.integers(1, SOT, length - 2), EOT]
  return tokens


@pytest.mark.parametrize("length", [77, 30])
def test_rn101_text(rn101, length):
  torch_model, model, variables = rn101
  tokens = _tokens(length)
  out = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(
    variables, tokens
  )
  with torch.no_grad():
    words, sentence = ref.text_features(
      torch_model, torch.from_numpy(tokens).long()
    )
  assert out["words"].shape == (2, length, 512)
  assert ref.max_rel_diff(out["words"], words.numpy()) <= TOL
  assert ref.max_rel_diff(out["sentence"], sentence.numpy()) <= TOL
  np.testing.assert_array_equal(out["pad_mask"], tokens == 0)


def test_rn50_image(rn50):
  torch_model, model, variables = rn50
  images = np.random.default_rng(2).normal(size=(1, 224, 224, 3))
  images = images.astype(np.float32)
  out = _encode_image(model, variables, images)
  assert out["pooled"].shape == (1, 1024)
  _check_image(torch_model, variables, out, images, pooled=True)


@pytest.fixture(scope="module")
def small_pool():
  """A random standalone AttentionPool2d (grid 3, width 64, 4 heads)."""
  module = clip_resnet.AttentionPool2d(
    grid=3, width=64, num_heads=4, output_dim=16
  )
  init = functools.partial(
    module.init, use_running_average=True, method="dense"
  )
  x = jax.ShapeDtypeStruct((1, 3, 3, 64), jnp.float32)
  abstract = jax.eval_shape(init, jax.random.key(0), x)
  variables = random_variables(abstract, seed=0, scale=0.1)
  return module, variables


@pytest.mark.parametrize("size", [(4, 6), (2, 2), (3, 3)])
def test_dense_pool_matches_torch_reference(small_pool, size):
  module, variables = small_pool
  x = np.random.default_rng(3).normal(size=(2, *size, 64)).astype(np.float32)
  dense = functools.partial(
    module.apply, use_running_average=True, method="dense"
  )
  got = jax.jit(dense)(variables, x)
  params = ref.flax_pool_params(variables["params"], variables["batch_stats"])
  with torch.no_grad():
    expected = ref.dense_pool(ref.to_nchw(x), params, 4)
  assert got.shape == (2, *size, 16)
  assert ref.max_rel_diff(got, ref.to_nhwc(expected)) <= TOL


def test_pool_matches_openai_attention_pool(small_pool):
  module, variables = small_pool
  torch_pool = ref.openai_model_module().AttentionPool2d(3, 64, 4, 16).eval()
  params = ref.flax_pool_params(variables["params"], variables["batch_stats"])
  with torch.no_grad():
    torch_pool.positional_embedding.copy_(
      torch.from_numpy(params["positional_embedding"])
    )
    for name in "qkvc":
      layer = getattr(torch_pool, f"{name}_proj")
      layer.weight.copy_(torch.from_numpy(params[f"{name}_w"]))
      layer.bias.copy_(torch.from_numpy(params[f"{name}_b"]))
  x = np.random.default_rng(4).normal(size=(2, 3, 3, 64)).astype(np.float32)
  got = jax.jit(functools.partial(module.apply, method="pool"))(variables, x)
  with torch.no_grad():
    expected = torch_pool(ref.to_nchw(x)).numpy()
  assert ref.max_rel_diff(got, expected) <= TOL
  with pytest.raises(ValueError, match="native 3x3"):
    module.apply(variables, jnp.asarray(x[:, :2]), method="pool")
