"""The absolute preset reproduces Self-Forcing's inference loop, checked against PyTorch.

The reference below is an independent re-statement of Self-Forcing's `CausalInferencePipeline`
(reference-code.md §1.2-1.3) on diffusers' `WanTransformer3DModel`: chunks of 3 latent frames;
per chunk, 4 warped steps (1000, 937.5, 833.3, 625) of "predict x0, re-noise with fresh noise";
the cache holds the clean re-run (t = 0) of every earlier chunk with absolute RoPE positions.
A KV cache filled by clean re-runs is exactly a block-causal forward over
[clean earlier chunks at t=0; the noisy chunk], so the reference runs diffusers on the whole
sequence with a block-causal attention mask (no cache code shared with asvd).
"""

import jax
import numpy as np
import pytest
import tolerances
from torch_refs import TINY_DIT, pad_text

import asvd
from asvd import streaming
from asvd import transition as tr

torch = pytest.importorskip("torch", reason="parity tests need the `torch` extra (pip install 'asvd[torch]')")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers (the `torch` extra)")
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

TINY = {**TINY_DIT, "num_layers": 2}
F, H, W = 3, 4, 6
TOKENS = (H // 2) * (W // 2)


class _BlockCausal(WanAttnProcessor):
  """Self-attention with a token mask; cross-attention untouched."""

  def __init__(self, mask):
    super().__init__()
    self.mask = mask

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
    if encoder_hidden_states is None:
      attention_mask = self.mask
    return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def _flow(tr_model, x_bfhwc, t_frames, ctx):
  """diffusers forward, block-causal over chunks of F frames; t per frame."""
  nf = x_bfhwc.shape[1]
  chunk_of = np.arange(nf) // F
  frame_mask = chunk_of[None, :] <= chunk_of[:, None]
  mask = torch.from_numpy(np.kron(frame_mask, np.ones((TOKENS, TOKENS), bool)))[None, None]
  for blk in tr_model.blocks:
    blk.attn1.set_processor(_BlockCausal(mask))
  tok = torch.from_numpy(np.repeat(t_frames, TOKENS, axis=1).astype(np.float32))
  with torch.no_grad():
    out = tr_model(
      hidden_states=torch.from_numpy(np.ascontiguousarray(x_bfhwc.transpose(0, 4, 1, 2, 3))),
      timestep=tok,
      encoder_hidden_states=torch.from_numpy(ctx),
      return_dict=False,
    )[0]
  return out.numpy().transpose(0, 2, 3, 4, 1).astype(np.float64)


def self_forcing_reference(tr_model, ctx, noises, timesteps):
  """Self-Forcing's loop: noises[c] is [steps, B, F, H, W, C] (initial + fresh re-noise)."""
  sig = np.asarray(timesteps, np.float64) / 1000.0
  clean = []
  for c, noise in enumerate(noises):
    z = noise[0].astype(np.float64)
    for i, t in enumerate(timesteps):
      seq = np.concatenate([*clean, z], axis=1) if clean else z
      t_frames = np.array([[0.0] * (c * F) + [t] * F] * z.shape[0])
      v = _flow(tr_model, seq.astype(np.float32), t_frames, ctx)[:, -F:]
      x0 = z - sig[i] * v
      if i + 1 < len(timesteps):
        z = (1.0 - sig[i + 1]) * x0 + sig[i + 1] * noise[i + 1]
    clean.append(x0)
  return np.concatenate(clean, axis=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  torch.manual_seed(1)
  ref = diffusers.WanTransformer3DModel(**TINY).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.2 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("sf_dit")
  ref.save_pretrained(folder)
  return ref, asvd.load_dit(folder)


def absolute_preset(frames, batch, seed):
  """(rollout config of the absolute Self-Forcing preset, random text context)."""
  rc = asvd.load_config("configs/tiny.py").rollout
  rc.update(anchor="none", positions="absolute", absolute_frames=frames, latent_hw=(H, W))
  return rc, np.random.default_rng(seed).standard_normal((batch, 12, 32)).astype(np.float32)


def test_absolute_preset_reproduces_self_forcing(models):
  ref, model = models
  rc, ctx = absolute_preset(frames=9, batch=2, seed=0)
  key = jax.random.key(3)
  n = 3
  latents, _ = asvd.rollout(model, ctx, key, num_chunks=n, config=rc)
  lay = tr.make_layout(rc, model.cfg)
  shape = tr.noise_shape(lay, 2, 16)
  noises = [np.asarray(streaming.chunk_noise(key, c, shape)) for c in range(n)]
  want = self_forcing_reference(ref, pad_text(ctx, model.cfg.text_len), noises, lay.timesteps)
  err = tolerances.rel_err(latents, want)
  assert err <= tolerances.DIT, err


def test_make_transition_with_own_noise_matches_reference(models):
  """`make_transition` with caller-supplied noise == the reference, chunk by chunk."""
  ref, model = models
  rc, ctx = absolute_preset(frames=6, batch=1, seed=1)
  state, cache, step = asvd.make_transition(model, ctx, config=rc)
  rng = np.random.default_rng(2)
  noises = [rng.standard_normal((4, 1, F, H, W, 16)).astype(np.float32) for _ in range(2)]
  outs = []
  for nz in noises:
    state, cache, frames = step(state, cache, nz)
    outs.append(np.asarray(frames))
  want = self_forcing_reference(ref, pad_text(ctx, model.cfg.text_len), noises, step.layout.timesteps)
  got = np.concatenate(outs, axis=1)
  assert tolerances.rel_err(got, want) <= tolerances.DIT
