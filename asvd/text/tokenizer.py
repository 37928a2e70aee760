"""umT5 tokenizer from local files, and prompt -> text-embedding encoding for the DiT.

Semantics follow Wan2.1's `HuggingfaceTokenizer(name='google/umt5-xxl', seq_len=512,
clean='whitespace')` called with `add_special_tokens=True`, i.e. transformers' T5 tokenizer with
`padding='max_length', truncation=True, max_length=512`:

  * the prompt is cleaned: `ftfy.fix_text` (only if the optional `ftfy` package is installed),
    HTML entities unescaped twice, every run of whitespace collapsed to one space, ends stripped;
  * it is tokenized without special tokens, cut to `max_length - 1` tokens, and EOS `</s>` (id 1)
    is appended, so an over-long prompt gives exactly `max_length` tokens ending in EOS;
  * an empty prompt (or one that cleans to empty) gives just `[EOS]`: true length 1;
  * the rest is filled with the pad id (0) and the mask is 1 on the true tokens, 0 on padding.

Backends (no transformers needed): a `tokenizers` `tokenizer.json` (what transformers' fast T5
tokenizer runs, and what Wan's `AutoTokenizer` loads) or a sentencepiece `.model`. The two agree
on ordinary text; they differ only where the fast tokenizer treats special-token strings typed
inside a prompt (e.g. a literal "</s>") as special tokens, which the raw sentencepiece model does
not. A folder holding both uses `tokenizer.json`.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["UMT5Tokenizer", "clean_prompt", "encode_prompts", "load_tokenizer"]

# Where Wan2.1 checkpoint folders keep the tokenizer (`Wan2.1-T2V-1.3B/google/umt5-xxl/`).
WAN_TOKENIZER_SUBDIR = os.path.join("google", "umt5-xxl")
_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
  """Wan's `clean='whitespace'`: fix text, unescape HTML twice, collapse whitespace, strip.

  `ftfy.fix_text` (mojibake repair, curly -> straight quotes, ...) runs only when `ftfy` is
  installed; without it, prompts that contain such characters can tokenize differently from Wan.

  Args:
    text: the raw prompt.

  Returns:
    The cleaned prompt.
  """
  try:
    import ftfy
  except ImportError:
    pass
  else:
    text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip()


class _SentencePieceBackend:
  """Raw sentencepiece model: ids without BOS/EOS."""

  def __init__(self, path: str):
    import sentencepiece as spm

    try:
      self._sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path}: not a sentencepiece model ({e})") from e
    self.eos_id = int(self._sp.eos_id())
    self.pad_id = int(self._sp.pad_id())
    self.vocab_size = int(self._sp.get_piece_size())

  def encode(self, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in self._sp.encode(texts)]


class _TokenizersBackend:
  """A `tokenizers` JSON: ids without the post-processor's special tokens."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer

    try:
      tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001  (tokenizers raises plain Exception on bad JSON)
      raise ValueError(f"{path}: not a tokenizers JSON file ({e})") from e
    # A saved tokenizer.json may carry padding/truncation presets from its last use; we pad and
    # truncate ourselves.
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok
    eos, pad = tok.token_to_id("</s>"), tok.token_to_id("<pad>")
    if eos is None or pad is None:
      raise ValueError(f"{path}: no '</s>' or '<pad>' token; not a T5/umT5 tokenizer")
    self.eos_id, self.pad_id = int(eos), int(pad)
    self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

  def encode(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]


class UMT5Tokenizer:
  """Prompts -> `(ids [B, max_length] int32, mask [B, max_length] int32)`; see the module doc."""

  def __init__(
    self, backend: Any, *, max_length: int = 512, clean: str | None = "whitespace", source: str = ""
  ):
    """Wraps a backend; use `load_tokenizer` instead of calling this.

    Args:
      backend: object with `encode(list[str]) -> list[list[int]]`, `eos_id`, `pad_id`.
      max_length: padded length, EOS included (Wan: 512).
      clean: "whitespace" (Wan's setting) or None for no cleaning.
      source: file the vocabulary came from, for messages.
    """
    if max_length < 1:
      raise ValueError(f"max_length must be >= 1, got {max_length}")
    if clean not in (None, "whitespace"):
      raise ValueError(f"clean must be 'whitespace' or None, got {clean!r}")
    if backend.eos_id < 0 or backend.pad_id < 0:
      raise ValueError(f"{source}: the vocabulary defines no EOS or no pad token")
    self._backend = backend
    self.max_length = max_length
    self.clean = clean
    self.source = source
    self.eos_id = backend.eos_id
    self.pad_id = backend.pad_id
    self.vocab_size = backend.vocab_size

  def token_ids(self, prompts: str | Sequence[str]) -> list[list[int]]:
    """Unpadded ids per prompt: cleaned, truncated to `max_length - 1`, EOS appended."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if self.clean == "whitespace":
      prompts = [clean_prompt(p) for p in prompts]
    return [ids[: self.max_length - 1] + [self.eos_id] for ids in self._backend.encode(prompts)]

  def __call__(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizes, truncates and pads a batch.

    Args:
      prompts: one prompt or a sequence of them.

    Returns:
      `(ids_bl, mask_bl)`, both int32 `[B, max_length]`; `mask_bl` is 1 on the true tokens (the
      last of which is EOS) and 0 on padding.
    """
    rows = self.token_ids(prompts)
    ids_bl = np.full((len(rows), self.max_length), self.pad_id, dtype=np.int32)
    mask_bl = np.zeros((len(rows), self.max_length), dtype=np.int32)
    for i, ids in enumerate(rows):
      ids_bl[i, : len(ids)] = ids
      mask_bl[i, : len(ids)] = 1
    return ids_bl, mask_bl

  def __repr__(self) -> str:
    return (
      f"UMT5Tokenizer(source={self.source!r}, max_length={self.max_length}, "
      f"vocab_size={self.vocab_size}, clean={self.clean!r})"
    )


def _find_tokenizer_file(path: str) -> str:
  if os.path.isfile(path):
    return path
  if os.path.isdir(path):
    for folder in (path, os.path.join(path, WAN_TOKENIZER_SUBDIR), os.path.join(path, "tokenizer")):
      for name in ("tokenizer.json", "spiece.model"):
        if os.path.isfile(os.path.join(folder, name)):
          return os.path.join(folder, name)
      if os.path.isdir(folder):
        models = sorted(f for f in os.listdir(folder) if f.endswith(".model"))
        if len(models) == 1:
          return os.path.join(folder, models[0])
  raise FileNotFoundError(
    f"no umT5 tokenizer at {path!r}: put the 'tokenizer.json' (or sentencepiece 'spiece.model') "
    f"of google/umt5-xxl there, e.g. copy the folder {WAN_TOKENIZER_SUBDIR}/ from a Wan2.1 "
    "checkpoint (Wan2.1-T2V-1.3B/google/umt5-xxl/) and pass that folder or the Wan checkpoint folder"
  )


def load_tokenizer(
  path: str | os.PathLike, *, max_length: int = 512, clean: str | None = "whitespace"
) -> UMT5Tokenizer:
  """Loads the umT5 tokenizer from local files (never the network).

  Args:
    path: a `tokenizer.json`, a sentencepiece `.model`, a folder holding either (tokenizer.json
      wins), or a Wan2.1 checkpoint folder (its `google/umt5-xxl/` is used).
    max_length: padded length including EOS; Wan uses 512.
    clean: "whitespace" (Wan) or None.

  Returns:
    The tokenizer; call it on prompts to get `(ids, mask)`.

  Raises:
    FileNotFoundError: no tokenizer file found; the message says which file to put where.
    ValueError: the file is not a usable T5 tokenizer.
  """
  file = _find_tokenizer_file(os.fspath(path))
  backend = _TokenizersBackend(file) if file.endswith(".json") else _SentencePieceBackend(file)
  return UMT5Tokenizer(backend, max_length=max_length, clean=clean, source=file)


def encode_prompts(encoder: Any, tokenizer: UMT5Tokenizer, prompts: str | Sequence[str]) -> Any:
  """Prompts -> the DiT's text context, exactly as Wan / Self-Forcing build it.

  Each prompt is tokenized (see the module docstring: over-long prompts are truncated to
  `max_length` tokens including the final EOS; an empty prompt is just EOS, length 1), encoded
  with the key-padding mask, and every row at or past the prompt's true length is set to exactly
  zero (Wan cuts the encoder output to the true length and zero-pads back to 512; the DiT's
  cross-attention then attends to those zero rows without a mask).

  Args:
    encoder: a `UMT5Encoder` (called as `encoder(ids, mask)`).
    tokenizer: from `load_tokenizer`.
    prompts: one prompt or a sequence.

  Returns:
    float32 `jax.Array` `[B, max_length, dim]`.
  """
  ids_bl, mask_bl = tokenizer(prompts)
  out_bld = encoder(jnp.asarray(ids_bl), jnp.asarray(mask_bl))
  return jnp.where(jnp.asarray(mask_bl)[..., None] != 0, out_bld.astype(jnp.float32), 0.0)
