"""The configuration schema shared by every config file, with the paper's values.

Config files (`configs/*.py`) call `base_config()` and override a few fields,
then `apply_variant()` for the Table 2 ablations. Every default the paper leaves
open is a field here, documented in docs/architecture.md.

Run-time command-line overrides use ml_collections: `--config.optim.lr=1e-5`.
"""

from __future__ import annotations

import ml_collections


class ConfigError(ValueError):
  """A config field with a value the model or the trainer cannot use."""


# Table 2 of the paper: the ablation rows and the model switches that make them.
VARIANTS: dict[str, dict[str, object]] = {
  # 1: encoders + neck + upsampling head.
  "baseline": dict(use_lsran=False, num_stages=0, use_pan=False),
  # 2: + LSRAN.
  "lsran": dict(use_lsran=True, num_stages=0, use_pan=False),
  # 3: + cascade with the Learnable Contextual Embedding (no LSRAN, no PAN).
  "cascade": dict(use_lsran=False, use_pan=False),
  # 4: LSRAN + cascade, without PAN.
  "wo_pan": dict(use_lsran=True, use_pan=False),
  # 5: the full model.
  "full": dict(use_lsran=True, use_pan=True),
  # 6: full, but every stage's embedding update sees F_m and F_mt^0 instead of
  #    the previous stage's output (no feedback).
  "wo_adaptive_lce": dict(use_lsran=True, use_pan=True, adaptive_lce=False),
}

# CLIP RN101 as OpenAI's build_model derives it from RN101.pt.
CLIP_RN101 = dict(
  embed_dim=512,
  image_resolution=224,
  vision_layers=(3, 4, 23, 3),
  vision_width=64,
  context_length=77,
  vocab_size=49408,
  transformer_width=512,
  transformer_heads=8,
  transformer_layers=12,
)

# A CLIP small enough to compile and run in seconds (tests, smoke runs). Its
# text width is 64 because OpenAI's build_model (and the converter) derive
# the head count as width // 64.
CLIP_TINY = dict(
  embed_dim=16,
  image_resolution=64,
  vision_layers=(1, 1, 1, 1),
  vision_width=8,
  context_length=8,
  vocab_size=100,
  transformer_width=64,
  transformer_heads=1,
  transformer_layers=1,
)


def base_config() -> ml_collections.ConfigDict:
  """The paper's setup (RefCOCO, CLIP RN101, 416x416, n=6, Q=20, C=1024)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  c.model.clip = ml_collections.ConfigDict(CLIP_RN101)
  c.model.clip_bn = "train"  # "train" (CRIS, SyncBN semantics) or "frozen".
  c.model.dim = 1024  # C.
  c.model.num_queries = 20  # Q.
  c.model.num_stages = 6  # n.
  c.model.num_heads = 8
  c.model.window = 13  # LSRAN window attention (divides 52).
  c.model.dilations = (1, 6, 12, 18)  # LSRAN dilated 3x3 branches.
  c.model.use_lsran = True
  c.model.use_pan = True
  c.model.adaptive_lce = True
  # q^0 ~ N(0, std^2) (1.0: torch's nn.Embedding, DETR). At 0.02 one Eq. 3
  # update leaves the Q rows of q^1 at mean cosine 0.999 (bench.query_init).
  c.model.query_init_std = 1.0
  c.model.use_words = False  # Word features as extra keys/values in Eq. 3.
  # Absolute position information (inferred; docs/architecture.md): all on,
  # chosen by the decoder's position probe at the paper's 52 x 52 map,
  # where a decoder without it cannot tell identical objects apart.
  c.model.coord_conv = True  # CRIS's CoordConv (x, y channels) in the neck.
  c.model.sine_pos = True  # Sine encodings: Eq. 3 keys, Eq. 4 queries.
  c.model.lsran_sine_pos = True  # Sine encodings in LSRAN's windows.
  c.model.pan_residual = "previous"  # "previous" (F_mt^i, paper) or "input".
  c.model.head_channels = (256, 128, 64)  # 52->104->208->416.
  c.model.deep_supervision = False  # Also return per-stage logits.
  c.model.dtype = "float32"  # Compute dtype; params stay float32.
  c.model.remat = False  # Rematerialise cascade stages in the backward pass.
  # Scan CLIP's identical blocks (stacked parameters): compiles much faster.
  c.model.scan_layers = True

  # ---------------------------------------------------------------- input
  c.input = ml_collections.ConfigDict()
  c.input.data_dir = ml_collections.config_dict.placeholder(str)
  c.input.train_split = "train"
  c.input.val_split = "val"
  c.input.test_splits = ("testA", "testB")
  c.input.image_size = 416
  c.input.max_len = 30  # L, SOT and EOT included.
  c.input.global_batch_size = 20  # Paper: 20 = 10 per A100 x 2.
  c.input.eval_batch_size = 20
  c.input.max_eval_size = 640  # Canvas for original-size GT masks (COCO<=640).
  c.input.num_workers = 2
  c.input.augment = False
  c.input.vocab = ml_collections.config_dict.placeholder(str)  # None: package.
  # With no data_dir: generate this many synthetic images under the workdir
  # (the embedded default dataset); 0 disables.
  c.input.synthetic_images = 0
  c.input.synthetic_seed = 0
  # What they show and say: data_prep.synthetic.PRESETS ("default", or
  # "position": the position probe, configs/position_probe.py).
  c.input.synthetic_preset = "default"

  # ----------------------------------------------------------------- loss
  c.loss = ml_collections.ConfigDict()
  c.loss.class_weights = ml_collections.config_dict.placeholder(tuple)
  # Weight of each per-stage loss; used with model.deep_supervision only.
  c.loss.stage_weight = 0.5

  # ------------------------------------------------------------ optimiser
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 6e-6
  c.optim.weight_decay = 0.01  # Kernels only.
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.poly_power = 0.9
  c.optim.end_lr = 0.0
  c.optim.warmup_steps = 0
  # ((regex, multiplier), ...); multiplier 0 freezes. CRIS: (("clip/.*", 0.1),)
  c.optim.lr_mults = ()
  c.optim.grad_clip_norm = ml_collections.config_dict.placeholder(float)
  c.optim.grad_accum_steps = 1

  # ------------------------------------------------------------- schedule
  c.num_epochs = 60
  c.total_steps = ml_collections.config_dict.placeholder(int)  # Overrides.
  c.log_every_steps = 50
  c.eval_every_epochs = 1
  # Expressions of the first validation batch drawn into TensorBoard
  # ("val/predictions") at every validation; 0: none.
  c.val_previews = 4
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  # After training, also score the first test split with sentences shuffled
  # across expressions (how much the model relies on the language).
  c.language_check = False

  # ------------------------------------------------------------- sharding
  # Mesh axis sizes; -1 takes the remaining devices. The batch is split over
  # both axes; the "fsdp" axis also shards every parameter (and its optimiser
  # state) of at least `shard_min_size` elements along its largest divisible
  # dimension, FSDP-style. fsdp=1 is plain data parallelism.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
  c.shard_min_size = 2**18

  # ------------------------------------------------------- initialisation
  c.init = ml_collections.ConfigDict()
  c.init.clip_dir = ml_collections.config_dict.placeholder(str)  # Converted.
  # Without clip_dir, training refuses to start unless this is True: a
  # RefCOCO run from a random CLIP is almost always a forgotten flag.
  c.init.random_clip = False
  return c


def small_config(
  *, image_size: int, max_len: int, width: int, dim: int
) -> ml_collections.ConfigDict:
  """A scaled-down JMCELN for CPU runs (main job, tests): a small CLIP-like
  ResNet/text transformer trained from scratch, the same decoder at width
  `dim`. The H/8 map is image_size/8 (window and dilations scaled to it).
  """
  c = base_config()
  c.model.clip = ml_collections.ConfigDict(
    dict(
      embed_dim=dim,
      image_resolution=image_size,
      vision_layers=(1, 1, 1, 1),
      vision_width=width,
      context_length=max_len,
      vocab_size=49408,
      transformer_width=dim,
      transformer_heads=max(dim // 32, 1),
      transformer_layers=2,
    )
  )
  c.model.dim = dim
  c.model.num_queries = 8
  c.model.num_stages = 2
  c.model.num_heads = 4
  c.model.window = image_size // 16
  c.model.dilations = (1, 2, 3, 4)
  c.model.head_channels = (dim // 2, dim // 4, dim // 4)
  c.input.image_size = image_size
  c.input.max_len = max_len
  c.input.max_eval_size = 256
  c.init.random_clip = True  # Trained from scratch by design.
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  return c


def synthetic_job(variant: str, preset: str) -> ml_collections.ConfigDict:
  """The CPU main job's settings (configs/synthetic.py, whose docstring
  says how they were chosen) for one Table 2 variant and synthetic preset
  (data_prep.synthetic.PRESETS)."""
  c = small_config(image_size=64, max_len=16, width=16, dim=64)
  apply_variant(c, variant)
  c.model.head_channels = (32, 16, 8)
  c.input.synthetic_preset = preset
  c.input.synthetic_images = 3000
  c.input.test_splits = ("testA", "testB")
  c.input.global_batch_size = 16
  c.input.eval_batch_size = 64
  c.input.num_workers = 1
  c.num_epochs = 6
  c.optim.warmup_steps = 100
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.eval_every_epochs = 6
  c.language_check = True
  return c


def check_training(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for settings that train but cannot be meant.

  - No converted CLIP (init.clip_dir) without init.random_clip=True.
  - model.deep_supervision without stages, or with loss.stage_weight 0
    (the stage classifiers would get no gradient).
  """
  if not config.init.clip_dir and not config.init.get("random_clip", False):
    raise ConfigError(
      "No pretrained CLIP: set --config.init.clip_dir to a converted CLIP "
      "(python -m jmceln_jax.convert_clip --checkpoint RN101.pt --out DIR; "
      "README, 'Converting OpenAI CLIP weights'), or pass "
      "--config.init.random_clip=True to train from a random CLIP on purpose."
    )
  model = config.model
  if model.deep_supervision and model.num_stages < 1:
    raise ConfigError(
      "model.deep_supervision=True needs cascade stages (model.num_stages "
      f"is {model.num_stages})."
    )
  if model.deep_supervision and config.loss.stage_weight <= 0:
    raise ConfigError(
      "model.deep_supervision=True with loss.stage_weight="
      f"{config.loss.stage_weight}: the stage classifiers would get no "
      "gradient. Give loss.stage_weight > 0 (default 0.5)."
    )


def paper_config(
  test_splits: tuple[str, ...], variant: str | None
) -> ml_collections.ConfigDict:
  """The paper's setup for one dataset, with an optional Table 2 variant."""
  c = base_config()
  c.input.test_splits = test_splits
  apply_variant(c, variant or "full")
  return c


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> None:
  """Applies a Table 2 ablation (see VARIANTS) to `config.model` in place."""
  if variant not in VARIANTS:
    raise ConfigError(
      f"Unknown variant {variant!r}; choose one of {sorted(VARIANTS)}."
    )
  config.model.update(VARIANTS[variant])
