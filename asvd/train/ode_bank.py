"""A bank of the teacher's ODE trajectories for the ODE causal initialisation, sampled once.

With `train.causal_init.ode_bank` set, the `causal_init` stage (method "ode") does not run the
teacher's ODE in every step: it samples `train.causal_init.ode_bank_size` trajectories once (the
data's prompts, fresh noise) into that file, then each step regresses on a batch drawn from it.
This is the peers' recipe (CausVid and Self-Forcing train the ODE init on a fixed set of
precomputed teacher trajectories), and it is much cheaper: on PanWorld the teacher's 8 Euler
steps with CFG are ~80% of an on-the-fly step. Runs that share a teacher (the anchor modes of
`launch/panworld_bundle.py`) share one bank: the trajectories depend on the teacher, the
prompts and the seed only, never on the student's anchor mode.

The file (`.npz`, written atomically) holds `path [N, K + 1, T, h, w, C]` (the trajectories at the
student's `K` sigmas and the clean result, as `steps.teacher_trajectory` returns them),
`text [N, L, D]` (their prompts' encodings) and `meta`, a JSON record of everything they depend
on. A file whose record differs from the run's (another teacher, ODE grid, CFG scale, horizon,
resolution, size) is an error naming the field, never overwritten. Step `s` draws its batch by
`(seed, s)` alone, so a resumed run draws what an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from asvd.errors import UsageError


def _fingerprint(params) -> list[float]:
  """Per-leaf sums of the teacher's weights (the first 7 leaves and the sum of all |sums|): a
  bank sampled from another teacher at the same path is caught. Computed on the devices (the
  teacher may be sharded across processes) and compared with a tolerance (`check`), since the
  reduction order differs between machines and meshes."""
  leaves = jax.tree.leaves(params)
  sums = jax.jit(lambda ls: jnp.stack([jnp.sum(x.astype(jnp.float32)) for x in ls]))(leaves)
  from asvd import distributed  # noqa: PLC0415

  sums = np.asarray(distributed.to_host(sums), np.float64)
  return [round(float(v), 5) for v in (*sums[:7], np.abs(sums).sum())]


def meta_for(cfg, lay, teacher_params, teacher_path: str) -> dict:
  """The record a bank must match to serve this run (`teacher_params`: the teacher's nnx state)."""
  c = cfg.train.causal_init
  return {
    "teacher": os.path.abspath(teacher_path) if teacher_path else "",
    "teacher_weights": _fingerprint(teacher_params),
    "ode_steps": int(c.ode_steps),
    "ode_cfg_scale": float(c.ode_cfg_scale),
    "shift": float(cfg.sampler.shift),
    "student_sigmas": [round(float(s), 6) for s in lay.sigmas],
    "horizon_frames": int(cfg.train.horizon_frames),
    "latent_hw": list(lay.latent_hw),
    "size": int(c.ode_bank_size),
    "data": str(cfg.train.data.name),
    "seed": int(cfg.train.seed),
  }


class OdeBank:
  """Trajectories `path [N, K + 1, T, h, w, C]` and prompts `text [N, L, D]` in host memory."""

  def __init__(self, path: np.ndarray, text: np.ndarray, meta: dict):
    self.path, self.text, self.meta = path, text, meta

  def __len__(self) -> int:
    return int(self.path.shape[0])

  def batch(self, step: int, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1) -> dict:
    """The batch of step `step` (0-based): `global_batch` distinct trajectories drawn by
    `(seed, step)`; this process's consecutive share, as the data pipeline splits batches."""
    idx = np.random.default_rng((int(seed), int(step))).choice(len(self), size=global_batch, replace=global_batch > len(self))
    share = global_batch // process_count
    idx = np.sort(idx[process_index * share : (process_index + 1) * share])
    return {"text": self.text[idx], "ode_path": self.path[idx]}


def _read(file: str) -> OdeBank:
  try:
    with np.load(file, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      return OdeBank(np.asarray(z["path"]), np.asarray(z["text"]), meta)
  except (OSError, KeyError, ValueError) as e:
    raise UsageError(f"train.causal_init.ode_bank={file!r}: not a readable ODE bank ({type(e).__name__}: {str(e)[:120]}); point it at another file") from e


def check(file: str, meta: dict, want: dict) -> None:
  """One clear error if the bank in `file` (record `meta`) was not sampled for this run."""
  for k, v in want.items():
    got = meta.get(k)
    if k == "teacher":  # recorded, not checked: a teacher copied elsewhere is the same teacher
      continue
    if k == "teacher_weights" and got is not None and len(got) == len(v) and np.allclose(got, v, rtol=1e-4, atol=1e-4):
      continue
    if got != v:
      raise UsageError(
        f"train.causal_init.ode_bank={file!r} was sampled with {k}={meta.get(k)!r}, this run has {v!r}; "
        "point ode_bank at a new file (asvd never overwrites a bank)"
      )


def sample(teacher_fn, it, n: int, key, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """`n` trajectories: `teacher_fn(text, key) -> path [B, K + 1, ...]` on batches of the data
  iterator `it` (their prompts), keys folded from `key`; returns `(path, text)` on the host."""
  paths, texts, got = [], [], 0
  bar = None
  if progress:
    from tqdm import tqdm  # noqa: PLC0415

    bar = tqdm(total=n, desc="ode bank", unit="traj", file=sys.stderr)
  i = 0
  while got < n:
    text = jnp.asarray(next(it)["text"], jnp.float32)
    p = np.asarray(teacher_fn(text, jax.random.fold_in(key, i)))
    take = min(n - got, p.shape[0])
    paths.append(p[:take])
    texts.append(np.asarray(text)[:take])
    got += take
    i += 1
    if bar is not None:
      bar.update(take)
  if bar is not None:
    bar.close()
  return np.concatenate(paths), np.concatenate(texts)


def write(file: str, path: np.ndarray, text: np.ndarray, meta: dict) -> None:
  """Writes the bank atomically (a temporary file beside it, then a rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(file)) or ".", exist_ok=True)
  tmp = f"{file}.tmp-{os.getpid()}.npz"
  try:
    np.savez(tmp, path=path.astype(np.float32), text=text.astype(np.float32), meta=np.asarray(json.dumps(meta)))
    os.replace(tmp, file)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_or_sample(file: str, want: dict, teacher_fn, make_it, key, *, lead: bool = True, progress: bool = True, barrier=None) -> OdeBank:
  """The bank in `file` if it matches `want` (else one clear error), or a new one sampled with
  `teacher_fn` from the prompts of `make_it()` (a fresh data iterator) and written there.

  Every process samples (the teacher may be sharded across them: one SPMD program; the same
  prompts and keys give the same trajectories) and the lead writes; `barrier(name)` keeps the
  processes in step around the check and the write."""
  file = os.path.abspath(os.path.expanduser(file))
  if not file.endswith(".npz"):
    raise UsageError(f"train.causal_init.ode_bank={file!r}: name a .npz file")
  if barrier is not None:
    barrier("asvd_ode_bank_check")
  if os.path.exists(file):
    bank = _read(file)
    check(file, bank.meta, want)
    print(f"[asvd] causal_init: {len(bank)} teacher trajectories from {file}", file=sys.stderr)
    return bank
  if lead:
    print(f"[asvd] causal_init: sampling {want['size']} teacher trajectories into {file} (train.causal_init.ode_bank)", file=sys.stderr)
  path, text = sample(teacher_fn, make_it(), int(want["size"]), key, progress and lead)
  if lead:
    write(file, path, text, want)
  if barrier is not None:
    barrier("asvd_ode_bank_written")
  return OdeBank(path, text, want)


__all__ = ["OdeBank", "meta_for", "load_or_sample", "check", "sample", "write"]
