"""Sharding on the 8 fake CPU devices: meshes from config, parameters placed by their logical
names, sharded rollouts equal to single-device ones, no device-to-device copies per call, and a
budget on the collectives of the compiled transition."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from rollout_helpers import rcfg

import asvd
from asvd import sharding as shard_lib
from asvd import transition as tr
from asvd.errors import UsageError


def test_mesh_from_config():
  m = shard_lib.mesh_from_config({"data": -1, "tensor": 2})
  assert dict(m.shape) == {"data": 4, "fsdp": 1, "context": 1, "tensor": 2}
  assert shard_lib.mesh_from_config({"fsdp": 8}).shape["fsdp"] == 8
  with pytest.raises(UsageError, match="unknown axis"):
    shard_lib.mesh_from_config({"model": 2})
  with pytest.raises(UsageError, match="do not divide by 3"):
    shard_lib.mesh_from_config({"data": -1, "fsdp": 3})
  with pytest.raises(UsageError, match="needs 16 devices, 8 available"):
    shard_lib.mesh_from_config({"data": 2, "fsdp": 8})
  with pytest.raises(UsageError, match="at most one -1"):
    shard_lib.mesh_from_config({"data": -1, "fsdp": -1})
  rules = shard_lib.rules_from_config({"rules": {"act_tokens": None, "mlp": ["fsdp", "tensor"]}})
  assert rules["act_tokens"] is None and rules["mlp"] == ("fsdp", "tensor") and rules["heads"] == "tensor"


def test_rules_from_command_line_overrides():
  """`--config.mesh.rules.NAME=AXIS` adds to the empty rule table; names and axes are checked
  with one line each, on one device too (`from_config`)."""
  over = ["--config.mesh.rules.tokens=context", "--config.mesh.rules.batch=('data',)", "--config.mesh.rules.embed=None", "--config.mesh.context=2"]
  mesh, rules = shard_lib.from_config(asvd.load_config("configs/tiny.py", over))
  assert (rules["tokens"], rules["batch"], rules["embed"], rules["heads"]) == ("context", ("data",), None, "tensor")
  assert mesh.shape["context"] == 2
  for bad, needle in [("token=context", "mesh.rules.token: no such logical axis"), ("tokens=ctx", "mesh.rules.tokens='ctx': give None"), ("batch=['data','data']", "distinct")]:
    with pytest.raises(UsageError, match=re.escape(needle)):
      shard_lib.from_config(asvd.load_config("configs/tiny.py", [f"--config.mesh.rules.{bad}"]))
  with pytest.raises(UsageError, match="no section 'rules2'"):
    asvd.load_config("configs/tiny.py", ["--config.mesh.rules2.tokens=context"])
  with pytest.raises(UsageError, match="unknown key 'tokens'"):  # only mesh.rules takes new keys
    asvd.load_config("configs/tiny.py", ["--config.mesh.tokens=context"])


def test_spec_for_drops_axes_that_do_not_divide():
  mesh = shard_lib.mesh_from_config({"data": 2, "fsdp": 4})
  assert shard_lib.spec_for(("batch", "embed"), mesh, shape=(8, 64)) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  # batch 2: only data divides it; embed then takes the free fsdp axis
  assert shard_lib.spec_for(("batch", "embed"), mesh, shape=(2, 64)) == jax.sharding.PartitionSpec("data", "fsdp")
  assert shard_lib.spec_for(("batch",), mesh, shape=(1,)) == jax.sharding.PartitionSpec(None)


def test_params_placed_by_logical_names(model):
  mesh = shard_lib.mesh_from_config({"fsdp": 4, "tensor": 2})
  sh = shard_lib.param_shardings(nnx.state(model), mesh)
  flat = dict((jax.tree_util.keystr(p), s.spec) for p, s in jax.tree_util.tree_flatten_with_path(sh)[0])
  P = jax.sharding.PartitionSpec
  assert flat["['blocks']['self_attn']['q']['kernel']"] == P(None, "fsdp", "tensor")  # layers, embed, heads
  assert flat["['blocks']['ffn_out']['kernel']"] == P(None, "tensor", "fsdp")  # layers, mlp, embed
  assert flat["['patch_embedding']['kernel']"] == P(None, "fsdp")

  # Created directly on the shards, with the values of a single-device init.
  cfg = asvd.load_config("configs/tiny.py")
  made = shard_lib.init_sharded(lambda: asvd.init_dit(cfg.model, jax.random.key(0)), mesh)
  shard_lib.check_sharded(made, mesh)
  # Jitted init math rounds differently from eager in the last bit (1.2e-7 relative measured).
  chex.assert_trees_all_close(nnx.to_pure_dict(nnx.state(made)), nnx.to_pure_dict(nnx.state(model)), rtol=1e-6, atol=1e-8)
  q = nnx.state(made)["blocks"]["self_attn"]["q"]["kernel"][...]
  assert q.addressable_shards[0].data.shape == (2, 64 // 4, 64 // 2)


def test_check_sharded_names_the_parameter(model):
  mesh = shard_lib.mesh_from_config({"fsdp": 8})
  state = jax.device_put(nnx.state(model), shard_lib.param_shardings(nnx.state(model), mesh))
  shard_lib.check_sharded(state, mesh)  # placed right: passes
  # One weight replicated by hand: named.
  k = state["blocks"]["ffn_in"]["kernel"]
  k.set_value(jax.device_put(k[...], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
  with pytest.raises(UsageError, match=r"not placed by their logical names .*\['blocks'\]\['ffn_in'\]\['kernel'\]"):
    shard_lib.check_sharded(state, mesh)
  # A large weight whose names map to nothing (here: a rule table without fsdp) is replicated.
  rules = dict(shard_lib.DEFAULT_RULES, embed=None)
  placed = jax.device_put(nnx.state(model), shard_lib.param_shardings(nnx.state(model), mesh, rules))
  with pytest.raises(UsageError, match="large parameter.*replicated on every device"):
    shard_lib.check_sharded(placed, mesh, rules, min_size=1024)


MESHES = {  # (stream below runs on data x tensor, the train step on data x fsdp x tensor)
  "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
  "context2_tensor2_fsdp2": {"context": 2, "tensor": 2, "fsdp": 2},
}


@pytest.mark.parametrize("name,kv_over_context", [*((n, False) for n in MESHES), ("context2_tensor2_fsdp2", True)])
def test_sharded_rollout_equals_single_device(name, kv_over_context, cfg, context):
  """The last case also splits the cached K/V's tokens over context (`mesh.rules.tokens`): each
  shard keeps its part of the cache, and attention gathers the rest per layer."""
  model = asvd.init_dit(cfg.model, jax.random.key(0))
  rc = rcfg(cfg, scan_chunks=2)
  single, carry0 = asvd.rollout(model, context, 5, num_chunks=3, config=rc)
  mesh = shard_lib.mesh_from_config(MESHES[name])
  rules = dict(shard_lib.DEFAULT_RULES, tokens="context") if kv_over_context else None
  shard_lib.shard_model(model, mesh, rules)
  # Parameters already on their shards and the prompt from the host: a rollout moves nothing
  # between devices.
  with jax.transfer_guard_device_to_device("disallow_explicit"):
    sharded, carry = asvd.rollout(model, np.asarray(context), 5, num_chunks=3, config=rc, mesh=mesh, rules=rules)
  chex.assert_trees_all_close(sharded, single, atol=2e-5, rtol=2e-5)
  chex.assert_trees_all_close(carry, carry0, atol=2e-5, rtol=2e-5)
  if MESHES[name].get("tensor", 1) > 1:
    assert carry[1].k.sharding.spec[3] == "tensor"  # cached K/V: heads over tensor
  assert carry[1].k.sharding.spec[2] == ("context" if kv_over_context else None)  # tokens
  if kv_over_context:  # each of the 8 devices holds an eighth of the K/V (batch, tokens and heads split)
    assert carry[1].k.addressable_shards[0].data.size * 8 == carry[1].k.size


def test_transition_pins_the_cache_layout_inside_any_program(cfg, context):
  """A transition traced inside another program (a training step's rollout) hands on its new
  cache in the carry's logical layout, not whatever GSPMD infers: with `tokens` over context the
  cache a step computes from a replicated one comes out split (each shard keeps its part, which
  is what halves the DMD generator step's memory at real size)."""
  model = asvd.init_dit(cfg.model, jax.random.key(0))
  state, cache, step = asvd.make_transition(model, context, config=rcfg(cfg))
  mesh = shard_lib.mesh_from_config({"context": 2, "fsdp": 2, "tensor": 2})
  rules = dict(shard_lib.DEFAULT_RULES, tokens="context")
  g, params = nnx.split(model)
  noise = jax.random.normal(jax.random.key(2), tr.noise_shape(step.layout, 2, 16))

  def inner(params, state, cache, noise):  # no in/out shardings: only what the trace pins
    with shard_lib.activation_sharding(mesh, rules):
      return tr.transition_fn(nnx.merge(g, params), step.layout, state, cache, noise)

  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  args = jax.device_put((params, state, cache, noise), rep)
  _, new_cache, frames = jax.jit(inner)(*args)
  assert new_cache.k.sharding.spec[2] == "context", new_cache.k.sharding
  chex.assert_trees_all_close(frames, step(state, cache, noise)[2], atol=2e-5, rtol=2e-5)


def _collectives(hlo: str) -> dict:
  ops = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
  return {op: len(re.findall(rf"= [^=]*? {op}(?:-start)?\(", hlo)) for op in ops}


def test_transition_collective_budget(cfg, context):
  """On a data x fsdp x tensor mesh the compiled transition gathers weights and reduces partial
  sums, but never reshards activations (no collective-permute, no all-to-all)."""
  model = asvd.init_dit(cfg.model, jax.random.key(0))
  mesh = shard_lib.mesh_from_config({"data": 2, "fsdp": 2, "tensor": 2})
  shard_lib.shard_model(model, mesh)
  state, cache, step = asvd.make_transition(model, np.asarray(context), config=rcfg(cfg), mesh=mesh)
  noise = np.asarray(jax.random.normal(jax.random.key(2), tr.noise_shape(step.layout, 2, 16)))  # from the host
  hlo = step.raw.lower(step.params, state, cache, noise).compile().as_text()
  n = _collectives(hlo)
  assert n["collective-permute"] == 0 and n["all-to-all"] == 0, n
  assert n["all-gather"] > 0, n  # fsdp weights are gathered (a sign the mesh was used at all)
  # Budget: per scanned layer body ~15 weight gathers and a few partial-sum reductions, plus the
  # embeddings and head outside the loop; resharding would add dozens.
  assert n["all-gather"] + n["all-reduce"] + n["reduce-scatter"] <= 80, n
  with jax.transfer_guard_device_to_device("disallow_explicit"):
    out = step(state, cache, noise)
  s0, c0, single = asvd.make_transition(asvd.init_dit(cfg.model, jax.random.key(0)), context, config=rcfg(cfg))
  chex.assert_trees_all_close(out, single(s0, c0, jnp.asarray(noise)), atol=2e-5, rtol=2e-5)


def test_stream_with_mesh_equals_rollout(cfg, context):
  model = asvd.init_dit(cfg.model, jax.random.key(0))
  rc = rcfg(cfg)
  mesh = shard_lib.mesh_from_config({"data": 2, "tensor": 2})
  # Without shard_model a rollout still runs: its parameters are copied to their shards (the
  # guard sees that copy, which the sharded-model tests never make).
  with jax.transfer_guard_device_to_device("disallow_explicit"), pytest.raises(Exception, match="[Dd]isallowed"):
    asvd.rollout(model, np.asarray(context), 7, num_chunks=1, config=rc, mesh=mesh)
  shard_lib.shard_model(model, mesh)
  lat, _ = asvd.rollout(model, context, 7, num_chunks=2, config=rc, mesh=mesh)
  s = asvd.stream(model, context, 7, config=rc, num_chunks=2, mesh=mesh)
  got = jnp.concatenate(list(s), axis=1)
  np.testing.assert_allclose(np.asarray(got), np.asarray(lat), atol=1e-6)
  # A carry from a single-device run resumes on the mesh (moved to the program's shardings).
  one, carry = asvd.rollout(asvd.init_dit(cfg.model, jax.random.key(0)), context, 7, num_chunks=1, config=rc)
  rest, _ = asvd.rollout(model, context, 7, num_chunks=1, config=rc, mesh=mesh, carry=carry, start_chunk=1)
  np.testing.assert_allclose(np.concatenate([np.asarray(one), np.asarray(rest)], axis=1), np.asarray(lat), atol=2e-5)
  # A prompt switch on the mesh (its text K/V placed like the cache's) equals one device's.
  other = np.asarray(jax.random.normal(jax.random.key(9), context.shape))
  want, _ = asvd.rollout(asvd.init_dit(cfg.model, jax.random.key(0)), context, 7, num_chunks=2, config=rc, prompts=[(1, other)])
  got, _ = asvd.rollout(model, context, 7, num_chunks=2, config=rc, prompts=[(1, other)], mesh=mesh)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  assert np.abs(np.asarray(got) - np.asarray(lat)).max() > 1e-3  # the switch changed chunk 1


# ------------------------------------------------------------------------------------------------
# Train steps.
# ------------------------------------------------------------------------------------------------


def _train_setup(cfg):
  from asvd.data.synthetic import caption_embedding, config_for, make_clip  # noqa: PLC0415
  from asvd.train import steps as st  # noqa: PLC0415

  rng = np.random.default_rng(0)
  c = config_for(9, 8, 8, 16, 16, 32, 2, 0)
  batch = {
    "latents": np.stack([make_clip(rng, c, i) for i in (0, 5, 1, 6)]),
    "text": np.stack([caption_embedding(i, 16, 32) for i in (0, 5, 1, 6)]),
  }
  g, params = nnx.split(asvd.init_dit(cfg.model, 0))
  _, teacher = nnx.split(asvd.init_dit(cfg.model, 7))
  _, critic = nnx.split(asvd.init_dit(cfg.model, 8))
  tx = st.optimizer(1e-3, cfg.train.optimizer)
  state = st.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), key=jax.random.PRNGKey(0))
  state = state.replace(critic=critic, critic_opt=tx.init(critic), ema=jax.tree.map(jnp.copy, params))
  return g, tx, state, st.Frozen(teacher=teacher), batch


@pytest.mark.parametrize("kv_over_context", [False, True])
def test_sharded_train_step_equals_single_device(cfg, kv_over_context):
  """The causal-init step (teacher forcing: context written to the cache with the adaptive
  state, a chunk denoised against it, Adam) on a data x fsdp x tensor mesh (or fsdp x context x
  tensor with the cached K/V's tokens over context, `mesh.rules.tokens="context"`): the same loss
  and updated state as on one device, and the new state stays on its shards. Every stage's step is
  jitted by this `_jit_step` (the DMD step is compiled sharded for a TPU in tests/test_aot.py;
  compiling it twice for 8 CPU devices here took over 2 minutes)."""
  from asvd.train import steps as st  # noqa: PLC0415
  from asvd.train import trainer  # noqa: PLC0415

  cfg = cfg.copy_and_resolve_references()
  cfg.train.causal_init.method = "teacher_forcing"
  lay = trainer.layout(cfg)
  g, tx, state, frozen, batch = _train_setup(cfg)
  gen = st.causal_init_step(g, tx, cfg, lay)
  host = jax.tree.map(np.asarray, state)  # each run below gets its own (donated) buffers
  single = trainer._jit_step(gen, None, None, state, frozen)
  want_state, want = single(jax.tree.map(jnp.asarray, host), jax.tree.map(jnp.asarray, batch), frozen)

  mesh = shard_lib.mesh_from_config({"context" if kv_over_context else "data": 2, "fsdp": 2, "tensor": 2})
  rules = dict(shard_lib.DEFAULT_RULES, tokens="context") if kv_over_context else shard_lib.DEFAULT_RULES
  s = jax.device_put(host, shard_lib.tree_shardings(state, mesh, rules))
  f = jax.device_put(frozen, shard_lib.tree_shardings(frozen, mesh, rules))
  sharded = trainer._jit_step(gen, mesh, rules, s, f)
  with jax.transfer_guard_device_to_device("disallow_explicit"):
    got_state, got = sharded(s, shard_lib.place_batch(batch, mesh, rules), f)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
  chex.assert_trees_all_close(got_state, want_state, atol=2e-5, rtol=2e-4)
  assert float(jnp.abs(got_state.params["head"]["kernel"][...] - state.params["head"]["kernel"][...]).max()) > 0  # it trained
  shard_lib.check_sharded(got_state.params, mesh, rules)
  q = got_state.params["blocks"]["self_attn"]["q"]["kernel"][...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_context_parallel_teacher_step(cfg):
  """Context parallelism for training: the teacher step (bidirectional flow matching over `H`
  frames, the long-sequence stage) on a data x context mesh splits every frame's tokens over the
  `context` axis (queries and the residual stream sharded by the `act_tokens` rule, keys and
  values all-gathered, nothing resharded) and equals the single-device step. Against the same
  mesh with the token split turned off (`act_tokens` -> None), XLA's FLOPs per device fall to
  0.34 and the temporaries to 0.39 here (0.42 and 0.52 while the queries were resharded for the
  kernel and the K/V projections ran on all tokens)."""
  from asvd.train import steps as st  # noqa: PLC0415
  from asvd.train import trainer  # noqa: PLC0415

  g, tx, state, _, batch = _train_setup(cfg)
  step = st.teacher_step(g, tx, cfg)
  frozen = st.Frozen()
  host = jax.tree.map(np.asarray, state)
  want_state, want = trainer._jit_step(step, None, None, state, frozen)(jax.tree.map(jnp.asarray, host), jax.tree.map(jnp.asarray, batch), frozen)
  mesh = shard_lib.mesh_from_config({"data": 2, "context": 4})
  cost = {}
  for split, rules in (("tokens", shard_lib.DEFAULT_RULES), ("whole", {**shard_lib.DEFAULT_RULES, "act_tokens": None})):
    s = jax.device_put(host, shard_lib.tree_shardings(state, mesh, rules))
    jitted = trainer._jit_step(step, mesh, rules, s, frozen)
    b = shard_lib.place_batch(batch, mesh, rules)
    compiled = jitted.program(b).lower(s, b, frozen).compile()
    xla = compiled.cost_analysis()
    cost[split] = (float((xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]), compiled.memory_analysis().temp_size_in_bytes)
    if split == "tokens":
      hlo = compiled.as_text()
      assert "all-gather" in hlo  # the keys and values of the other context shards
      # Queries keep the residual stream's split into the kernel and back: nothing resharded.
      assert "all-to-all" not in hlo and "collective-permute" not in hlo
      with jax.transfer_guard_device_to_device("disallow_explicit"):
        got_state, got = jitted(s, b, frozen)
      np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
      chex.assert_trees_all_close(got_state, want_state, atol=2e-5, rtol=2e-4)
  print("context 4 / whole: flops", cost["tokens"][0] / cost["whole"][0], "temporaries", cost["tokens"][1] / cost["whole"][1])
  assert cost["tokens"][0] < 0.4 * cost["whole"][0] and cost["tokens"][1] < 0.47 * cost["whole"][1], cost


# splash takes key-only masks (query-dependent ones go to flash inside it, tested as flash).
ATTEND_CASES = [(b, m) for b in ("splash_interpret", "flash", "xla") for m in ("none", "key_only", "frames") if (b, m) != ("splash_interpret", "frames")]


@pytest.mark.parametrize(("backend", "mask"), ATTEND_CASES)
def test_attend_splits_queries_over_context(backend, mask, monkeypatch):
  """`attend` on a data 2 x context 2 x tensor 2 mesh: each shard runs the kernel (for splash:
  the TPU kernel's own code in the Pallas interpreter) on its half of every frame's query tokens
  and its head, against all keys; forward, gradients and the probe's share equal one device's."""
  import functools  # noqa: PLC0415

  from asvd.models import attention as attn_lib  # noqa: PLC0415
  from asvd.models.splash_attention import splash_attention  # noqa: PLC0415

  monkeypatch.setitem(attn_lib._REGISTRY, "splash_interpret", functools.partial(splash_attention, interpret=True))
  mesh = shard_lib.mesh_from_config({"data": 2, "context": 2, "tensor": 2})
  kq, kk, kv = jax.random.split(jax.random.key(5), 3)
  q = jax.random.normal(kq, (2, 2, 32, 2, 16))  # [B, F, T, H, Dh]
  k = jax.random.normal(kk, (2, 96, 2, 16))  # [B, Sk, H, Dh]: 3 key frames of 32 tokens
  v = jax.random.normal(kv, (2, 96, 2, 16))
  m = {
    "none": None,
    "key_only": jnp.array([[[True, False, True]], [[True, True, False]]]),  # [B, 1, Fk]
    "frames": jnp.array([[[True, True, False], [False, True, True]]]),  # [1, F, Fk]
  }[mask]

  def run(q, k, v, sharded, probe=False):
    with shard_lib.activation_sharding(mesh if sharded else None):
      return attn_lib.attend(backend if sharded else "xla", q, k, v, m, probe)

  out, share = jax.jit(functools.partial(run, sharded=True, probe=True))(q, k, v)
  ref, ref_share = run(q, k, v, False, True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
  np.testing.assert_allclose(np.asarray(share), np.asarray(ref_share), atol=1e-6)

  def loss(sharded):
    return lambda q, k, v: jnp.sum(jnp.sin(run(q, k, v, sharded)[0]))

  grads = jax.jit(jax.grad(loss(True), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(grads, jax.grad(loss(False), argnums=(0, 1, 2))(q, k, v), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=4e-6)
  # The per-shard program sees [1, 2, 16, 1, 16] queries (batch over data, each frame's tokens
  # over context, heads over tensor) and [1, 96, 1, 16] keys.
  shapes = []
  for eqn in jax.make_jaxpr(lambda q, k, v: run(q, k, v, True)[0])(q, k, v).eqns:
    if eqn.primitive.name == "shard_map":
      shapes = [tuple(x.aval.shape) for x in eqn.params["jaxpr"].invars[-4 if m is not None else -3 :]]
  assert shapes[:3] == [(1, 2, 16, 1, 16), (1, 96, 1, 16), (1, 96, 1, 16)]
