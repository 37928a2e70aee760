"""umT5 tokenizer (sentencepiece and tokenizer.json backends) and `encode_prompts`."""

import html
import random

import numpy as np
import pytest
import tolerances

from asvd.text import clean_prompt, encode_prompts, load_tokenizer

TORCH_REASON = "reference tokenizer / encoder needs transformers (pip install 'asvd[torch]')"

PROMPTS = [
  "A cat runs across the city at night, neon lights and rain reflections.",
  "",
  "   \n\t  ",
  "  lots   of\n\nspace\tbetween   words  ",
  "caf\u00e9 na\u00efve \u732b \u72d7 xyzzy QQ 123 &amp;amp; &lt;b&gt;",
  "word " * 700,  # over-long: must be cut to 511 tokens + EOS
]


def _corpus(n=3000, seed=0):
  rng = random.Random(seed)
  syl = "ka ri mo te su na lo pe gi vu ba ze an on ex ul".split()
  words = "the a cat dog runs over lazy quick brown fox city night neon lights rain word".split()
  words += ["caf\u00e9", "na\u00efve", "\u732b", "\u72d7", "\u5c71"]
  words += ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(400)]
  return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(n)]


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
  """A tiny unigram sentencepiece model with umT5's special ids (pad 0, eos 1, unk 2, no bos)."""
  import sentencepiece as spm

  folder = tmp_path_factory.mktemp("spm")
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(_corpus()),
    model_prefix=str(folder / "spiece"),
    vocab_size=300,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    character_coverage=1.0,
    minloglevel=2,
  )
  return folder


@pytest.fixture(scope="module")
def hf_tokenizer(spm_dir):
  """transformers' T5 tokenizer converted from the same sentencepiece model: the reference."""
  transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
  return transformers.T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)


def _wan_clean(text):
  # Wan's whitespace cleaning, restated: unescape twice, collapse whitespace, strip.
  return " ".join(html.unescape(html.unescape(text)).split())


def _reference(hf_tokenizer, prompts, max_length=512):
  enc = hf_tokenizer(
    [_wan_clean(p) for p in prompts],
    padding="max_length",
    truncation=True,
    max_length=max_length,
    add_special_tokens=True,
  )
  return np.asarray(enc["input_ids"]), np.asarray(enc["attention_mask"])


def _check_semantics(ids_bl, mask_bl, max_length=512):
  assert ids_bl.dtype == np.int32 and mask_bl.dtype == np.int32
  assert ids_bl.shape == mask_bl.shape == (len(PROMPTS), max_length)
  lengths = mask_bl.sum(1)
  for row_ids, row_mask, n in zip(ids_bl, mask_bl, lengths):
    assert (row_mask[:n] == 1).all() and (row_mask[n:] == 0).all()  # right padding
    assert row_ids[n - 1] == 1  # EOS closes every prompt
    assert (row_ids[n:] == 0).all()  # pad id 0
  # Empty and whitespace-only prompts are just EOS; the over-long one fills the whole length.
  assert lengths[1] == lengths[2] == 1
  assert lengths[-1] == max_length


def test_sentencepiece_model_matches_transformers(spm_dir, hf_tokenizer):
  tok = load_tokenizer(spm_dir / "spiece.model")
  assert tok.eos_id == 1 and tok.pad_id == 0
  ids_bl, mask_bl = tok(PROMPTS)
  _check_semantics(ids_bl, mask_bl)
  ref_ids, ref_mask = _reference(hf_tokenizer, PROMPTS)
  np.testing.assert_array_equal(ids_bl, ref_ids)
  np.testing.assert_array_equal(mask_bl, ref_mask)


def test_sentencepiece_model_without_transformers(spm_dir):
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=str(spm_dir / "spiece.model"))
  tok = load_tokenizer(spm_dir / "spiece.model", max_length=8)
  ids_bl, mask_bl = tok(["the quick brown fox", "cat " * 20, ""])
  full = sp.encode("the quick brown fox", add_eos=True)
  assert len(full) <= 8
  np.testing.assert_array_equal(ids_bl[0, : len(full)], full)
  # Truncation keeps the first max_length - 1 pieces and then EOS.
  np.testing.assert_array_equal(ids_bl[1], sp.encode("cat " * 20)[:7] + [1])
  np.testing.assert_array_equal(ids_bl[2], [1, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask_bl.sum(1), [len(full), 8, 1])


def test_tokenizer_json_matches_transformers(tmp_path, spm_dir, hf_tokenizer):
  # Saving after a padded call leaves padding/truncation presets in tokenizer.json; they must be
  # ignored.
  hf_tokenizer(["a b"], padding="max_length", max_length=7, truncation=True)
  hf_tokenizer.save_pretrained(str(tmp_path))
  tok = load_tokenizer(tmp_path / "tokenizer.json")
  ids_bl, mask_bl = tok(PROMPTS)
  _check_semantics(ids_bl, mask_bl)
  ref_ids, ref_mask = _reference(hf_tokenizer, PROMPTS)
  np.testing.assert_array_equal(ids_bl, ref_ids)
  np.testing.assert_array_equal(mask_bl, ref_mask)
  # Both backends agree on ordinary prompts.
  sp_ids, _ = load_tokenizer(spm_dir / "spiece.model")(PROMPTS)
  np.testing.assert_array_equal(ids_bl, sp_ids)


def test_tokenizer_json_built_with_tokenizers(tmp_path):
  """A tokenizer.json made with `tokenizers` alone; reference: its own post-processor/padding."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

  tk = Tokenizer(models.Unigram())
  tk.pre_tokenizer = pre_tokenizers.Metaspace()
  tk.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(
    vocab_size=200,
    special_tokens=["<pad>", "</s>", "<unk>"],
    unk_token="<unk>",
    show_progress=False,
  )
  tk.train_from_iterator(_corpus(1000, seed=1), trainer=trainer)
  assert tk.token_to_id("<pad>") == 0 and tk.token_to_id("</s>") == 1
  tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
  tk.save(str(tmp_path / "tokenizer.json"))

  prompts = ["the quick brown fox", "", "kari mote " * 300, "neon   lights"]
  ids_bl, mask_bl = load_tokenizer(tmp_path, max_length=64)(prompts)
  tk.enable_truncation(64)
  tk.enable_padding(length=64, pad_id=0, pad_token="<pad>")
  ref = tk.encode_batch([clean_prompt(p) for p in prompts])
  np.testing.assert_array_equal(ids_bl, [e.ids for e in ref])
  np.testing.assert_array_equal(mask_bl, [e.attention_mask for e in ref])
  assert ids_bl[2, -1] == 1 and mask_bl[1].sum() == 1


def test_folder_lookup_and_missing_file(tmp_path, spm_dir, hf_tokenizer):
  wan_root = tmp_path / "Wan2.1-T2V-1.3B"
  sub = wan_root / "google" / "umt5-xxl"
  sub.mkdir(parents=True)
  (sub / "spiece.model").write_bytes((spm_dir / "spiece.model").read_bytes())
  assert load_tokenizer(wan_root).source.endswith("spiece.model")
  hf_tokenizer.save_pretrained(str(sub))
  assert load_tokenizer(sub).source.endswith("tokenizer.json")  # tokenizer.json wins

  with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*spiece\.model.*google/umt5-xxl"):
    load_tokenizer(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    load_tokenizer(tmp_path / "missing.model")


def test_clean_prompt():
  assert clean_prompt("  a\n\tb   c ") == "a b c"
  assert clean_prompt("fish &amp;amp; chips") == "fish & chips"  # unescaped twice, as Wan does
  assert clean_prompt(" \n ") == ""


def test_encode_prompts_end_to_end(tmp_path, spm_dir):
  torch = pytest.importorskip("torch", reason=TORCH_REASON)
  transformers = pytest.importorskip("transformers", reason=TORCH_REASON)
  from asvd.ckpt.umt5_port import load_text_encoder

  torch.manual_seed(0)
  cfg = transformers.UMT5Config(
    vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4
  )
  hf_model = transformers.UMT5EncoderModel(cfg).eval()
  hf_model.save_pretrained(tmp_path / "enc")
  encoder = load_text_encoder(tmp_path / "enc")
  tok = load_tokenizer(spm_dir)

  prompts = ["A cat runs across the city at night.", "", "word " * 700]
  ctx_bld = np.asarray(encode_prompts(encoder, tok, prompts))
  assert ctx_bld.shape == (3, 512, 32) and ctx_bld.dtype == np.float32

  ids_bl, mask_bl = tok(prompts)
  with torch.no_grad():
    ref = hf_model(
      input_ids=torch.tensor(ids_bl, dtype=torch.long),
      attention_mask=torch.tensor(mask_bl, dtype=torch.long),
    ).last_hidden_state.numpy()
  scale = np.abs(ref).max()
  for i, n in enumerate(mask_bl.sum(1)):
    assert (ctx_bld[i, n:] == 0).all()
    assert (np.abs(ctx_bld[i, :n]).sum(-1) > 0).all()
    np.testing.assert_allclose(ctx_bld[i, :n], ref[i, :n], rtol=0, atol=tolerances.TEXT * scale)
  assert mask_bl[1].sum() == 1 and mask_bl[2].sum() == 512
  # One prompt given as a plain string.
  np.testing.assert_allclose(
    np.asarray(encode_prompts(encoder, tok, prompts[0]))[0], ctx_bld[0], rtol=1e-6, atol=1e-6
  )
