"""The benchmarks' own arithmetic: the analytic FLOP count of a traced program."""

import jax
import jax.numpy as jnp

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
