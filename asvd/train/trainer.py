"""`asvd train`: the stages in order, resumable at any moment, logged.

    WORKDIR/config.json          the run's config (a resumed run must match it)
    WORKDIR/metrics.jsonl        one JSON object per logged step: stage, step, loss, norms
    WORKDIR/tensorboard/<stage>  the same scalars and sample videos for TensorBoard
    WORKDIR/<stage>/samples      step_NNNNNN.mp4 every `train.sample_every` steps (latent preview)
    WORKDIR/<stage>/checkpoints  Orbax CheckpointManager: train state, data-iterator state, config
    WORKDIR/<stage>/model        the stage's final network as an asvd checkpoint (`asvd generate
                                 --checkpoint`); for `dmd` the EMA generator (`generator/` holds
                                 the raw one)

Stages (`train.stages`): `teacher` (bidirectional flow matching), `causal_init` (with the
[anchor; window; chunk] geometry, starting from the teacher: ODE regression on the frozen
teacher's trajectories, or teacher forcing on the data), `dmd` (Self-Forcing DMD with the
adaptive state: generator from `causal_init`, critic and frozen teacher from `teacher`).
Each stage starts from, in this order: its own latest checkpoint in the workdir, the explicit
`train.<stage>.init` checkpoint (`train.dmd.teacher` for DMD's teacher and critic), the previous
stage's `model`, or scratch (never for DMD's teacher).

Saves are asynchronous, every `train.checkpoint_every` steps, at the end, and on SIGTERM (then
the run stops; the same command resumes it). After a SIGKILL, the same command resumes from the
last complete checkpoint and rewrites `metrics.jsonl` from there, so the file equals an
uninterrupted run's line for line (no wall-clock values in it). A NaN or inf stops the run with
the step and the parameter subtree where it appeared.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from asvd import distributed, memory
from asvd import sharding as shard_lib
from asvd import transition as tr
from asvd.ckpt.common import CheckpointError
from asvd.errors import UsageError
from asvd.models.dit import compute_settings
from asvd.models.lora import add_lora, merge_lora, split_lora
from asvd.train import steps as st
from asvd.train.rollout import merge
from asvd.train.writers import MetricsLog, TensorBoardWriter, preview
from asvd.video import upscale, write_mp4

STAGES = ("teacher", "causal_init", "dmd")


class NonFiniteError(UsageError):
  """A loss or norm became NaN/inf; the message names the stage, step and subtree."""


# ------------------------------------------------------------------------------------------------
# Checks before any work.
# ------------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
  t = cfg.train
  memory.setting(cfg)  # runtime.memory_check / memory_limit_gib
  shard_lib.rules_from_config(cfg.get("mesh", None))  # mesh.rules (the mesh itself needs the devices)
  drop = t.teacher.get("text_dropout", 0.0)
  if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
    raise UsageError(f"train.teacher.text_dropout={drop!r} must be in [0, 1)")
  bad = [s for s in t.stages if s not in STAGES]
  if bad or not t.stages:
    raise UsageError(f"train.stages={tuple(t.stages)}: choose from {STAGES}, in order")
  if list(t.stages) != sorted(t.stages, key=STAGES.index):
    raise UsageError(f"train.stages={tuple(t.stages)} must keep the order {STAGES}")
  if t.state_init_target not in ("last_frame", "own_last_frame"):
    raise UsageError(f"train.state_init_target={t.state_init_target!r}: choose 'last_frame' or 'own_last_frame'")
  for s in t.stages:
    if int(t[s].steps) < 1:
      raise UsageError(f"train.{s}.steps={t[s].steps} must be >= 1")
  for k in ("batch_size", "checkpoint_every", "keep", "log_every"):
    if int(t[k]) < 1:
      raise UsageError(f"train.{k}={t[k]} must be >= 1")
  if int(t.lora.rank) < 0 or any(s not in STAGES for s in t.lora.stages):
    raise UsageError(f"train.lora: rank {t.lora.rank} must be >= 0 and stages {tuple(t.lora.stages)} among {STAGES}")
  if int(t.optimizer.grad_accum) < 1:
    raise UsageError(f"train.optimizer.grad_accum={t.optimizer.grad_accum} must be >= 1")
  if t.causal_init.method not in ("ode", "teacher_forcing"):
    raise UsageError(f"train.causal_init.method={t.causal_init.method!r}: choose 'ode' or 'teacher_forcing'")
  if t.causal_init.get("anchor_from", "context") not in ("clip_start", "context"):
    raise UsageError(f"train.causal_init.anchor_from={t.causal_init.anchor_from!r}: choose 'clip_start' or 'context'")
  lay = layout(cfg)
  frames, h = int(t.data.frames), int(t.horizon_frames)
  ode = "causal_init" in t.stages and t.causal_init.method == "ode"
  if ode and h < lay.window_frames + lay.chunk_frames:
    raise UsageError(f"train.horizon_frames={h}: ODE causal init samples H-frame clips holding the context and a chunk, Wp + F = {lay.window_frames + lay.chunk_frames}")
  if ode and int(t.causal_init.ode_steps) < 1:
    raise UsageError(f"train.causal_init.ode_steps={t.causal_init.ode_steps} must be >= 1")
  bank = str(t.causal_init.get("ode_bank", "") or "")
  if bank and t.causal_init.method != "ode":
    raise UsageError(f"train.causal_init.ode_bank={bank!r}: a bank of teacher trajectories serves method 'ode' only, not {t.causal_init.method!r}")
  if bank and not bank.endswith(".npz"):
    raise UsageError(f"train.causal_init.ode_bank={bank!r}: name a .npz file")
  if bank and int(t.causal_init.ode_bank_size) < int(t.batch_size):
    raise UsageError(f"train.causal_init.ode_bank_size={t.causal_init.ode_bank_size} must be >= train.batch_size={t.batch_size}")
  if int(t.sample_every) < 0 or int(t.sample_chunks) < 1:
    raise UsageError(f"train.sample_every={t.sample_every} must be >= 0 and train.sample_chunks={t.sample_chunks} >= 1")
  if int(t.sample_every) > 0 and any(s != "teacher" for s in t.stages):
    try:  # the sample videos are rollouts: the absolute preset's buffer must hold them
      tr.check_absolute(lay, 0, int(t.sample_chunks))
    except UsageError as e:
      raise UsageError(f"train.sample_chunks={t.sample_chunks}: {e}") from e
  tf = "causal_init" in t.stages and not ode
  need = max(h if "teacher" in t.stages else 0, lay.window_frames + lay.chunk_frames if tf else 0)
  if frames < need:
    raise UsageError(f"train.data.frames={frames}: the stages {tuple(t.stages)} need clips of at least {need} latent frames (teacher: H; teacher-forcing causal_init: Wp + F)")
  if "dmd" in t.stages and t.dmd.reencode_vae and not os.path.exists(t.dmd.reencode_vae):
    raise UsageError(f"train.dmd.reencode_vae={t.dmd.reencode_vae!r}: no such file or folder")
  warm = t.teacher.get("motion_warmup", 0)
  if "teacher" in t.stages and warm:
    if isinstance(warm, bool) or not isinstance(warm, int) or not 0 <= warm < int(t.teacher.steps):
      raise UsageError(f"train.teacher.motion_warmup={warm!r} must be a whole number of steps in [0, train.teacher.steps={t.teacher.steps})")
    from asvd.data import pan_fields  # noqa: PLC0415

    pan_fields.token_speeds(cfg)  # PanWorld data moving by whole tokens per frame
  if "dmd" in t.stages and int(t.dmd.critic_per_generator) < 1:
    raise UsageError(f"train.dmd.critic_per_generator={t.dmd.critic_per_generator} must be >= 1")


def layout(cfg) -> tr.Layout:
  from asvd.models.dit import DiTConfig  # noqa: PLC0415

  return tr.make_layout(cfg.rollout, DiTConfig.from_config(cfg.model), None, cfg.sampler)


MARKER = ".asvd_train"


def _check_workdir(workdir: str, cfg, *, write: bool = True) -> None:
  """A workdir is new, empty, or one that `asvd train` made (it holds `MARKER`): asvd rewrites
  `config.json` and `metrics.jsonl` there, so it never adopts a folder holding a user's files.
  With `write`, marks it and writes `config.json` (process 0 only)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir}: exists and is not a folder")
  if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.isfile(os.path.join(workdir, MARKER)):
    raise UsageError(f"--workdir {workdir}: a folder that asvd train did not make (no {MARKER}); use a new or empty folder")
  path = os.path.join(workdir, "config.json")
  mine = json.loads(cfg.to_json())
  if os.path.isfile(path):
    with open(path) as f:
      theirs = json.load(f)
    diff = sorted(_diff(theirs, mine))
    # More steps may be asked for on resume, and a run may go on with its next stages.
    changed = [k for k in diff if not k.endswith(".steps") and k != "train.stages"]
    if changed:
      raise UsageError(f"--workdir {workdir} holds a run with another config ({', '.join(changed[:6])} differ); use a new --workdir")
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  from asvd.outputs import write_text_atomic  # noqa: PLC0415

  write_text_atomic(os.path.join(workdir, MARKER), "a run folder of `asvd train`\n")
  write_text_atomic(path, json.dumps(mine, indent=2))


def _diff(a, b, prefix=""):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in set(a) | set(b):
      yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
  elif a != b:
    yield prefix.rstrip(".")


# ------------------------------------------------------------------------------------------------
# Metrics.
# ------------------------------------------------------------------------------------------------


def _check_finite(stage: str, step: int, metrics: dict) -> None:
  bad = [k for k, v in metrics.items() if not math.isfinite(v)]
  if bad:
    loss_bad = [k for k in bad if "loss" in k]
    grads = sorted(k.split("/", 1)[1] for k in bad if "grad_norm" in k)
    where = f" (gradient first non-finite in: {', '.join(grads)})" if grads else ""
    raise NonFiniteError(f"{stage} step {step}: non-finite {', '.join(loss_bad or bad[:4])}{where}; the run stops here, the last checkpoint is kept")


# ------------------------------------------------------------------------------------------------
# Models and states.
# ------------------------------------------------------------------------------------------------


def _trainable(model, lora_rank: int, alpha: float, seed: int):
  """`(graphdef, trainable params, frozen rest or None)`: all parameters, or LoRA adapters only."""
  if not lora_rank:
    graphdef, params = nnx.split(model)
    return graphdef, params, None
  return split_lora(add_lora(model, lora_rank, float(alpha) or None, key=seed))


def _stage_model(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "model")


def _init_model(cfg, stage: str, workdir: str, which: str, seed: int):
  """The network a stage starts from: explicit init > previous stage's model > (causal init)
  the teacher it names > scratch."""
  import asvd  # noqa: PLC0415

  # The explicit checkpoint: train.<stage>.init for the trained network, train.dmd.teacher for
  # the frozen teacher (DMD's teacher and critic; ODE init's teacher unless
  # train.causal_init.teacher names another). Else the previous stage's model in this workdir;
  # causal init without a teacher in this workdir starts from the teacher it names.
  score = which in ("teacher", "critic")
  explicit = cfg.train[stage].get("init", "")
  if score:
    explicit = (cfg.train.causal_init.teacher if stage == "causal_init" else "") or cfg.train.dmd.teacher
  previous = {"teacher": None, "causal_init": "teacher", "dmd": "teacher" if score else "causal_init"}[stage]
  path = explicit or None
  if path is None and previous is not None and os.path.isdir(_stage_model(workdir, previous)):
    path = _stage_model(workdir, previous)
  if path is None and stage == "causal_init":  # the student starts from its named teacher
    path = (cfg.train.causal_init.teacher or cfg.train.dmd.teacher) or None
  if path is None:
    if score:
      what = "ODE causal init (train.causal_init.method='ode')" if stage == "causal_init" else "dmd"
      raise UsageError(f"{what} needs a teacher: run the teacher stage first (it writes {_stage_model(workdir, 'teacher')}), or set train.dmd.teacher")
    return asvd.init_dit(cfg.model, jax.random.key(seed)), "scratch"
  return asvd.load_dit(path, dtype=jnp.dtype(cfg.model.param_dtype), **compute_settings(cfg.model)), path


def _reencode_vae(cfg):
  """The Wan VAE that re-encodes mid-rollout windows' first latents in DMD, or None (off, or no
  VAE: synthetic latent data)."""
  d = cfg.train.dmd
  if not d.reencode_first:
    return None
  path = d.reencode_vae or (cfg.train.data.weights if cfg.train.data.name == "video_folder" else "")
  if not path:
    return None
  import asvd  # noqa: PLC0415
  from asvd.pipeline import plain_config  # noqa: PLC0415

  vae = asvd.load_vae(path, dtype=jnp.float32, config=plain_config(cfg.get("pipeline", {}).get("vae")))
  print(f"[asvd] dmd: windows starting mid-rollout get their first latent re-encoded by the VAE in {path}", file=sys.stderr)
  return vae


def _optimizer(cfg, stage, which="generator"):
  t = cfg.train
  if stage == "dmd":
    lr = t.dmd.generator_lr if which == "generator" else t.dmd.critic_lr
  else:
    lr = t[stage].lr
  opt = t.optimizer
  if t[stage].get("b1") is not None:  # the stage's own momentum
    opt = opt.copy_and_resolve_references()
    opt.b1 = float(t[stage].b1)
  return st.optimizer(lr, opt)


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------


class _Stop:
  """SIGTERM -> save and stop at the next step boundary."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, *_):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Runs `cfg.train.stages` in `workdir`; returns `{stage: path of its final model}` (None for
  a stage stopped by SIGTERM, after which no later stage runs)."""
  check_config(cfg)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  lead = distributed.is_lead()
  _check_workdir(workdir, cfg, write=False)  # every process checks before any writes
  distributed.barrier("asvd_workdir_checked")
  if lead:
    _check_workdir(workdir, cfg)
  distributed.barrier("asvd_workdir_ready")
  lay = layout(cfg)
  log = MetricsLog(workdir, enabled=lead)
  out = {}
  with _Stop() as stop:
    for i, stage in enumerate(cfg.train.stages):
      out[stage] = _run_stage(cfg, workdir, stage, i, lay, log, stop, progress)
      if out[stage] is None:  # stopped by SIGTERM
        return out
  return out


def _run_stage(cfg, workdir, stage, index, lay, log, stop, progress):
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from asvd.ckpt import dit_port  # noqa: PLC0415
  from asvd.data.pipeline import make_iterator  # noqa: PLC0415

  t = cfg.train
  total = int(t[stage].steps)
  sdir = os.path.join(workdir, stage)
  seed = int(t.seed) + 1000 * index
  opts = ocp.CheckpointManagerOptions(max_to_keep=int(t.keep), save_interval_steps=int(t.checkpoint_every), create=True, enable_async_checkpointing=True)
  mngr = ocp.CheckpointManager(os.path.join(sdir, "checkpoints"), options=opts)
  try:
    latest = mngr.latest_step()
    if latest is not None and latest >= total and dit_port.is_asvd_checkpoint(_stage_model(workdir, stage)):
      print(f"[asvd] {stage}: done ({latest} steps), skipping", file=sys.stderr)
      return _stage_model(workdir, stage)

    # Networks, optimisers and the fresh state (the restore target). With LoRA only the adapters
    # are trained (and checkpointed); the rest of each network is `frozen`, an argument.
    lora = int(t.lora.rank) if stage in t.lora.stages else 0
    model, source = _init_model(cfg, stage, workdir, "generator", seed)
    graphdef, params, gen_frozen = _trainable(model, lora, t.lora.alpha, seed)
    tx = _optimizer(cfg, stage)
    extra, frozen = {}, st.Frozen(generator=gen_frozen)
    score_graphdef = critic_graphdef = None
    if stage == "dmd" or (stage == "causal_init" and t.causal_init.method == "ode"):
      teacher_model, teacher_source = _init_model(cfg, stage, workdir, "teacher", seed + 2)
      score_graphdef, teacher = nnx.split(teacher_model)
      if t.dmd.teacher_dtype != "float32":
        teacher = jax.tree.map(lambda x: x.astype(jnp.dtype(t.dmd.teacher_dtype)), teacher)
      frozen = st.Frozen(generator=gen_frozen, teacher=teacher)
    vae_graphdef = None
    if stage == "dmd":
      critic_model, _ = _init_model(cfg, stage, workdir, "critic", seed + 1)
      critic_graphdef, critic, critic_frozen = _trainable(critic_model, lora, t.lora.alpha, seed + 1)
      critic_tx = _optimizer(cfg, stage, "critic")
      extra = dict(critic=critic, critic_opt=critic_tx.init(critic), ema=jax.tree.map(jnp.copy, params))
      vae = _reencode_vae(cfg)
      vae_graphdef, vae_params = nnx.split(vae) if vae is not None else (None, None)
      frozen = st.Frozen(generator=gen_frozen, critic=critic_frozen, teacher=teacher, vae=vae_params)
    state = st.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), key=jax.random.PRNGKey(seed), **extra)
    # One placement from the first step on (a restored state is committed too): one compile.
    # On a mesh (`config.mesh`) every Variable goes to the shards its logical names give.
    mesh, rules = shard_lib.from_config(cfg)
    if mesh is None:
      state, frozen = jax.device_put((state, frozen), jax.devices()[0])
    else:
      state = jax.device_put(state, shard_lib.tree_shardings(state, mesh, rules))
      frozen = jax.device_put(frozen, shard_lib.tree_shardings(frozen, mesh, rules))
      shard_lib.check_sharded(state.params, mesh, rules, what=f"{stage} parameters")
    data_dir = t.data.data_dir or os.path.join(workdir, "data")
    if jax.process_count() > 1:  # process 0 prepares the dataset once; the others then read it
      if distributed.is_lead():
        from asvd.data.pipeline import data_source  # noqa: PLC0415

        data_source(cfg, lay.latent_hw, data_dir)
      distributed.barrier(f"asvd_data_{stage}")
    # train.batch_size is the global batch; each process reads its share of the data.
    warmup = int(t.teacher.get("motion_warmup", 0)) if stage == "teacher" else 0
    it = make_iterator(cfg, lay.latent_hw, batch_size=int(t.batch_size) // jax.process_count(), seed=seed, data_dir=data_dir, warmup=warmup)
    if warmup and (latest or 0) < warmup:
      print(f"[asvd] teacher: steps 1-{warmup} on field pans (train.teacher.motion_warmup), then the data", file=sys.stderr)

    bank = None
    if stage == "causal_init" and t.causal_init.method == "ode" and t.causal_init.get("ode_bank", ""):
      bank = _ode_bank(cfg, lay, score_graphdef, frozen.teacher, teacher_source, data_dir, mesh, progress)

    if latest is not None:  # resume: the whole state or nothing
      _quiet_closed_loop_callbacks()
      try:
        restored = mngr.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(state), data=ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001  (orbax raises many types)
        why = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointError(f"{mngr.directory}/{latest}: cannot restore this checkpoint, it is truncated or not asvd's ({type(e).__name__}: {why}); move it away to restart the stage from the previous checkpoint") from e
      state = restored["state"]
      it.set_state(restored["data"])
      log.rewind(stage, latest)
      print(f"[asvd] {stage}: resumed at step {latest}", file=sys.stderr)
    else:
      log.rewind(stage, 0)
      print(f"[asvd] {stage}: starting from {source}", file=sys.stderr)

    # Jitted steps (state donated; frozen weights are an argument, never baked into the program).
    def jit(fn):
      return _jit_step(fn, mesh, rules, state, frozen)

    if stage == "teacher":
      one = jit(st.teacher_step(graphdef, tx, cfg))
    elif stage == "causal_init":
      one = jit(st.causal_init_step(graphdef, tx, cfg, lay, score_graphdef))
    else:
      gen_step, critic_step = st.dmd_steps(graphdef, score_graphdef, tx, critic_tx, cfg, lay, critic_graphdef, vae_graphdef)
      gen_jit, critic_jit = jit(gen_step), jit(critic_step)
      ratio = int(t.dmd.critic_per_generator)

    jits = {"step": one} if stage != "dmd" else {"generator step": gen_jit, "critic step": critic_jit}

    def step_fn(state, batch):
      if stage != "dmd":
        return one(state, batch, frozen)
      m = {}
      if int(state.step) % ratio == 0:
        state, m = gen_jit(state, batch, frozen)
      state, mc = critic_jit(state, batch, frozen)
      return state, {**m, **mc, "loss": mc["critic_loss"]}

    bar = _bar(progress, stage, total, int(state.step))
    step = int(state.step)
    lead = jax.process_index() == 0  # only process 0 writes logs and samples
    tb = TensorBoardWriter(os.path.join(workdir, "tensorboard", stage)) if lead else None
    # On a mesh every process computes the sample (the rollout is one SPMD program); process 0 writes.
    sampling = int(t.sample_every) > 0 and (lead or mesh is not None)
    sampler = _Sampler(cfg, stage, lay, graphdef, gen_frozen, data_dir, mesh, rules) if sampling else None
    try:
      while step < total:
        raw = next(it) if bank is None else bank.batch(step, int(t.batch_size), seed, jax.process_index(), jax.process_count())
        batch = jax.tree.map(jnp.asarray, raw) if mesh is None else shard_lib.place_batch(raw, mesh, rules)
        if jits:  # before the first step: compiled (once) and checked against the free memory
          _preflight(stage, jits, state, batch, frozen, cfg)
          jits = None
        state, metrics = step_fn(state, batch)
        step += 1
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        _check_finite(stage, step, m)
        if step % int(t.log_every) == 0 or step == total:
          log.write({"stage": stage, "step": step, **m})
          if tb is not None:
            tb.write_scalars(step, m)
        if sampler is not None and step % int(t.sample_every) == 0:
          video = sampler(state.ema if stage == "dmd" else state.params)
          if sampler.metrics and lead:  # PanWorld: the sample's measured camera speed
            log.write({"stage": stage, "step": step, **sampler.metrics})
            if tb is not None:
              tb.write_scalars(step, sampler.metrics)
        if tb is not None and sampler is not None and step % int(t.sample_every) == 0:
          os.makedirs(os.path.join(sdir, "samples"), exist_ok=True)
          write_mp4([video], os.path.join(sdir, "samples", f"step_{step:06d}.mp4"), fps=int(cfg.pipeline.fps))
          tb.write_videos(step, {"sample": video})
          tb.flush()
        mngr.save(step, args=_save_args(ocp, state, it, cfg), force=step == total or stop.requested)
        if bar is not None:
          bar.update(1)
          bar.set_postfix(loss=f"{m['loss']:.4g}")
        if stop.requested and step < total:
          mngr.wait_until_finished()
          print(f"\n[asvd] {stage}: stopped by SIGTERM at step {step}; run the same command to resume", file=sys.stderr)
          return None
    finally:
      if bar is not None:
        bar.close()
      if tb is not None:
        tb.close()
    mngr.wait_until_finished()
    # The final models: gathered from every process's shards, written by process 0.
    host = distributed.to_host((state.ema if stage == "dmd" else state.params, state.params, gen_frozen))
    if lead:
      final_params, raw_params, frozen_host = jax.tree.map(jnp.asarray, host)
      dit_port.save_dit(merge_lora(merge(graphdef, final_params, frozen_host)), _stage_model(workdir, stage), overwrite=True)
      if stage == "dmd":
        dit_port.save_dit(merge_lora(merge(graphdef, raw_params, frozen_host)), os.path.join(sdir, "generator"), overwrite=True)
    distributed.barrier(f"asvd_saved_{stage}")
    return _stage_model(workdir, stage)
  finally:
    mngr.close()


def _ode_bank(cfg, lay, teacher_graphdef, teacher, teacher_source, data_dir, mesh, progress):
  """`train.causal_init.ode_bank`: the teacher's trajectories, read from the file or sampled into
  it once (`asvd.train.ode_bank`). Their prompts and noise come from `train.seed` alone, so every
  run with the same teacher and data (the bundle's anchor modes) can share one file."""
  from asvd.data.pipeline import make_iterator  # noqa: PLC0415
  from asvd.train import ode_bank  # noqa: PLC0415

  t, c = cfg.train, cfg.train.causal_init
  h, shift = int(t.horizon_frames), float(cfg.sampler.shift)

  def fn(teacher, text, key):
    return st.teacher_trajectory(nnx.merge(teacher_graphdef, teacher), lay, text, key, h, int(c.ode_steps), shift, float(c.ode_cfg_scale))

  jitted = jax.jit(fn)
  if mesh is not None:  # every process holds the same prompts: replicated over the mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    put = lambda x: jax.device_put(x, rep)  # noqa: E731
  else:
    put = lambda x: x  # noqa: E731

  def teacher_fn(text, key):
    return distributed.to_host(jitted(teacher, put(text), key))

  def make_it():  # the whole batch on every process, its own seed: the bank is the same anywhere
    return make_iterator(cfg, lay.latent_hw, batch_size=int(t.batch_size), seed=int(t.seed) + 17, data_dir=data_dir, process_index=0, process_count=1)

  want = ode_bank.meta_for(cfg, lay, teacher, teacher_source)
  return ode_bank.load_or_sample(
    str(c.ode_bank), want, teacher_fn, make_it, jax.random.PRNGKey(int(t.seed) + 17), lead=distributed.is_lead(), progress=progress, barrier=distributed.barrier
  )


class _Sampler:
  """A sample video of the network being trained, from a fixed prompt (the dataset's first) and
  seed: the teacher by its ODE (`train.causal_init.ode_steps` Euler steps, H frames), a causal
  network by `asvd.rollout` (`train.sample_chunks` chunks), i.e. exactly as inference runs it.
  Returns the latent preview, uint8 `[T, H, W, 3]`."""

  def __init__(self, cfg, stage, lay, graphdef, gen_frozen, data_dir, mesh=None, rules=None):
    from asvd.data.pipeline import data_source  # noqa: PLC0415

    self.cfg, self.stage, self.lay, self.graphdef, self.gen_frozen = cfg, stage, lay, graphdef, gen_frozen
    self.mesh, self.rules = mesh, rules
    first = data_source(cfg, lay.latent_hw, data_dir)[0]
    self.text = jnp.asarray(first["text"], jnp.float32)[None]
    # PanWorld: the caption's camera motion, to measure the sample's (`sample/speed`).
    self.caption = first.get("caption") if isinstance(first, dict) else None
    self.metrics: dict[str, float] = {}
    self.key = jax.random.PRNGKey(int(cfg.train.seed))
    if stage == "teacher":
      c, shift = cfg.train.causal_init, float(cfg.sampler.shift)
      h = int(cfg.train.horizon_frames)

      def sample(params, frozen, text, key):
        model = merge(graphdef, params, frozen)
        return st.teacher_trajectory(model, lay, text, key, h, int(c.ode_steps), shift, float(c.ode_cfg_scale))[:, -1]

      self._teacher = jax.jit(sample)

  def __call__(self, params):
    import asvd  # noqa: PLC0415

    if self.stage == "teacher":
      lat = self._teacher(params, self.gen_frozen, self.text, self.key)
    else:
      c = self.cfg
      model = merge_lora(merge(self.graphdef, params, self.gen_frozen))
      lat, _ = asvd.rollout(
        model, self.text, self.key, num_chunks=int(c.train.sample_chunks), config=c.rollout, sampler_config=c.sampler, latent_hw=self.lay.latent_hw, mesh=self.mesh, rules=self.rules,
        memory_check=memory.setting(c),
      )
    lat = distributed.to_host(lat)[0]
    from asvd.models import pixel_codec  # noqa: PLC0415

    codec = pixel_codec.from_config(self.cfg)
    if codec is not None:  # pixel space (PanWorld): the exact decode, 4x upscaled to look at
      frames = codec.to_uint8(lat[None])[0]
      if self.caption:
        from asvd.data import panworld  # noqa: PLC0415
        from asvd.eval import motion  # noqa: PLC0415

        self.metrics = motion.sample_motion(frames, self.caption, panworld.world(self.cfg)["speeds"])
        if self.stage == "teacher":  # does it take the camera's direction from the text yet?
          model = merge(self.graphdef, params, self.gen_frozen)
          # sigma 0.5: where a network that has begun to read the direction gains the most
          gain = motion.direction_gain(model, self.cfg, (0.5,), clips=16)
          self.metrics["sample/direction_gain"] = gain[0.5]
      return upscale(frames, 4)
    return preview(lat)


def _preflight(stage, jits, state, batch, frozen, cfg):
  """Compiles each jitted step for this state and batch (the executables the steps then use)
  and stops with `asvd.OutOfMemoryError` when one cannot fit in the free memory."""
  setting = memory.setting(cfg)
  if setting is False:
    return
  hint = "use a smaller train.batch_size, train.dmd.replay=True, model.dtype=bfloat16, LoRA (train.lora.rank) or a mesh over more devices (config.mesh; `asvd aot` plans TPU slices)"
  for name, jitted in jits.items():
    compiled = jitted.program(batch).lower(state, batch, frozen).compile()
    memory.check(compiled, f"{stage}: the {name}", setting=setting, hint=hint)


def _jit_step(fn, mesh, rules, state, frozen):
  """A stage's step `(state, batch, frozen) -> (state, metrics)`, jitted with the state donated.

  On a mesh: the state and the frozen weights in (and the state out) by their logical names
  (`asvd.sharding.tree_shardings`), the batch split along its batch axis, the metrics
  replicated, and the DiT's activations pinned while tracing. Compiled once per batch structure.
  """
  if mesh is None:
    jitted = jax.jit(fn, donate_argnums=0)
    jitted.program = lambda batch: jitted
    return jitted
  state_sh, frozen_sh = shard_lib.tree_shardings(state, mesh, rules), shard_lib.tree_shardings(frozen, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def traced(state, batch, frozen):
    with shard_lib.activation_sharding(mesh, rules):
      return fn(state, batch, frozen)

  programs = {}

  def program(batch):
    """The jitted step for batches shaped like `batch` (arrays or ShapeDtypeStructs)."""
    key = (jax.tree.structure(batch), tuple(tuple(x.shape) for x in jax.tree.leaves(batch)))
    if key not in programs:
      batch_sh = shard_lib.batch_shardings(batch, mesh, rules)
      programs[key] = jax.jit(traced, in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, replicated), donate_argnums=0)
    return programs[key]

  def call(state, batch, frozen):
    return program(batch)(state, batch, frozen)

  call.program = program
  return call


def _quiet_closed_loop_callbacks() -> None:
  """After a failed restore, tensorstore completes its futures into Orbax's already closed
  asyncio loop; CPython reports each as an unraisable "Event loop is closed" traceback. Those
  say nothing the one-line error does not, so they are dropped (everything else is reported)."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)

  if getattr(previous, "__name__", "") != "hook":
    sys.unraisablehook = hook


def _save_args(ocp, state, it, cfg):
  return ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(it.get_state()), config=ocp.args.JsonSave(json.loads(cfg.to_json())))


def _bar(progress, stage, total, start):
  if not progress or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # noqa: PLC0415

  return tqdm(total=total, initial=start, desc=stage, unit="step", file=sys.stderr)


__all__ = ["train", "check_config", "STAGES", "NonFiniteError", "MetricsLog"]

