"""The benchmarks' own arithmetic: the analytic FLOP count of a traced program, matmul peaks."""

import time

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common
from benchmarks.decode import jaxpr_flops


def test_jaxpr_flops_counts_convs_dots_loops_and_the_costliest_branch():
  x, k = jnp.zeros((1, 4, 8, 8, 3)), jnp.zeros((3, 3, 3, 3, 5))  # NDHWC, DHWIO
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))  # noqa: E731
  assert jaxpr_flops(jax.make_jaxpr(conv)(x, k)) == 2 * (2 * 8 * 8 * 5) * (3 * 27)  # 2 output frames
  a, b = jnp.zeros((4, 6)), jnp.zeros((6, 7))
  assert jaxpr_flops(jax.make_jaxpr(lambda a, b: jnp.einsum("ij,jk->ik", a, b))(a, b)) == 2 * 4 * 6 * 7
  sq = jnp.zeros((4, 4))
  scan = lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=5)[0]  # noqa: E731
  assert jaxpr_flops(jax.make_jaxpr(jax.jit(scan))(sq)) == 5 * 2 * 4**3  # inside a jit, times the trip count
  cond = lambda p, a: jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a, a)  # noqa: E731
  assert jaxpr_flops(jax.make_jaxpr(cond)(True, sq)) == 2 * 2 * 4**3


def test_peak_entry_times_a_slow_kernel_once_and_a_fast_one_repeatedly():
  calls = []
  slow = lambda: (calls.append(1), time.sleep(0.05))  # noqa: E731
  per_shape = {}
  common._peak_entry(per_shape, 10, 10, 10, slow, repeats=5, name="slow", slow_s=0.01)
  assert len(calls) == 1 and per_shape["slow"]["calls"] == 1
  assert 0 < per_shape["slow"]["gflops"] <= 2e3 / 0.05 / 1e9  # 2 k^3 FLOP in at least the sleep
  calls.clear()
  common._peak_entry(per_shape, 10, 10, 10, slow, repeats=3, name="fast", slow_s=10.0)
  assert len(calls) == 1 + 1 + 3 and per_shape["fast"]["calls"] == 3  # first call, warm-up, timed


def test_torch_peak_measures_both_layouts_and_keeps_the_best():
  pytest.importorskip("torch", reason="needs the `torch` extra")
  peak = common.torch_matmul_peak("float32", [(64, 32, 48)], repeats=2)
  assert set(peak["per_shape"]) == {"64x32x48 matmul", "64x32x48 linear"}
  assert peak["gflops"] == max(v["gflops"] for v in peak["per_shape"].values())
  assert peak["gflops"] == peak["per_shape"][peak["shape"]]["gflops"]
