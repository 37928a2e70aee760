"""`rollout.anchor_bias`: a logit bias on the anchor slots' keys, the dose knob of the anchor
experiment. Every attention backend adds it exactly (against a NumPy softmax with the bias
written out), a very negative bias is the masked anchor, and the anchor's attention share
follows the bias."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rollout_helpers import rcfg

import asvd
from asvd import transition as tr
from asvd.errors import UsageError
from asvd.models import attention as attn_lib
from asvd.models import dit as dit_lib


def _reference(q, k, v, bias, valid):
  """softmax(q k / sqrt(Dh) + bias) v in float64, invalid keys left out."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + np.asarray(bias)[None, None, None, :]
  s = np.where(valid[:, None, None, :], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


def _backends():
  from asvd.models.splash_attention import splash_attention  # noqa: PLC0415

  out = {n: attn_lib.get_attention(n) for n in attn_lib.available_attention() if n not in ("cudnn", "splash")}
  out["splash"] = functools.partial(splash_attention, interpret=True)  # the TPU kernel's own code
  return out


@pytest.mark.parametrize("name", sorted(_backends()))
def test_every_backend_adds_the_key_bias(name):
  fn = _backends()[name]
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  frames, t = 6, 8  # key frames of 8 tokens: 4 cached slots (the first one invalid), 2 own
  q = jax.random.normal(kq, (2, 2 * t, 2, 16))
  k = jax.random.normal(kk, (2, frames * t, 2, 16))
  v = jax.random.normal(kv, (2, frames * t, 2, 16))
  bias_f = np.asarray([9.0, 2.5, -1.5, 0.0, 0.0, 0.0], np.float32)  # per key frame
  valid_f = np.asarray([[False, True, True, True, True, True], [True, True, False, True, True, True]])
  bias = np.repeat(bias_f, t)
  qb, kb, vb = dit_lib._with_key_bias(q, k, v, jnp.asarray(bias))
  out = fn(qb, kb, vb, jnp.asarray(valid_f)[:, None, :], False)[0][..., :16]
  want = _reference(q, k, v, bias, np.repeat(valid_f, t, axis=1))
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
  # Without the bias the same call is the plain attention (the knob is what moved it).
  plain = fn(q, k, v, jnp.asarray(valid_f)[:, None, :], False)[0]
  assert np.abs(np.asarray(plain) - want).max() > 0.05


def test_a_very_negative_bias_is_the_masked_anchor_and_the_share_follows_the_bias(model, context, cfg):
  rc = rcfg(cfg, anchor="sink")
  _, (state, cache) = asvd.rollout(model, context, jax.random.key(0), num_chunks=3, config=rc)
  lay = tr.make_layout(rc, model.cfg)
  z = jax.random.normal(jax.random.key(1), (2, lay.chunk_frames, 8, 8, 16))
  t_bf = jnp.full((2, lay.chunk_frames), 500.0)
  masked = tr.flow(model, lay, cache.replace(valid=cache.valid.at[:, :1].set(False)), z, t_bf)
  far = tr.flow(model, tr.make_layout(rcfg(cfg, anchor="sink", anchor_bias=-60.0), model.cfg), cache, z, t_bf)
  plain = tr.flow(model, lay, cache, z, t_bf)
  np.testing.assert_allclose(np.asarray(far), np.asarray(masked), atol=2e-5)
  assert np.abs(np.asarray(plain) - np.asarray(masked)).max() > 1e-3  # the anchor matters here
  shares = []
  for b in (-2.0, 0.0, 2.0):
    _, _, share = asvd.rollout(model, context, jax.random.key(0), num_chunks=3, config=rcfg(cfg, anchor="sink", anchor_bias=b, probe=True))
    shares.append(float(np.asarray(share)[-1, :, :, 0].mean()))  # last chunk, the anchor slot
  assert shares[0] < shares[1] < shares[2], shares
  # The share a bias b gives follows softmax: odds multiplied by e^b (one layer's mass, every query).
  assert shares[2] > 2 * shares[1]


def test_bad_anchor_bias_is_one_line():
  cfg = asvd.load_config("configs/tiny.py")
  for value, word in ((float("nan"), "finite"), (float("inf"), "finite")):
    with pytest.raises(UsageError, match=f"rollout.anchor_bias.*{word}"):
      tr.make_layout(rcfg(cfg, anchor_bias=value), dit_lib.DiTConfig.from_config(cfg.model))
  with pytest.raises(UsageError, match="has none"):
    tr.make_layout(rcfg(cfg, anchor="none", positions="absolute", anchor_bias=1.0), dit_lib.DiTConfig.from_config(cfg.model))
