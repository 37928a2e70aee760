"""What this host's CPU can do: its feature flags, and whether bf16 arithmetic is native on it.

Read from `/proc/cpuinfo` (Linux: the x86 `flags` line, ARM's `Features`); elsewhere the flags
are unknown (an empty set) and nothing is claimed about them.
"""

from __future__ import annotations

# Flags of native bf16 arithmetic: x86 AVX-512 BF16 and AMX, ARM's BF16 extension.
NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
  """The CPU's feature flags (the first processor's), or an empty set where they are unknown."""
  try:
    with open(path) as f:
      for line in f:
        if line.split(":")[0].strip() in ("flags", "Features"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def bf16_hint(dtype: str, platform: str, flags: set[str]) -> str | None:
  """One line for a bf16 run on a CPU without native bf16 arithmetic, else None.

  Such a CPU (AVX2 only: no `avx512_bf16`, no AMX) widens every bf16 matmul: the small DiT
  forward took 1,100 ms in bf16 against 711 ms in f32 on an AVX2 EPYC (1,234 vs 957 ms on a
  busier day; `benchmarks/results/dit_forward_amd-epyc-avx2-2c.json`), while bf16 still halves
  the memory. Nothing is said where the flags are unknown.
  """
  if platform != "cpu" or dtype != "bfloat16" or not flags or flags & NATIVE_BF16:
    return None
  return "[asvd] this CPU has no native bf16 arithmetic: bf16 runs 1.3-1.5x slower than f32 here (but takes half the memory); the configs' :f32 variants are faster"


__all__ = ["NATIVE_BF16", "cpu_flags", "bf16_hint"]
