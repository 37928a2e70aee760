"""The adaptive-state transition against an independent PyTorch implementation.

The reference below restates the method (docs/method.md, "One chunk") on diffusers'
`WanTransformer3DModel` with its own KV cache, written without any asvd code:

* RoPE: diffusers' own frequency tables, indexed by an explicit temporal index per frame (the
  model's `rope` module is swapped for one that takes the indices; height/width as diffusers);
* self-attention: a processor that computes q/k/v with diffusers' projections and norms, keeps
  this call's **un-rotated** K/V, rotates cached K with the slots' indices and attends to
  [valid cache slots; own tokens] (invalid slots masked); cross-attention is diffusers' own;
* the chunk: joint few-step denoise of [state; chunk] with fresh re-noise, a clean re-run at
  t = 0 whose K/V are written: the state's into the anchor slots (`adaptive`), the content's
  into the window with eviction of the oldest frames, the first frames frozen into the anchor and
  kept out of the window (`sink`), evicted frames folded oldest first into a float64 average
  (`ema`).

asvd's rollout must match it within `tolerances.DIT` for several chunks in every anchor mode and
both `state_position`s; the noise comes from asvd's noise function (it is not under test here).
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

H, W = 4, 6
TOKENS = (H // 2) * (W // 2)
CONFIGS = {
  "adaptive": dict(anchor="adaptive", state_frames=1, window_frames=3, state_position="anchor"),
  "adaptive_leading": dict(anchor="adaptive", state_frames=1, window_frames=4, state_position="leading"),
  "adaptive_fs2": dict(anchor="adaptive", state_frames=2, window_frames=2, state_position="anchor"),
  "sink": dict(anchor="sink", state_frames=1, window_frames=4, state_position="anchor"),
  "ema": dict(anchor="ema", state_frames=1, window_frames=3, state_position="anchor", ema_decay=0.8),
}
CHUNKS = 4


class _ExplicitRope(torch.nn.Module):
  """diffusers' RoPE tables, with the temporal index of every latent frame given explicitly."""

  def __init__(self, rope):
    super().__init__()
    self.rope = rope
    self.frames = None  # temporal index per frame of the current call

  def tables(self, frames, pph, ppw):
    r = self.rope
    sizes = [r.t_dim, r.h_dim, r.w_dim]
    out = []
    for table in (r.freqs_cos, r.freqs_sin):
      t, h, w = table.split(sizes, dim=1)
      idx = torch.as_tensor(frames, dtype=torch.long)
      nf = len(frames)
      parts = [
        t[idx].view(nf, 1, 1, -1).expand(nf, pph, ppw, -1),
        h[:pph].view(1, pph, 1, -1).expand(nf, pph, ppw, -1),
        w[:ppw].view(1, 1, ppw, -1).expand(nf, pph, ppw, -1),
      ]
      out.append(torch.cat(parts, dim=-1).reshape(1, nf * pph * ppw, 1, -1))
    return tuple(out)

  def forward(self, hidden_states):
    _, _, nf, hh, ww = hidden_states.shape
    _, ph, pw = self.rope.patch_size
    assert len(self.frames) == nf
    return self.tables(self.frames, hh // ph, ww // pw)


def _rotate(x, cos, sin):
  """Interleaved-pair rotation (Wan's RoPE) of x [B, S, H, D] by tables [1, S, 1, D]."""
  x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
  c, s = cos[..., 0::2], sin[..., 1::2]
  out = torch.empty_like(x)
  out[..., 0::2] = x1 * c - x2 * s
  out[..., 1::2] = x1 * s + x2 * c
  return out


class _CachedSelfAttention(WanAttnProcessor):
  """Self-attention over [valid cache slots; own tokens]; records this call's un-rotated K/V."""

  def __init__(self, layer, state):
    super().__init__()
    self.layer, self.state = layer, state

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
    if encoder_hidden_states is not None:  # cross-attention: diffusers' own
      return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
    heads = attn.heads
    q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (heads, -1))
    k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (heads, -1))
    v = attn.to_v(hidden_states).unflatten(2, (heads, -1))
    self.state.recorded[self.layer] = (k.clone(), v.clone())
    q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
    b, s = q.shape[:2]
    mask = torch.ones(b, s, dtype=torch.bool)
    slots = self.state.slots
    if slots is not None:
      ck, cv = slots["k"][self.layer], slots["v"][self.layer]
      ck = _rotate(ck, *slots["rope"])
      k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
      mask = torch.cat([slots["valid"].repeat_interleave(TOKENS, dim=1), mask], dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(
      q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
    )
    if self.state.probe:  # share of softmax mass per key frame, mean over heads and queries
      logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
      p = torch.softmax(logits.masked_fill(~mask[:, None, None, :], -torch.inf), dim=-1)
      self.state.shares[self.layer] = p.unflatten(-1, (-1, TOKENS)).sum(-1).mean(dim=(1, 2))
    out = out.transpose(1, 2).flatten(2).type_as(q)
    return attn.to_out[1](attn.to_out[0](out))


class Reference:
  """A KV-cached streaming generator on diffusers' Wan DiT (see the module docstring)."""

  def __init__(self, model, ctx, timesteps, sigmas, fs, wp, f, anchor, state_position, ema_decay):
    self.model, self.ctx = model, torch.from_numpy(ctx)
    self.ts, self.sig = list(timesteps), list(sigmas)
    self.fs, self.wp, self.f, self.anchor, self.decay = fs, wp, f, anchor, ema_decay
    self.rope = _ExplicitRope(model.rope)
    model.rope = self.rope
    self.recorded, self.slots = {}, None
    self.probe, self.shares, self.last_shares = False, {}, []
    self.layers = len(model.blocks)
    for i, blk in enumerate(model.blocks):
      blk.attn1.set_processor(_CachedSelfAttention(i, self))
      blk.attn2.set_processor(WanAttnProcessor())
    n = fs + wp
    self.slot_pos = list(range(n))
    if anchor != "adaptive":
      self.z_pos = list(range(n, n + f))
    elif state_position == "anchor":
      self.z_pos = list(range(fs)) + list(range(n, n + f))
    else:
      self.z_pos = list(range(n, n + fs + f))
    b = ctx.shape[0]
    heads, dh = model.config.num_attention_heads, model.config.attention_head_dim
    zeros = torch.zeros(b, n * TOKENS, heads, dh, dtype=torch.float64)
    self.k = [zeros.clone() for _ in range(self.layers)]  # un-rotated, float64 storage
    self.v = [zeros.clone() for _ in range(self.layers)]
    self.valid = torch.zeros(b, n, dtype=torch.bool)
    self.acc = None  # ema: float64 running averages, per layer (k, v)

  def flow(self, z, t):
    """Flow prediction for z [B, Fz, H, W, C] at timestep t (all frames) against the cache."""
    self.rope.frames = self.z_pos
    self.slots = {
      "k": [k.float() for k in self.k],
      "v": [v.float() for v in self.v],
      "valid": self.valid,
      "rope": self.rope.tables(self.slot_pos, H // 2, W // 2),
    }
    b, fz = z.shape[:2]
    tok = torch.full((b, fz * TOKENS), float(t))
    with torch.no_grad():
      out = self.model(
        hidden_states=torch.from_numpy(np.ascontiguousarray(z.transpose(0, 4, 1, 2, 3), np.float32)),
        timestep=tok,
        encoder_hidden_states=self.ctx,
        return_dict=False,
      )[0]
    return out.numpy().transpose(0, 2, 3, 4, 1).astype(np.float64)

  def chunk(self, noise):
    f = self.f
    z = noise[0].astype(np.float64)
    for i, t in enumerate(self.ts):
      self.probe = i == len(self.ts) - 1  # asvd's probe measures the last denoising step
      x0 = z - self.sig[i] * self.flow(z, t)
      self.probe = False
      if i + 1 < len(self.ts):
        z = (1.0 - self.sig[i + 1]) * x0 + self.sig[i + 1] * noise[i + 1]
    self.last_shares.append(np.stack([self.shares[i].numpy() for i in range(self.layers)]))  # [L, B, N+Fz]
    self.flow(x0, 0.0)  # the clean re-run: its K/V are recorded
    self.write(x0)
    return x0[:, -f:]

  def write(self, x0):
    fs, f, t = self.fs, self.f, TOKENS
    b = x0.shape[0]
    anchor_valid = self.valid[:, :fs].clone()
    new_valid = torch.ones(b, f, dtype=torch.bool)
    if self.anchor == "sink":  # frames that fill the sink now stay out of the window
      new_valid[:, :fs] = anchor_valid[:, :1]
    win_valid = torch.cat([self.valid[:, fs:], new_valid], dim=1)
    evicted_valid = win_valid[:, :f]
    for layer in range(self.layers):
      rk, rv = (r.double() for r in self.recorded[layer])  # [B, Fz*T, H, D]
      win_k = torch.cat([self.k[layer][:, fs * t :], rk[:, -f * t :]], dim=1)
      win_v = torch.cat([self.v[layer][:, fs * t :], rv[:, -f * t :]], dim=1)
      ev_k, ev_v = win_k[:, : f * t], win_v[:, : f * t]
      anc_k, anc_v = self.k[layer][:, : fs * t], self.v[layer][:, : fs * t]
      if self.anchor == "adaptive":
        anc_k, anc_v = rk[:, : fs * t], rv[:, : fs * t]
      elif self.anchor == "sink":
        for bi in range(b):
          if not bool(anchor_valid[bi, 0]):
            anc_k[bi], anc_v[bi] = rk[bi, -f * t : (fs - f) * t or None], rv[bi, -f * t : (fs - f) * t or None]
      elif self.anchor == "ema":
        if self.acc is None:
          self.acc = [[None] * b for _ in range(self.layers)]
        for bi in range(b):
          for j in range(f):
            if bool(evicted_valid[bi, j]):
              e = (ev_k[bi, j * t : (j + 1) * t], ev_v[bi, j * t : (j + 1) * t])
              a = self.acc[layer][bi]
              self.acc[layer][bi] = e if a is None else tuple(self.decay * x + (1 - self.decay) * y for x, y in zip(a, e, strict=True))
          if self.acc[layer][bi] is not None:
            anc_k[bi], anc_v[bi] = self.acc[layer][bi]
      self.k[layer] = torch.cat([anc_k, win_k[:, f * t :]], dim=1)
      self.v[layer] = torch.cat([anc_v, win_v[:, f * t :]], dim=1)
    if self.anchor in ("adaptive", "sink"):
      anchor_valid[:] = True
    elif self.anchor == "ema":
      anchor_valid = anchor_valid | evicted_valid.any(dim=1, keepdim=True)
    self.valid = torch.cat([anchor_valid, win_valid[:, f:]], dim=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  torch.manual_seed(3)
  ref = diffusers.WanTransformer3DModel(**{**TINY_DIT, "num_layers": 2}).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.2 * torch.randn_like(p))
  path = tmp_path_factory.mktemp("adaptive_ref")
  ref.save_pretrained(path)
  return path


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rollout_matches_independent_reference(folder, name):
  model = asvd.load_dit(folder)
  rc = asvd.load_config("configs/tiny.py").rollout
  rc.update(latent_hw=(H, W), **CONFIGS[name])
  ctx = np.random.default_rng(0).standard_normal((2, 12, 32)).astype(np.float32)
  key = jax.random.key(7)
  latents, _ = asvd.rollout(model, ctx, key, num_chunks=CHUNKS, config=rc)
  lay = tr.make_layout(rc, model.cfg)
  shape = tr.noise_shape(lay, 2, 16)
  ref = Reference(
    diffusers.WanTransformer3DModel.from_pretrained(folder).eval(),
    pad_text(ctx, model.cfg.text_len),
    lay.timesteps,
    lay.sigmas,
    lay.state_frames,
    lay.window_frames,
    lay.chunk_frames,
    lay.anchor,
    lay.state_position,
    lay.ema_decay,
  )
  want = np.concatenate([ref.chunk(np.asarray(streaming.chunk_noise(key, c, shape))) for c in range(CHUNKS)], axis=1)
  err = tolerances.rel_err(latents, want)
  assert err <= tolerances.DIT, f"{name}: {err:.3g}"
  # The cache holds the reference's too: slot validity and the anchor/window K/V (un-rotated).
  _, (_, cache) = asvd.rollout(model, ctx, key, num_chunks=CHUNKS, config=rc)
  np.testing.assert_array_equal(np.asarray(cache.valid), ref.valid.numpy())
  for layer in range(ref.layers):
    for got, exp in ((cache.k[layer], ref.k[layer]), (cache.v[layer], ref.v[layer])):
      exp = exp.numpy().reshape(np.asarray(got).shape)
      live = np.repeat(ref.valid.numpy(), TOKENS, axis=1)  # invalid slots hold anything
      assert tolerances.rel_err(np.asarray(got)[live], exp[live]) <= tolerances.DIT, (name, layer)
  # The attention probe: the share of attention mass on every slot and own frame, per layer.
  rc.probe = True
  *_, share = asvd.rollout(model, ctx, key, num_chunks=CHUNKS, config=rc)
  np.testing.assert_allclose(np.asarray(share), np.stack(ref.last_shares), atol=1e-5)
