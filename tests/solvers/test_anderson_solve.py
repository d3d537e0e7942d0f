"""Anderson's small per-sample system `(D^{-1/2} G D^{-1/2} + λ I) x = b`, solved by the
unrolled Cholesky factorisation of `use_linalg=False`, against a dense float64 solve.

The system is Hermitian positive (semi-)definite with a unit-scale diagonal, as the
solver builds it; its size is the history depth.
"""

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings

from banax.benchmark import SolveOnly, f_spec, problem
from banax.solver import Anderson
from banax_solvers.anderson import _cholesky_solve

# One compilation per (depth, dtype): the strategies draw values, not shapes.
_solve = jax.jit(_cholesky_solve)


def scaled_gram(residuals: np.ndarray, ridge: float) -> np.ndarray:
    """What `Anderson._weights` hands the solve: the unit-diagonal Gram matrix plus λ I."""
    gram = np.einsum("bin,bjn->bij", residuals.conj(), residuals)
    d = np.sqrt(np.real(np.einsum("bii->bi", gram)))
    return gram / d[:, :, None] / d[:, None, :] + ridge * np.eye(gram.shape[-1])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), depth=st.sampled_from([1, 3, 5]),
       complex_state=st.booleans(), ridge=st.sampled_from([1e-6, 1e-2]))
def test_unrolled_cholesky_matches_a_dense_solve(seed, depth, complex_state, ridge):
    rng = np.random.default_rng(seed)
    residuals = rng.normal(size=(4, depth, 8))
    if complex_state:
        residuals = residuals + 1j * rng.normal(size=(4, depth, 8))
    a = scaled_gram(residuals, ridge)
    b = rng.normal(size=(4, depth)) + (1j * rng.normal(size=(4, depth)) if complex_state else 0)
    expected = np.linalg.solve(a, b[..., None])[..., 0]
    got = np.asarray(_solve(jnp.asarray(a), jnp.asarray(b)))
    # Relative to the solution's size: the system's condition number is at most
    # about 1/λ, so 1e-9 leaves float64 rounding a wide margin.
    assert np.allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


def test_unrolled_cholesky_gives_finite_weights_for_collinear_residuals():
    # Two identical residuals and ridge 0: the Gram matrix is singular. The floored
    # pivots keep the result finite, and it still solves the consistent system.
    r = np.array([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, -1.0]]])
    a = scaled_gram(r, 0.0)
    b = a @ np.array([1.0, 0.0, 2.0])
    x = np.asarray(_solve(jnp.asarray(a), jnp.asarray(b)))
    assert np.all(np.isfinite(x))
    assert np.allclose(a[0] @ x[0], b[0], atol=1e-6)


def test_the_unrolled_step_compiles_without_library_calls_or_inner_loops():
    # The point of `use_linalg=False`: the step is elementwise work that XLA fuses,
    # with no LAPACK call and no pivoting loop inside the solver's while body.
    params, x = problem(4, 16, 0)
    solver = Anderson(use_linalg=False, atol=1e-4, rtol=0.0, batch_axis=0)

    def forward(params, x):
        return SolveOnly(solver)(f_spec(params, x), jnp.zeros_like(x)).value

    hlo = jax.jit(forward).lower(params, x).compile().as_text()
    assert hlo.count(" while(") == 1
    # The one custom call left is the host callback that reports a failed solve, after
    # the loop; no library call.
    calls = [line for line in hlo.splitlines() if "custom-call(" in line]
    assert all('custom_call_target="xla_ffi_python_cpu_callback"' in line for line in calls)
    assert len(calls) <= 1
