"""Parity tolerances: one named constant per kind of comparison, each set from measured error.

Every parity test compares asvd (JAX, float32) against an independent PyTorch implementation
(diffusers / transformers) and asserts `max |asvd - ref| <= TOL * max |ref|` (error relative to
the output's scale). Each bound sits between the error of the correct code and the error of a
planted bug, on both CPU kinds the suite runs on (AMD EPYC, Intel Xeon with AMX):

* `DIT`: the Wan DiT, the Self-Forcing loop and the adaptive transition. Correct code measures
  about 5e-7 (up to ~2e-6 over several chunks); a tanh -> exact GELU swap in the FFN gives
  6e-5 to 9e-5, so 1e-5 catches it with a 5x margin on each side.
* `VAE`: the Wan VAE. float32 convolution order differs between CPU kernels (oneDNN on AMX vs
  AVX-512 on EPYC): 1.2e-5 was measured on a Xeon for streaming vs whole-clip decoding, up to
  1e-5 against diffusers; 1e-4 leaves 8x headroom while a wrong key mapping is O(1).
* `TEXT`: the umT5 encoder (relative-position buckets, gated-GELU FFN); measures ~1e-6.
"""

DIT = 1e-5
VAE = 1e-4
TEXT = 1e-4


def rel_err(got, want) -> float:
  """max |got - want| / max |want|, in float64."""
  import numpy as np  # noqa: PLC0415

  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())
