"""Training augmentation that keeps referring expressions true.

Only geometry the sentence can follow is changed:
- a horizontal flip (probability 0.5) of image and mask, together with the
  sentence mirrored: left <-> right, leftmost <-> rightmost, left-hand <->
  right-hand, ... (whole words, capitalisation kept). Sentences where
  "right" may be an intensifier ("the man right next to the bus") are never
  flipped, since mirroring them would turn a true phrase into a false one;
- a mild letterbox jitter: the fitted size scaled by U(0.85, 1) and placed at
  a random position of the S x S canvas (`preprocess.random_letterbox_params`),
  the same geometry for image and mask.
No colour jitter: colour words ("the red car") must stay true.
"""

from __future__ import annotations

import re

import numpy as np

from jmceln_jax.data import preprocess

FLIP_PROBABILITY = 0.5
MIN_SCALE = 0.85

_OPPOSITE = {"left": "right", "right": "left"}
# "left"/"right" alone or with a suffix that keeps the direction; not inside
# other words ("leftover", "alright", "rightly").
_SIDE_WORD = re.compile(r"\b(left|right)(most|hand|side|ward|wards)?\b", re.I)
# "right" followed by these may mean "directly" ("right next to", "right
# behind", "right in front of") ...
_INTENSIFIABLE = frozenset(
  "next behind beside besides above below under underneath near by there "
  "here against between across over along after before infront in on at "
  "up down".split()
)
# ... unless a direction cue precedes it ("on right in red", "far right by
# the door").
_DIRECTION_CUES = frozenset(
  "on to the far at from top bottom upper lower middle extreme very "
  "most".split()
)


def _swap(match: re.Match) -> str:
  word, suffix = match.group(1), match.group(2) or ""
  new = _OPPOSITE[word.lower()]
  if word.isupper():
    new = new.upper()
  elif word[0].isupper():
    new = new.capitalize()
  return new + suffix


def mirror_sentence(sentence: str) -> str | None:
  """The sentence for the horizontally flipped image.

  Args:
    sentence: a referring expression.

  Returns:
    The sentence with left/right words swapped (unchanged if it has none),
    or None when it cannot be mirrored safely ("right" possibly meaning
    "directly").
  """
  words = re.findall(r"[a-z]+", sentence.lower())
  for i, word in enumerate(words):
    after = words[i + 1] if i + 1 < len(words) else ""
    before = words[i - 1] if i else ""
    if (
      word == "right"
      and after in _INTENSIFIABLE
      and before not in _DIRECTION_CUES
    ):
      return None
  return _SIDE_WORD.sub(_swap, sentence)


def augment(
  image: np.ndarray,
  mask: np.ndarray,
  sentence: str,
  size: int,
  rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, str, preprocess.Letterbox]:
  """Random flip (sentence mirrored) and letterbox jitter of one example.

  Args:
    image: [H, W, 3] uint8 original image.
    mask: [H, W] original mask.
    sentence: its referring expression.
    size: S, the letterbox side.
    rng: draws, in order, the flip and the letterbox geometry.

  Returns:
    (image, mask, sentence) flipped and mirrored or as given, and the
    Letterbox to apply to both (letterbox_image(..., box=), letterbox_mask).
  """
  mirrored = mirror_sentence(sentence)
  if rng.random() < FLIP_PROBABILITY and mirrored is not None:
    image = np.ascontiguousarray(image[:, ::-1])
    mask = np.ascontiguousarray(mask[:, ::-1])
    sentence = mirrored
  box = preprocess.random_letterbox_params(
    image.shape[0], image.shape[1], size, rng, MIN_SCALE
  )
  return image, mask, sentence, box
