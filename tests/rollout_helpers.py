"""Helpers of the rollout tests (test_transition.py, test_sharding.py, test_compile_and_carry.py)."""


def rcfg(cfg, **kw):
  """A copy of `cfg.rollout` with `kw` set."""
  c = cfg.rollout.copy_and_resolve_references()
  c.update(kw)
  return c
