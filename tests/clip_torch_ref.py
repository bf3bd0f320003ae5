"""Torch references for the CLIP tests: OpenAI's model.py and small helpers.

OpenAI's `clip/model.py` (from clip-anytorch) is loaded by file path because
`import clip` needs torchvision. Only the tests import this module.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flax_test_utils import TINY_CLIP

from bench import encoders

torch = pytest.importorskip("torch")
F = torch.nn.functional

# The converter tests' model: two blocks in layer2, two text layers.
TINY = dict(TINY_CLIP, vision_layers=(1, 2, 1, 1), transformer_layers=2)


def openai_model_module():
  """OpenAI's clip/model.py, imported by path from site-packages."""
  module = encoders.openai_clip_module()
  if module is None:
    pytest.skip("torch or clip-anytorch (OpenAI clip/model.py) is missing")
  return module


def random_clip(hparams: dict, seed: int = 0):
  """An OpenAI CLIP with every parameter and BN statistic randomised.

  OpenAI's init zeroes bn3 gammas and attention biases and leaves BN
  statistics at 0/1, which would hide conversion bugs.
  """
  torch.manual_seed(seed)
  model = openai_model_module().CLIP(**hparams, vision_patch_size=None).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
      if isinstance(module, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
    for name, param in model.named_parameters():
      if name.endswith("bias"):
        param.normal_(0, 0.02)
  return model


def save_torchscript(model, path: str, *, fp16: bool) -> None:
  """Saves `model` as a TorchScript archive, fp16 like OpenAI's releases.

  Traces `encode_text` only (short input, no trace check): the archive holds
  the whole module tree either way, and tracing the image tower on CPU is
  slow. With fp16, OpenAI's `convert_weights` runs first and the model is
  turned back to float32 afterwards (its values then equal the archive's).
  """
  if fp16:
    openai_model_module().convert_weights(model)
  tokens = torch.tensor([[1, 2, model.vocab_size - 1]])
  with warnings.catch_warnings():  # TorchScript deprecation, tracer notes.
    warnings.simplefilter("ignore")
    traced = torch.jit.trace_module(
      model, {"encode_text": tokens}, check_trace=False
    )
    torch.jit.save(traced, path)
  model.float()


def to_nchw(x: np.ndarray):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(x) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def trunk(visual, x):
  """(layer2, layer3, layer4) of OpenAI's ModifiedResNet, NCHW."""
  x = visual.relu1(visual.bn1(visual.conv1(x)))
  x = visual.relu2(visual.bn2(visual.conv2(x)))
  x = visual.avgpool(visual.relu3(visual.bn3(visual.conv3(x))))
  x2 = visual.layer2(visual.layer1(x))
  x3 = visual.layer3(x2)
  return x2, x3, visual.layer4(x3)


def text_features(model, tokens):
  """(words = ln_final output [B, L, W], sentence [B, E]) of OpenAI CLIP."""
  length = tokens.shape[-1]
  x = model.token_embedding(tokens) + model.positional_embedding[:length]
  x = model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
  words = model.ln_final(x)
  eot = words[torch.arange(words.shape[0]), tokens.argmax(-1)]
  return words, eot @ model.text_projection


def dense_pool(x, pool: dict, num_heads: int):
  """CRIS's dense attention pool from torch primitives, NCHW in and out.

  Args:
    x: [B, C, H, W] features.
    pool: numpy arrays in torch layout: positional_embedding, {q,k,v,c}_w
      [out, in], {q,k,v,c}_b, connect_w [E, C, 1, 1], bn_{w,b,mean,var}.
    num_heads: attention heads.

  Returns:
    [B, E, H, W].
  """
  p = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in pool.items()}
  b, c, h, w = x.shape
  residual = F.batch_norm(
    F.conv2d(x, p["connect_w"]),
    p["bn_mean"],
    p["bn_var"],
    p["bn_w"],
    p["bn_b"],
    training=False,
    eps=1e-5,
  )
  grid = int(round((p["positional_embedding"].shape[0] - 1) ** 0.5))
  pos = p["positional_embedding"][1:].reshape(1, grid, grid, c)
  pos = F.interpolate(
    pos.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False
  )
  tokens = (x + pos).flatten(2).permute(2, 0, 1)  # [HW, B, C]
  out, _ = F.multi_head_attention_forward(
    query=tokens,
    key=tokens,
    value=tokens,
    embed_dim_to_check=c,
    num_heads=num_heads,
    in_proj_weight=None,
    in_proj_bias=torch.cat([p["q_b"], p["k_b"], p["v_b"]]),
    bias_k=None,
    bias_v=None,
    add_zero_attn=False,
    dropout_p=0.0,
    out_proj_weight=p["c_w"],
    out_proj_bias=p["c_b"],
    training=False,
    need_weights=False,
    use_separate_proj_weight=True,
    q_proj_weight=p["q_w"],
    k_proj_weight=p["k_w"],
    v_proj_weight=p["v_w"],
  )
  out = out.permute(1, 2, 0).reshape(b, -1, h, w)
  return torch.relu(out + residual)


def flax_pool_params(params: dict, stats: dict) -> dict:
  """Flax attnpool `params`/`batch_stats` in `dense_pool`'s torch layout."""
  out = {"positional_embedding": params["positional_embedding"]}
  for name in "qkvc":
    out[f"{name}_w"] = np.asarray(params[f"{name}_proj"]["kernel"]).T
    out[f"{name}_b"] = params[f"{name}_proj"]["bias"]
  out["connect_w"] = np.asarray(params["connect"]["0"]["kernel"]).transpose(
    3, 2, 0, 1
  )
  out["bn_w"] = params["connect"]["1"]["scale"]
  out["bn_b"] = params["connect"]["1"]["bias"]
  out["bn_mean"] = stats["connect"]["1"]["mean"]
  out["bn_var"] = stats["connect"]["1"]["var"]
  return out


def max_rel_diff(actual, expected) -> float:
  """max |actual - expected| / max |expected|."""
  expected = np.asarray(expected, np.float64)
  diff = np.abs(np.asarray(actual, np.float64) - expected).max()
  return float(diff / np.abs(expected).max())
