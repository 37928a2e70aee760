"""WanDiT: shapes, RoPE, cached == block-causal, scanned == looped, attention backends."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import asvd
from asvd.ckpt import dit_port
from asvd.models import attention as attn_lib
from asvd.models import dit as dit_lib
from asvd.models import rope as rope_lib


def _inputs(b=2, f=4, h=8, w=12, seed=0, text_dim=32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(k1, (b, f, h, w, 16))
  t = jax.random.uniform(k2, (b, f), minval=0, maxval=1000)
  ctx = jax.random.normal(k3, (b, 5, text_dim))
  return x, t, ctx


class ShapesTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  def test_output_shape_and_dtype(self):
    cfg = asvd.load_config("configs/tiny.py")
    model = asvd.init_dit(cfg.model, 0)
    graphdef, state = nnx.split(model)
    fn = self.variant(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
    x, t, ctx = _inputs(b=2, f=3, h=6, w=10)
    y = fn(state, x, t, ctx)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, jnp.float32)
    chex.assert_tree_all_finite(y)

  @chex.variants(with_jit=True, without_jit=True)
  def test_cached_call_returns_kv(self):
    cfg = asvd.load_config("configs/tiny.py")
    model = asvd.init_dit(cfg.model, 0)
    graphdef, state = nnx.split(model)
    fn = self.variant(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c, return_kv=True))
    x, t, ctx = _inputs(b=1, f=2, h=4, w=4)
    _, aux = fn(state, x, t, ctx)
    m = cfg.model
    chex.assert_shape([aux["k"], aux["v"]], (m.num_layers, 1, 2 * 4, m.num_heads, m.dim // m.num_heads))


def test_bf16_close_to_f32(cfg):
  x, t, ctx = _inputs()
  m32 = asvd.init_dit(cfg.model, 3)
  flat = dit_port.to_flat(m32)
  c16 = dit_lib.DiTConfig.from_config({**cfg.model.to_dict(), "dtype": "bfloat16", "param_dtype": "bfloat16"})
  m16 = dit_port.model_from_flat(c16, flat, jnp.bfloat16)
  y32, y16 = m32(x, t, ctx), m16(x, t, ctx)
  assert y16.dtype == jnp.float32
  rel = float(jnp.abs(y16 - y32).max() / jnp.abs(y32).max())
  assert rel < 0.05, rel


def test_per_frame_timesteps_act_per_frame(model):
  # Changing frame 2's timestep must change frame 2's output most; with a block-diagonal mask it
  # must change only frame 2.
  x, t, ctx = _inputs(b=1, f=3)
  mask = jnp.eye(3, dtype=bool)
  y0 = model(x, t, ctx, frame_mask=mask)
  y1 = model(x, t.at[0, 2].set(t[0, 2] + 300.0), ctx, frame_mask=mask)
  diff = jnp.abs(y1 - y0).max(axis=(0, 2, 3, 4))
  assert float(diff[2]) > 1e-3
  np.testing.assert_allclose(np.asarray(diff[:2]), 0.0, atol=1e-6)


def test_rope_is_relative():
  dh = 32
  kq, kk = jax.random.split(jax.random.key(1))
  q = jax.random.normal(kq, (1, 1, 1, dh))
  k = jax.random.normal(kk, (1, 1, 1, dh))

  def score(pq, pk):
    cq, sq = rope_lib.rope_cos_sin(jnp.array([pq]), dh)
    ck, sk = rope_lib.rope_cos_sin(jnp.array([pk]), dh)
    qr = rope_lib.apply_rope(q, cq[None], sq[None])
    kr = rope_lib.apply_rope(k, ck[None], sk[None])
    return float((qr * kr).sum())

  base = score([5, 2, 3], [2, 1, 1])
  assert score([105, 2, 3], [102, 1, 1]) == pytest.approx(base, rel=1e-4, abs=1e-4)
  assert score([5, 12, 3], [2, 11, 1]) == pytest.approx(base, rel=1e-4, abs=1e-4)
  assert score([5, 2, 9], [2, 1, 7]) == pytest.approx(base, rel=1e-4, abs=1e-4)
  assert abs(score([6, 2, 3], [2, 1, 1]) - base) > 1e-3  # and it does depend on the difference


def test_rope_split_matches_wan():
  assert rope_lib.axis_dims(128) == (44, 42, 42)
  assert rope_lib.axis_dims(16) == (8, 4, 4)


def test_cached_form_equals_block_causal_full_form(model):
  """Call form (b) chunk by chunk == call form (a) with a block-causal mask."""
  x, t, ctx = _inputs(b=2, f=6, h=4, w=6, seed=3)
  chunk = 2
  full = model(x, t, ctx, frame_mask=dit_lib.block_causal_mask(6, chunk))
  outs, ks, vs = [], [], []
  for c in range(3):
    sl = slice(c * chunk, (c + 1) * chunk)
    slots = None
    if c:
      n = c * chunk
      slots = dit_lib.KVSlots(
        k=jnp.concatenate(ks, axis=2),
        v=jnp.concatenate(vs, axis=2),
        valid=jnp.ones((2, n), bool),
        positions=jnp.arange(n),
      )
    y, aux = model(
      x[:, sl], t[:, sl], ctx, positions=jnp.arange(sl.start, sl.stop), slots=slots, return_kv=True
    )
    outs.append(y)
    ks.append(aux["k"])
    vs.append(aux["v"])
  np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), atol=2e-5, rtol=1e-4)


def test_invalid_slots_are_ignored(model):
  x, t, ctx = _inputs(b=1, f=2, h=4, w=4, seed=4)
  y_plain = model(x, t, ctx)
  junk = jax.random.normal(jax.random.key(9), (2, 1, 3 * 4, 2, 32))
  slots = dit_lib.KVSlots(k=junk, v=junk, valid=jnp.zeros((1, 3), bool), positions=jnp.arange(3))
  y_masked = model(x, t, ctx, positions=jnp.arange(3, 5), slots=slots)
  # Own positions shifted by 3 do not matter (relative RoPE) and invalid slots get no attention.
  np.testing.assert_allclose(np.asarray(y_masked), np.asarray(y_plain), atol=2e-5, rtol=1e-4)


def test_text_kv_precomputed_equals_raw_context(model):
  x, t, ctx = _inputs(b=2, f=2, h=4, w=4)
  np.testing.assert_allclose(
    np.asarray(model(x, t, model.text_kv(ctx))), np.asarray(model(x, t, ctx)), atol=1e-5
  )


def test_scanned_equals_looped(cfg):
  scanned = asvd.init_dit(cfg.model, 5)
  loop_cfg = dit_lib.DiTConfig.from_config({**cfg.model.to_dict(), "scan_layers": False})
  looped = dit_port.model_from_flat(loop_cfg, dit_port.to_flat(scanned))
  assert isinstance(looped.blocks, nnx.List)
  x, t, ctx = _inputs(b=1, f=3, h=4, w=6)
  kw = {"frame_mask": dit_lib.block_causal_mask(3, 1), "return_kv": True, "probe": True}
  ys, aux_s = scanned(x, t, ctx, **kw)
  yl, aux_l = looped(x, t, ctx, **kw)
  chex.assert_trees_all_close((ys, aux_s), (yl, aux_l), atol=1e-5, rtol=1e-5)


def _param_grads(m, x, t, ctx):
  g, p, rest = nnx.split(m, nnx.Param, ...)
  loss = lambda p: jnp.mean(nnx.merge(g, p, rest)(x, t, ctx) ** 2)  # noqa: E731
  return jax.jit(jax.grad(loss))(p)


@pytest.fixture(scope="module")
def no_remat(cfg):
  """`(model, inputs, its parameter gradients)` without remat, computed once for the policies."""
  base = asvd.init_dit(cfg.model, 6)
  inputs = _inputs(b=1, f=2, h=4, w=4)
  return base, inputs, _param_grads(base, *inputs)


@pytest.mark.parametrize("remat", ["full", "dots", "attn_out"])
def test_remat_policies_same_grads(cfg, no_remat, remat):
  base, inputs, want = no_remat
  other_cfg = dit_lib.DiTConfig.from_config({**cfg.model.to_dict(), "remat": remat})
  other = dit_port.model_from_flat(other_cfg, dit_port.to_flat(base))
  chex.assert_trees_all_close(want, _param_grads(other, *inputs), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("shape", [(6, 10), (7, 3), (32, 48)])
def test_tile_transpose_is_a_transpose(shape):
  a = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  np.testing.assert_array_equal(np.asarray(dit_lib._tile_transpose(a)), np.asarray(a).T)


def test_bf16_dense_grads_on_cpu_match_autodiff():
  """The CPU bf16 matmul's custom VJP (transposed operands) against plain autodiff of the same
  einsum, same bf16 inputs and a bf16-valued cotangent (the VJP rounds it to bf16, as a TPU's
  default-precision matmul does): equal up to f32 summation order, rounded to bf16."""
  kx, kw, kd = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (2, 3, 16, 48), jnp.bfloat16)
  w = (0.1 * jax.random.normal(kw, (48, 80))).astype(jnp.bfloat16)
  dy = jax.random.normal(kd, (2, 3, 16, 80), jnp.bfloat16).astype(jnp.float32)
  plain = lambda x, w: jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)  # noqa: E731
  jaxpr = lambda *a: str(jax.make_jaxpr(lambda x, w: dit_lib._matmul(x, w))(*a))  # noqa: E731  (a new function: no trace cache across platforms)
  with attn_lib.auto_platform("cpu"):
    assert "custom_vjp_call" in jaxpr(x, w)  # the CPU bf16 path
    assert "custom_vjp_call" not in jaxpr(x.astype(jnp.float32), w.astype(jnp.float32))
  with attn_lib.auto_platform("tpu"):
    assert "custom_vjp_call" not in jaxpr(x, w)
  y, vjp = jax.vjp(dit_lib._matmul, x, w)
  y_ref, vjp_ref = jax.vjp(plain, x, w)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  for g, g_ref in zip(jax.jit(vjp)(dy), jax.jit(vjp_ref)(dy), strict=True):
    assert g.dtype == g_ref.dtype == jnp.bfloat16
    g, g_ref = np.asarray(g, np.float32), np.asarray(g_ref, np.float32)
    np.testing.assert_allclose(g, g_ref, rtol=0, atol=np.abs(g_ref).max() / 128)  # one bf16 ulp at the top; 1% off fails



def test_dots_remat_still_saves_the_bf16_dense_outputs_on_cpu():
  """On CPU in bf16 the `Dense` matmul sits inside a custom VJP, where the `dots` policy cannot
  see its dot; the `dense_out` tag keeps it saved: `dots` holds more than `full` (they are equal
  without the tag)."""
  def temps(remat):
    c = asvd.load_config("configs/tiny.py", ["model.dtype=bfloat16", "model.param_dtype=bfloat16", f"model.remat={remat}"]).model
    g, st = nnx.split(dit_lib.abstract_dit(c))
    args = (
      jax.ShapeDtypeStruct((1, 2, 8, 8, c.in_channels), jnp.bfloat16),
      jax.ShapeDtypeStruct((1, 2), jnp.float32),
      jax.ShapeDtypeStruct((1, c.text_len, c.text_dim), jnp.bfloat16),
    )
    loss = lambda s, x, t, ctx: jnp.sum(nnx.merge(g, s)(x, t, ctx).astype(jnp.float32))  # noqa: E731
    with attn_lib.auto_platform("cpu"):
      return jax.jit(jax.grad(loss)).lower(st, *args).compile().memory_analysis().temp_size_in_bytes

  assert temps("dots") > 1.2 * temps("full")

MASKS = {
  "none": None,
  "query_dependent": jnp.array([[[1, 0, 1], [1, 1, 0]]], bool),  # 2 query frames x 3 key frames
  "key_only": jnp.array([[[0, 1, 1]], [[1, 0, 1]]], bool),  # per-sample slot validity, [B, 1, Fk]
}


@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("name", [n for n in attn_lib.available_attention() if n not in ("xla", "cudnn", "splash")])  # splash: below
def test_attention_backends_match_xla(name, mask):
  kq, kk, kv = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(kq, (2, 12, 2, 16))
  k = jax.random.normal(kk, (2, 18, 2, 16))
  v = jax.random.normal(kv, (2, 18, 2, 16))
  m = MASKS[mask]
  ref, _ = attn_lib.get_attention("xla")(q, k, v, m)
  out, _ = attn_lib.get_attention(name)(q, k, v, m)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 3e-2)])
@pytest.mark.parametrize("mask", list(MASKS))
def test_flash_attention_tiles_and_gradients_match_xla(mask, dtype, tol):
  """Small tiles so that tiles span several frames (keys) and parts of a frame (queries), with
  tiles masked for every sample (skipped) and for some; gradients through the custom VJP."""
  from asvd.models.flash_attention import flash_attention  # noqa: PLC0415

  kq, kk, kv = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(kq, (2, 2 * 24, 2, 8), dtype)  # 2 query frames of 24 tokens
  k = jax.random.normal(kk, (2, 3 * 24, 2, 8), dtype)  # 3 key frames
  v = jax.random.normal(kv, (2, 3 * 24, 2, 8), dtype)
  m = MASKS[mask]

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, m)[0].astype(jnp.float32)))

  flash = functools.partial(flash_attention, block_q=8, block_k=48)
  ref = attn_lib.get_attention("xla")
  np.testing.assert_allclose(np.asarray(flash(q, k, v, m)[0], np.float32), np.asarray(ref(q, k, v, m)[0], np.float32), atol=tol)
  one = functools.partial(flash_attention, block_q=8, block_k=10**6)  # one key tile: the plain-softmax forward
  np.testing.assert_allclose(np.asarray(one(q, k, v, m)[0], np.float32), np.asarray(ref(q, k, v, m)[0], np.float32), atol=tol)
  g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
  g = jax.jit(jax.grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref, strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * 2)


def test_flash_attention_memory_is_flat_in_the_key_length():
  """The backward's temporaries grow with the sequence, not with its square (`xla` holds the
  f32 scores): 4x the keys and queries -> ~4x the temporaries, against ~16x for `xla`."""
  def temps(name, s):
    x = jax.ShapeDtypeStruct((1, s, 4, 64), jnp.float32)
    fn = attn_lib.get_attention(name)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)[0]), argnums=(0, 1, 2)))
    return g.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes

  small, big = temps("flash", 1024), temps("flash", 4096)
  assert big / small < 6, (small, big)
  assert temps("xla", 4096) > 8 * big  # the scores [4, 4096, 4096] f32 alone are 268 MB


def test_probe_shares_sum_to_one(model):
  x, t, ctx = _inputs(b=1, f=2, h=4, w=4)
  _, aux = model(x, t, ctx, probe=True, frame_mask=jnp.ones((2, 2), bool))
  share = aux["share"]
  chex.assert_shape(share, (2, 1, 2))
  np.testing.assert_allclose(np.asarray(share.sum(-1)), 1.0, atol=1e-5)


def test_real_sizes_param_counts():
  # diffusers' WanTransformer3DModel counts for Wan2.1-T2V-1.3B and -14B.
  for spec, want in (("configs/wan_t2v_1_3b.py", 1_418_996_800), ("configs/wan_t2v_14b.py", 14_288_491_584)):
    model = dit_lib.abstract_dit(asvd.load_config(spec).model)
    assert dit_lib.count_params(model) == want, spec


def test_real_size_forward_shapes_eval_shape():
  cfg = asvd.load_config("configs/wan_t2v_1_3b.py").model
  model = dit_lib.abstract_dit(cfg)
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, 3, 60, 104, 16), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((1, 3), jnp.float32)
  c = jax.ShapeDtypeStruct((1, 512, 4096), jnp.bfloat16)
  out = jax.eval_shape(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c, return_kv=True), state, x, t, c)
  assert out[0].shape == (1, 3, 60, 104, 16)
  assert out[1]["k"].shape == (30, 1, 3 * 1560, 12, 128)


def test_clear_input_errors(model):
  x, t, ctx = _inputs(b=1, f=2, h=4, w=4)
  with pytest.raises(ValueError, match="channels"):
    model(x[..., :8], t, ctx)
  with pytest.raises(ValueError, match=r"t of shape"):
    model(x, jnp.zeros((1, 3)), ctx)
  with pytest.raises(ValueError, match="text_dim"):
    model(x, t, jnp.zeros((1, 5, 7)))
  with pytest.raises(ValueError, match="divisible"):
    model(x[:, :, :3], t, ctx)
  with pytest.raises(ValueError, match="unknown model config"):
    dit_lib.DiTConfig.from_config({"dimm": 3})
  with pytest.raises(ValueError, match="attention backend"):
    dit_lib.DiTConfig.from_config({"attention": "nope"})


@pytest.mark.parametrize("mask", ["none", "key_only"])
def test_splash_attention_matches_xla_in_interpret_mode(mask):
  """The TPU kernel's own code run by the Pallas interpreter (forward and its VJP)."""
  from asvd.models.splash_attention import splash_attention  # noqa: PLC0415

  kq, kk, kv = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(kq, (2, 48, 2, 16))
  k = jax.random.normal(kk, (2, 72, 2, 16))
  v = jax.random.normal(kv, (2, 72, 2, 16))
  m = MASKS[mask]
  splash = functools.partial(splash_attention, interpret=True)
  ref = attn_lib.get_attention("xla")
  np.testing.assert_allclose(np.asarray(splash(q, k, v, m)[0]), np.asarray(ref(q, k, v, m)[0]), atol=2e-6)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, m)[0]))

  for a, b in zip(jax.grad(loss(splash), argnums=(0, 1, 2))(q, k, v), jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=4e-6)


def test_auto_attention_compiles_splash_ahead_of_time_for_a_tpu():
  """`auto` picks splash for a TPU; the cached transition compiles for a v5e chip on this CPU
  (libtpu's topology description), with the Pallas kernel in the program."""
  from asvd import aot  # noqa: PLC0415
  from asvd import transition as tr  # noqa: PLC0415

  cfg = asvd.load_config("configs/tiny.py:bf16", ["model.dim=256"])  # Mosaic wants 128-wide heads, as Wan's
  assert cfg.model.attention == "auto"
  model = dit_lib.abstract_dit(cfg.model)
  step, args = tr.abstract_transition(model, tr.make_layout(cfg.rollout, model.cfg, None, cfg.sampler))
  dev = aot.topology_devices("v5e:1x1")[0]  # (libtpu sees no --xla_cpu_* flag: tests/conftest.py sets one)
  args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(dev)), args)
  assert attn_lib.auto_choice(jnp.bfloat16, "tpu") == "splash"
  with attn_lib.auto_platform("tpu"):
    compiled = step.lower(*args).compile()
  assert "tpu_custom_call" in compiled.as_text()
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_auto_attention_is_dense_on_cpu_only_while_the_scores_are_small():
  most = attn_lib.DENSE_SCORES_MAX_BYTES // 4  # f32 scores
  assert attn_lib.auto_choice(jnp.float32, "cpu", scores=most) == "xla"
  assert attn_lib.auto_choice(jnp.bfloat16, "cpu", scores=most + 1) == "flash"
  assert attn_lib.auto_choice(jnp.float32, "cpu") == "flash"
  assert attn_lib.auto_choice(jnp.bfloat16, "tpu", scores=1) == "splash"
  assert attn_lib.auto_choice(jnp.bfloat16, "gpu", scores=1) == "cudnn"


def _transition_temps(spec, attention):
  from asvd import transition as tr  # noqa: PLC0415

  cfg = asvd.load_config(spec, [f"model.attention={attention}"])
  model = dit_lib.abstract_dit(cfg.model)
  step, args = tr.abstract_transition(model, tr.make_layout(cfg.rollout, model.cfg, None, cfg.sampler))
  temps = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
  return temps, sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(args[0]))


def test_real_size_adaptive_transition_needs_at_most_3gb_of_temporaries():
  """The 1.3B adaptive transition as configs/wan_t2v_1_3b.py builds it (bf16, 480x832, batch 1),
  compiled for this CPU: the default attention never holds the scores (`xla`: 12 heads x 6,240 x
  12,480 f32 per layer) and no bf16 stack (weights, cache) is upcast to f32 around the layer loop."""
  temps, param_bytes = _transition_temps("configs/wan_t2v_1_3b.py", "auto")
  assert temps <= 3e9, temps / 1e9
  assert temps < 0.5 * param_bytes  # an f32 copy of the stacked weights alone would be 2x them
  assert _transition_temps("configs/small.py:bf16", "xla")[0] > 3 * _transition_temps("configs/small.py:bf16", "auto")[0]
