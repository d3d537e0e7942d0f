"""Solvers × adjoints × float16/bfloat16/float32/float64 states, under strict
promotion: values keep their dtype, the solve converges to a tolerance the dtype can
reach, and gradients are finite and close to a float64 dense truth.

The truth is computed densely in float64 at the same (rounded) parameters: the
implicit-function-theorem gradient for the exact adjoints (BPTT, Implicit,
Reversible), and for the approximate ones the quantity they approximate it by (JFB:
`(∂f/∂θ)ᵀ ḡ`; the phantoms: the `K`-term relaxed Neumann series), so that the bias of
a method is not mistaken for an error of precision. GDEQ's preconditioner depends on
Broyden's trajectory, so it is held to beating JFB's bias instead.

One compile per cell, a 12-feature tanh cell. To stay fast the solver × adjoint ×
dtype product is covered as a Latin square: every (solver, dtype) and every (adjoint,
dtype) pair, and every (solver, adjoint) pair at least once.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import Result
from helpers import contraction_matrix, dense_implicit_grad

N = 12
DTYPES = ("float16", "bfloat16", "float32", "float64")
SOLVERS = ("picard", "relaxed", "reversible", "broyden", "anderson")
ADJOINTS = ("bptt", "implicit", "jfb", "unroll_phantom", "neumann_phantom")
PHANTOM_DAMP, PHANTOM_TERMS = 0.8, 6
# Relative gradient error allowed, per state dtype: a few rounding errors of the dtype,
# amplified by (I − J)⁻¹ (‖J‖ = 0.6 here) and by the solve's own tolerance.
GRAD_RTOL = {"float16": 5e-2, "bfloat16": 1.5e-1, "float32": 1e-4, "float64": 1e-8}


def _cells() -> list[tuple[str, str, str]]:
    cells = []
    for d, dtype in enumerate(DTYPES):
        for a, adjoint in enumerate(ADJOINTS):
            cells.append((SOLVERS[(a + d) % len(SOLVERS)], adjoint, dtype))
    covered = {(s, a) for s, a, _ in cells}
    cells += [(s, a, "float32") for s in SOLVERS for a in ADJOINTS if (s, a) not in covered]
    cells += [("broyden", "gdeq", d) for d in DTYPES]
    cells += [("reversible", "reversible", d) for d in DTYPES]
    return cells


CELLS = _cells()


def rtol_for(dtype: str) -> float:
    """A forward tolerance the dtype reaches: 2 ulps of 1 (see
    `banax.reachable_tolerances`), 1e-12 in float64."""
    return 1e-12 if dtype == "float64" else 2 * float(jnp.finfo(dtype).eps)


def make_adjoint(solver: str, adjoint: str, dtype: str) -> banax.Adjoint:
    loop_kind = "checkpointed" if adjoint == "bptt" else "lax"
    forward = banax.get_solver(solver, atol=0.0, rtol=rtol_for(dtype), max_steps=80,
                               loop_kind=loop_kind)
    options = {}
    if adjoint == "implicit":
        # The backward solve accumulates in at least float32, but its VJPs run in the
        # state's dtype, which bounds the residual it can reach.
        backward = 1e-12 if dtype == "float64" else max(1e-6, rtol_for(dtype))
        options["b_solver"] = banax.get_solver("picard", atol=0.0, rtol=backward,
                                               max_steps=200)
    elif adjoint in ("unroll_phantom", "neumann_phantom"):
        options["b_solver"] = banax.get_solver("relaxed", damp=PHANTOM_DAMP,
                                               max_steps=PHANTOM_TERMS)
    return banax.get_adjoint(adjoint, solver=forward, **options)


def cell(z, w, x):
    return jnp.tanh(w @ z + x)


@functools.cache
def parameters(dtype: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(W, x, c)` rounded to `dtype`: ‖W‖ = 0.6, loss `Σ c·z*`."""
    w = contraction_matrix(jax.random.key(0), N, 0.6, symmetric=False)
    x = jax.random.normal(jax.random.key(1), (N,))
    c = jax.random.normal(jax.random.key(2), (N,))
    return tuple(a.astype(dtype) for a in (w, x, c))


@functools.cache
def dense_truth(dtype: str) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, ...]]]:
    """`z*` and, per method, `(∂f/∂θ)ᵀ λ` in float64 at the parameters rounded to
    `dtype`: `λ = (I − J)⁻ᵀ ḡ` (exact), `ḡ` (JFB), `β Σ_{k<K} (J_βᵀ)^k ḡ` (phantoms)."""
    w, x, c = (a.astype(jnp.float64) for a in parameters(dtype))
    z = jnp.zeros(N, jnp.float64)
    for _ in range(200):  # ‖J‖ ≤ 0.6: 0.6²⁰⁰ is far below float64 rounding
        z = cell(z, w, x)
    exact = dense_implicit_grad(lambda z, t: cell(z, *t), z, (w, x), c)
    jac = jax.jacfwd(cell)(z, w, x)
    relaxed = (1 - PHANTOM_DAMP) * jnp.eye(N) + PHANTOM_DAMP * jac
    term, series = c, jnp.zeros(N)
    for _ in range(PHANTOM_TERMS):
        series, term = series + term, relaxed.T @ term
    _, vjp = jax.vjp(lambda w, x: cell(z, w, x), w, x)
    phantom = vjp(PHANTOM_DAMP * series)
    truths = {"exact": exact, "jfb": vjp(c), "phantom": phantom}
    return np.asarray(z), {k: tuple(np.asarray(g) for g in v) for k, v in truths.items()}


TRUTH_OF = {"bptt": "exact", "implicit": "exact", "reversible": "exact", "jfb": "jfb",
            "unroll_phantom": "phantom", "neumann_phantom": "phantom"}


@eqx.filter_jit
def value_and_grad(adjoint, w, x, c):
    def loss(params):
        sol = adjoint((cell, params), jnp.zeros(N, c.dtype))
        # The loss in float32 at least; its cotangent reaches z* in z*'s dtype.
        value = jnp.sum((c * sol.value).astype(banax.extend.working_dtype(c.dtype)))
        return value, sol

    (_, sol), grad = eqx.filter_value_and_grad(loss, has_aux=True)((w, x))
    return sol, grad


@functools.cache
def solved(solver: str, adjoint: str, dtype: str):
    return value_and_grad(make_adjoint(solver, adjoint, dtype), *parameters(dtype))


def relative_error(grad, truth) -> float:
    flat = np.concatenate([np.asarray(g, np.float64).ravel() for g in grad])
    ref = np.concatenate([np.asarray(t, np.float64).ravel() for t in truth])
    return float(np.linalg.norm(flat - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("solver, adjoint, dtype", CELLS,
                         ids=[f"{s}-{a}-{d}" for s, a, d in CELLS])
def test_dtype_matrix(solver, adjoint, dtype):
    sol, grad = solved(solver, adjoint, dtype)
    z_true, truths = dense_truth(dtype)
    assert sol.value.dtype == jnp.dtype(dtype)
    assert sol.stats.rel_err.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
    assert all(g.dtype == jnp.dtype(dtype) for g in grad)
    assert sol.result == Result.CONVERGED, (sol.stats.steps, sol.stats.rel_err)
    assert sol.stats.rel_err <= rtol_for(dtype)
    eps = 1e-15 if dtype == "float64" else float(jnp.finfo(dtype).eps)
    error = np.max(np.abs(np.asarray(sol.value, np.float64) - z_true))
    assert error <= 40 * eps + 10 * rtol_for(dtype)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad)
    if adjoint == "gdeq":
        # Broyden's estimate of (I − J)⁻¹ brings the gradient closer to the exact one
        # than JFB's, which drops (I − J)⁻¹ altogether (here 0.20 against 0.28).
        jfb_bias = relative_error(truths["jfb"], truths["exact"])
        assert relative_error(grad, truths["exact"]) <= 0.8 * jfb_bias + GRAD_RTOL[dtype]
    else:
        assert relative_error(grad, truths[TRUTH_OF[adjoint]]) <= GRAD_RTOL[dtype]
