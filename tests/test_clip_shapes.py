"""CLIP shapes at full size (jax.eval_shape, no compute) and module options."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from flax_test_utils import RN50, TINY_CLIP, random_variables

from jmceln_jax.config_lib import CLIP_RN101
from jmceln_jax.models import clip

RN50X4 = dict(
  CLIP_RN101,
  embed_dim=640,
  image_resolution=288,
  vision_layers=(4, 6, 10, 6),
  vision_width=80,
  transformer_width=640,
  transformer_heads=10,
)


def _shapes(model, images, tokens):
  """eval_shape of ((encode_image, encode_text), variables) in one trace."""
  return jax.eval_shape(
    model.init_with_output, jax.random.key(0), images, tokens
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "hparams, width", [(RN50, 64), (CLIP_RN101, 64), (RN50X4, 80)]
)
def test_full_size_shapes(hparams, width):
  model = clip.CLIP(**hparams)
  images = jax.ShapeDtypeStruct((2, 416, 416, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((2, 30), jnp.int32)
  (image, text), variables = _shapes(model, images, tokens)
  embed = hparams["embed_dim"]
  chex.assert_shape(image["layer2"], (2, 52, 52, 8 * width))
  chex.assert_shape(image["layer3"], (2, 26, 26, 16 * width))
  chex.assert_shape(image["layer4"], (2, 13, 13, 32 * width))
  chex.assert_shape(image["dense"], (2, 13, 13, embed))
  assert "pooled" not in image  # 416 is not the native resolution.
  chex.assert_shape(text["words"], (2, 30, hparams["transformer_width"]))
  chex.assert_shape(text["sentence"], (2, embed))
  chex.assert_shape(text["pad_mask"], (2, 30))
  assert text["pad_mask"].dtype == jnp.bool_
  pos = variables["params"]["visual"]["attnpool"]["positional_embedding"]
  grid = hparams["image_resolution"] // 32
  chex.assert_shape(pos, (grid**2 + 1, 32 * width))


def test_pooled_option_and_errors():
  model = clip.CLIP(**dict(TINY_CLIP, image_resolution=224))
  variables = clip.abstract_variables(model)

  def encode(size, length=8, **kwargs):
    images = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
    return jax.eval_shape(
      lambda v, x, t: (
        model.apply(v, x, method=model.encode_image, **kwargs),
        model.apply(v, t, method=model.encode_text),
      ),
      variables,
      images,
      tokens,
    )

  image, _ = encode((224, 224))
  chex.assert_shape(image["pooled"], (1, 16))
  assert "pooled" not in encode((224, 224), pooled=False)[0]
  with pytest.raises(ValueError, match="native 7x7"):
    encode((224, 256), pooled=True)
  with pytest.raises(ValueError, match="context length 8"):
    encode((224, 224), length=9)


def test_bfloat16_compute_keeps_float32_params():
  model = clip.CLIP(**RN50, dtype=jnp.bfloat16)
  images = jax.ShapeDtypeStruct((1, 96, 128, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 30), jnp.int32)
  (image, text), variables = _shapes(model, images, tokens)
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
  assert image["dense"].dtype == text["words"].dtype == jnp.bfloat16
  chex.assert_shape(image["dense"], (1, 3, 4, 1024))


@pytest.mark.slow
def test_hparams_and_parameter_count_match_openai():
  import clip_torch_ref as ref  # Here: only this test needs torch.

  torch = ref.torch
  with torch.device("meta"):
    model = ref.openai_model_module().CLIP(**CLIP_RN101, vision_patch_size=None)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert clip.hparams_from_shapes(shapes) == CLIP_RN101
  with pytest.raises(ValueError, match="ViT"):
    clip.hparams_from_shapes({**shapes, "visual.proj": (768, 512)})
  variables = clip.abstract_variables(clip.CLIP(**CLIP_RN101))
  count = sum(x.size for x in jax.tree.leaves(variables["params"]))
  torch_count = sum(p.numel() for p in model.parameters())
  # No logit_scale; plus the new connect conv (2048 -> 512) and its BN.
  assert count == torch_count - 1 + 2048 * 512 + 2 * 512


@pytest.mark.slow
@pytest.mark.parametrize("freeze_bn", [False, True])
def test_batch_norm_modes(freeze_bn):
  """Frozen: OpenAI's statistics never change and their outputs are the
  running-average ones; the new `connect` BatchNorm (no converted
  statistics) still trains."""
  model = clip.CLIP(**TINY_CLIP, freeze_bn=freeze_bn)
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 96, 3)))
  variables = random_variables(clip.abstract_variables(model), seed=1)

  def train_and_eval(v, x):
    train = model.apply(
      v, x, train=True, method=model.encode_image, mutable=["batch_stats"]
    )
    return train, model.apply(v, x, method=model.encode_image)

  (out, updates), frozen = jax.jit(train_and_eval)(variables, images)
  chex.assert_shape(out["dense"], (2, 2, 3, 16))
  changed = traverse_util.flatten_dict(
    jax.tree.map(
      lambda a, b: bool(jnp.any(a != b)),
      updates["batch_stats"],
      variables["batch_stats"],
    ),
    sep="/",
  )
  connect = {k: v for k, v in changed.items() if "/connect/" in k}
  others = {k: v for k, v in changed.items() if "/connect/" not in k}
  assert connect and all(connect.values())
  assert any(others.values()) != freeze_bn
  same = jax.tree.map(
    lambda a, b: bool(jnp.allclose(a, b, rtol=1e-4, atol=1e-4 * abs(b).max())),
    out,
    frozen,
  )
  assert not same.pop("dense")  # `connect` normalises by batch statistics.
  assert all(same.values()) == freeze_bn
