"""Token ids equal OpenAI's clip.tokenize (SimpleTokenizer loaded by path)."""

import gzip
import importlib.util
import json
import os
import pickle

import numpy as np
import pytest

from jmceln_jax.data import tokenizer

_WORDS = "the man on the left wearing a red shirt next to the small dog".split()

SENTENCES = [
  "a photo of a cat",
  "Man in RED shirt, far left!!",
  "café naïve façade Zoë Ångström crème brûlée",
  "emoji 😀👍🏽 🇯🇵 family 👨‍👩‍👧",
  "punctuation... ?!?! (brackets) [x] {y} -- a/b \\ c_d ~ `q` @#$%^&*",
  "&amp; &lt;3 &gt; &quot;q&quot; &#39;s &amp;amp;lt; &nbsp;x",
  "<b>bold</b> & <i>html</i>",
  "numbers 123 4,567.89 3rd 1/2 ½ ² Ⅻ ١٢٣",
  "",
  "   \t\n  ",
  " ".join(_WORDS[i % len(_WORDS)] for i in range(200)),
  "东京塔 旁边的 红色 汽车，日本語のテキスト，한국어 문장",
  "it's they're we've I'm you'll he'd IT'S 'ſ ʼs",
  "İstanbul ǅ ß ẞ ﬁ ligature ＦＵＬＬＷＩＤＴＨ ｶﾀｶﾅ",
  "mojibake: âœ” doesnâ€™t",
  "tabs\tand\r\nnewlines\u2028sep\u00a0nbsp\u200bzwsp",
  "Ελληνικά ῾ῼ ᾳ\u0345 русский עברית العربية हिन्दी ไทย",
  "x <|endoftext|> y !<|startoftext|>z <|ENDOFTEXT|>",
  "🦀" * 40,
  "a" * 300,
]


def _reference():
  """OpenAI's SimpleTokenizer from the installed clip package, by file path."""
  path = tokenizer.default_vocab_path()
  if path is None:
    pytest.skip("clip-anytorch is not installed (pip install --no-deps ...).")
  file = os.path.join(os.path.dirname(path), "simple_tokenizer.py")
  spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.SimpleTokenizer(path)


@pytest.fixture(scope="module")
def reference():
  return _reference()


def _openai_tokenize(ref, texts, length):
  """clip.tokenize(texts, length, truncate=True), torch-free."""
  out = np.zeros((len(texts), length), np.int64)
  for row, t in zip(out, texts, strict=True):
    ids = [tokenizer.SOT_ID, *ref.encode(t), tokenizer.EOT_ID]
    if len(ids) > length:
      ids = ids[:length]
      ids[-1] = tokenizer.EOT_ID
    row[: len(ids)] = ids
  return out


@pytest.mark.parametrize("length", [77, 30, 3])
def test_matches_openai(reference, length):
  got = tokenizer.tokenize(SENTENCES, length)
  assert got.dtype == np.int32 and got.shape == (len(SENTENCES), length)
  want = _openai_tokenize(reference, SENTENCES, length)
  for t, g, w in zip(SENTENCES, got, want, strict=True):
    np.testing.assert_array_equal(g, w, err_msg=repr(t))


def test_layout():
  ids = tokenizer.tokenize(["", "a photo of a cat", "word " * 100], 10)
  np.testing.assert_array_equal(
    ids[0, :3], [tokenizer.SOT_ID, tokenizer.EOT_ID, 0]
  )
  assert (
    ids[1, 0] == tokenizer.SOT_ID and (ids[1] == tokenizer.EOT_ID).sum() == 1
  )
  assert ids[1, -1] == 0  # Zero padding.
  assert ids[2, -1] == tokenizer.EOT_ID and (ids[2] != 0).all()  # Truncated.
  np.testing.assert_array_equal(
    tokenizer.tokenize("a photo of a cat", 10), ids[1:2]
  )


def test_hugging_face_vocab_dir(tmp_path, reference):
  """vocab.json + merges.txt (HF layout, with the '#version' header)."""
  encoder = reference.encoder
  merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
  (tmp_path / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")
  lines = ["#version: 0.2", *(" ".join(m) for m in merges), ""]
  (tmp_path / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
  np.testing.assert_array_equal(
    tokenizer.tokenize(SENTENCES, 77, vocab=str(tmp_path)),
    tokenizer.tokenize(SENTENCES, 77),
  )


def test_gz_path_and_bad_vocab(tmp_path):
  path = tokenizer.resolve_vocab()
  np.testing.assert_array_equal(
    tokenizer.tokenize("a red car", vocab=path), tokenizer.tokenize("a red car")
  )
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    tokenizer.tokenize("x", vocab=str(tmp_path))
  bad = tmp_path / "bad.txt.gz"
  with gzip.open(bad, "wt") as f:
    f.write("#version\na b\n")
  with pytest.raises(ValueError, match="not the CLIP BPE"):
    tokenizer.tokenize("x", vocab=str(bad))
  with pytest.raises(ValueError, match="context_length"):
    tokenizer.tokenize("x", 1)


def test_missing_vocab_message(monkeypatch):
  monkeypatch.setattr(tokenizer, "default_vocab_path", lambda: None)
  with pytest.raises(FileNotFoundError, match="clip-anytorch==2.6.0"):
    tokenizer.resolve_vocab()
  with pytest.raises(FileNotFoundError, match="input.vocab"):
    tokenizer.Tokenizer(30)


def test_tokenizer_is_picklable():
  tok = tokenizer.Tokenizer(30)
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.vocab == tok.vocab
  np.testing.assert_array_equal(
    clone(SENTENCES), tokenizer.tokenize(SENTENCES, 30)
  )
