"""The residual norms that every stopping test reads, at the edge of the float range.

`‖f(z)‖²` of a float32 state with entries near 2e19 overflows although `‖f(z) − z‖²`
does not; the relative error must then never read as 0 (which passes any `rtol`).
"""

import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax.benchmark import SolveOnly

# f(z) = z / 2 + c has the fixed point 2c; with c = 1e19 its squares overflow float32.
C = 1e19
N = 8


def halfway(z, c):
    return 0.5 * z + c


def test_an_overflowing_scale_gives_an_infinite_relative_error():
    fz = jnp.full((2, N), 2 * C, jnp.float32)
    z = fz * jnp.asarray([[1 - 1e-3], [1.0]], jnp.float32)
    abs_err, rel_err = banax.extend.residual_norms(z, fz)
    assert np.all(np.isfinite(np.asarray(abs_err)))
    assert float(abs_err[1]) == 0.0
    assert np.all(np.isinf(np.asarray(rel_err)))


def test_ordinary_norms_are_unchanged():
    z = jnp.asarray([[3.0, 0.0]], jnp.float32)
    fz = jnp.asarray([[0.0, 4.0]], jnp.float32)
    abs_err, rel_err = banax.extend.residual_norms(z, fz)
    assert float(abs_err[0]) == 5.0 and float(rel_err[0]) == 1.25


@pytest.mark.parametrize("name", ["picard", "anderson", "broyden"])
def test_a_huge_state_is_not_reported_converged_before_it_is(name):
    # Started 0.05 % from the fixed point, 50 times rtol: without the guard the first
    # relative error reads 0 and the solve stops at step 0, reporting CONVERGED. With
    # it, the relative test stays unmet and the solve runs until the float32 iterate
    # is exactly fixed (`‖f(z) − z‖ = 0`).
    solver = banax.get_solver(name, rtol=1e-5, atol=0.0, max_steps=100)
    c = jnp.full((N,), C, jnp.float32)
    z0 = jnp.full((N,), 2 * C * (1 - 5e-4), jnp.float32)
    sol = SolveOnly(solver)((halfway, (c,)), z0)
    assert int(sol.result) == banax.Result.CONVERGED
    assert int(sol.stats.steps) > 0
    assert np.allclose(np.asarray(sol.value), 2 * C, rtol=1e-5)
