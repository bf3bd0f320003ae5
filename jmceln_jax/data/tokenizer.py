"""CLIP byte-level BPE tokenization, id-for-id equal to OpenAI's.

`tokenize(texts, context_length)` returns exactly the ids of OpenAI's
`clip.tokenize(texts, context_length, truncate=True)`: the text is cleaned the
same way (ftfy, HTML unescaping twice, whitespace collapsing, lower case), split
with OpenAI's regular expression, byte-encoded and merged with the 48,894 BPE
merges of `bpe_simple_vocab_16e6.txt.gz`; rows are `SOT ids... EOT` padded with
0, and a too-long row is cut so that EOT stays its last token.

Text cleaning and the regex split run in Python with OpenAI's own `ftfy` and
`regex` calls; byte mapping and BPE merges run batched in the `tokenizers`
library (Rust).

Vocabulary sources, first match wins:
  1. the `vocab` argument (config field `input.vocab`): a path to
     `bpe_simple_vocab_16e6.txt.gz`, or a directory holding a Hugging Face CLIP
     tokenizer's `vocab.json` and `merges.txt`;
  2. the `.gz` file shipped in the installed `clip` package (clip-anytorch).
Nothing is downloaded and nothing is vendored.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import os
from collections.abc import Sequence

import ftfy
import numpy as np
import regex
import tokenizers
from tokenizers import models, pre_tokenizers

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
GZ_NAME = "bpe_simple_vocab_16e6.txt.gz"
# OpenAI's SimpleTokenizer uses lines [1, 49152 - 256 - 2 + 1) of the file.
_NUM_MERGES = 49152 - 256 - 2

# OpenAI's split pattern and flags. It runs in Python with the same `regex`
# engine as OpenAI's code, so even its Unicode tables agree; Oniguruma (the
# Rust side's engine) classifies code points new in Unicode 15+ differently.
_SPLIT_RE = regex.compile(
  r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"
  r"|[^\s\p{L}\p{N}]+",
  regex.IGNORECASE,
)
_WHITESPACE_RE = regex.compile(r"\s+")

_MISSING_VOCAB = (
  "No CLIP BPE vocabulary found. Install the package that ships it with\n"
  "  pip install --no-deps clip-anytorch==2.6.0\n"
  f"or pass the path of {GZ_NAME} (or of a directory holding a Hugging Face "
  "CLIP tokenizer's vocab.json and merges.txt) as `vocab=` / the config field "
  "`input.vocab`."
)


def clean(text: str) -> str:
  """OpenAI's text cleaning: ftfy, HTML unescape twice, whitespace, lower."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return _WHITESPACE_RE.sub(" ", text).strip().lower()


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 byte values to printable characters.

  Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte
  order, to the code points 256, 257, ...

  Returns:
    A dict byte value -> one-character string, in byte order.
  """
  keep = [
    *range(ord("!"), ord("~") + 1),
    *range(ord("¡"), ord("¬") + 1),
    *range(ord("®"), ord("ÿ") + 1),
  ]
  extra = [b for b in range(256) if b not in keep]
  codes = keep + [256 + n for n in range(len(extra))]
  return {b: chr(c) for b, c in zip(keep + extra, codes, strict=True)}


def default_vocab_path() -> str | None:
  """The BPE file of the installed `clip` package, found without importing it.

  Returns:
    The path, or None when the package or the file is missing.
  """
  spec = importlib.util.find_spec("clip")
  for folder in (spec and spec.submodule_search_locations) or ():
    path = os.path.join(folder, GZ_NAME)
    if os.path.isfile(path):
      return path
  return None


def resolve_vocab(vocab: str | None = None) -> str:
  """The absolute path of the vocabulary to use (see the module docstring).

  Args:
    vocab: None, a `.gz` BPE file or a directory with vocab.json + merges.txt.

  Returns:
    An absolute path to a file or directory.

  Raises:
    FileNotFoundError: nothing usable was given or installed.
  """
  if vocab is None:
    vocab = default_vocab_path()
    if vocab is None:
      raise FileNotFoundError(_MISSING_VOCAB)
  vocab = os.path.abspath(os.path.expanduser(vocab))
  if os.path.isdir(vocab):
    names = ("vocab.json", "merges.txt")
    if not all(os.path.isfile(os.path.join(vocab, n)) for n in names):
      raise FileNotFoundError(
        f"Vocabulary directory {vocab} must hold vocab.json and merges.txt "
        f"(a Hugging Face CLIP tokenizer), or pass the path of {GZ_NAME}."
      )
  elif not os.path.isfile(vocab):
    raise FileNotFoundError(
      f"Vocabulary {vocab} does not exist.\n" + _MISSING_VOCAB
    )
  return vocab


def _load_vocab(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Reads (token -> id, merges) from a `.gz` file or a Hugging Face folder."""
  if os.path.isdir(path):
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
      encoder = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
      lines = f.read().split("\n")
    lines = [ln for ln in lines if ln and not ln.startswith("#version")]
    merges = [tuple(ln.split()) for ln in lines]
  else:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")[1 : _NUM_MERGES + 1]
    merges = [tuple(ln.split()) for ln in lines]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    encoder = {t: i for i, t in enumerate([*tokens, SOT, EOT])}
  if (
    len(encoder) != VOCAB_SIZE
    or len(merges) != _NUM_MERGES
    or encoder.get(SOT) != SOT_ID
  ):
    raise ValueError(
      f"{path} is not the CLIP BPE vocabulary: {len(encoder)} tokens and "
      f"{len(merges)} merges (expected {VOCAB_SIZE} and {_NUM_MERGES}, with "
      f"{SOT} = {SOT_ID})."
    )
  return encoder, merges


@functools.lru_cache(maxsize=4)
def _build(path: str) -> tokenizers.Tokenizer:
  """The Rust BPE for an already resolved vocabulary path.

  It takes the regex pieces of cleaned text (is_pretokenized=True), maps their
  bytes to characters and merges them; a piece equal to a special token maps to
  its id, as in OpenAI's BPE cache.
  """
  encoder, merges = _load_vocab(path)
  tok = tokenizers.Tokenizer(
    models.BPE(encoder, merges, end_of_word_suffix="</w>")
  )
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(
    add_prefix_space=False, use_regex=False
  )
  tok.add_special_tokens([SOT, EOT])
  return tok


def build_tokenizer(vocab: str | None = None) -> tokenizers.Tokenizer:
  """The Rust BPE of a vocabulary (see the module docstring): it encodes
  the regex pieces of cleaned text (`is_pretokenized=True`), without SOT/EOT;
  `.save()` writes it as a self-contained tokenizer.json."""
  return _build(resolve_vocab(vocab))


def _encode(tok: tokenizers.Tokenizer, texts: Sequence[str]) -> list[list[int]]:
  pieces = [_SPLIT_RE.findall(clean(t)) for t in texts]
  return [e.ids for e in tok.encode_batch_fast(pieces, is_pretokenized=True)]


def _check_length(context_length: int) -> None:
  if context_length < 2:
    raise ValueError(
      f"context_length must be >= 2 (SOT and EOT), got {context_length}."
    )


def _to_rows(ids: Sequence[Sequence[int]], context_length: int) -> np.ndarray:
  """[N, L] int32 rows SOT ids EOT 0..., cut to keep EOT last (OpenAI)."""
  out = np.zeros((len(ids), context_length), np.int32)
  out[:, 0] = SOT_ID
  for row, seq in zip(out, ids, strict=True):
    n = min(len(seq), context_length - 2)
    row[1 : n + 1] = seq[:n]
    row[n + 1] = EOT_ID
  return out


def encode(
  texts: Sequence[str], *, vocab: str | None = None
) -> list[list[int]]:
  """BPE ids of each text, without SOT/EOT (OpenAI's `SimpleTokenizer.encode`).

  Args:
    texts: raw strings.
    vocab: vocabulary source (see the module docstring).

  Returns:
    One list of ids per text.
  """
  return _encode(_build(resolve_vocab(vocab)), texts)


def tokenize(
  texts: str | Sequence[str],
  context_length: int = 77,
  *,
  vocab: str | None = None,
) -> np.ndarray:
  """Token ids equal to OpenAI's clip.tokenize(..., truncate=True).

  Args:
    texts: one string or a sequence of N strings.
    context_length: L, the row length including SOT and EOT (>= 2).
    vocab: vocabulary source (see the module docstring); config `input.vocab`.

  Returns:
    ids: [N, L] int32; SOT, BPE ids, EOT, then zeros. Rows longer than L are
    cut to L with EOT as the last token.

  Raises:
    ValueError: context_length < 2.
    FileNotFoundError: no vocabulary is available.
  """
  _check_length(context_length)
  texts = [texts] if isinstance(texts, str) else texts
  return _to_rows(encode(texts, vocab=vocab), context_length)


class Tokenizer:
  """A picklable `tokenize` with fixed settings, for data-pipeline workers.

  Only the vocabulary path and the length are pickled; each process builds
  (and caches) the Rust tokenizer on first use.
  """

  def __init__(self, context_length: int = 77, vocab: str | None = None):
    """Checks the settings now so that a missing vocabulary fails early.

    Args:
      context_length: L, SOT and EOT included.
      vocab: vocabulary source (see the module docstring).
    """
    _check_length(context_length)
    self.context_length = context_length
    self.vocab = resolve_vocab(vocab)

  def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
    """Returns tokenize(texts): [N, L] int32."""
    texts = [texts] if isinstance(texts, str) else texts
    return _to_rows(_encode(_build(self.vocab), texts), self.context_length)
