"""Option checks and small numerical helpers shared by several solvers.

Every solver sees the state as a flat `(B, N)` array (`B` samples of `N` features), so
"per sample" always means "reduce over the last axis".
"""

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Inexact

from banax.extend import FlatState as Flat
from banax.extend import check_flag, check_integer, check_real, squared_norms


def check_damp(solver: Any, *, allow_one: bool, why: str = "") -> None:
    """Raise unless `solver.damp` is a number in (0, 1] (or (0, 1) when `allow_one` is
    False)."""
    check_real(solver, "damp", solver.damp, low=0, high=1, low_open=True,
                     high_open=not allow_one, why=why)


def check_int(solver: Any, option: str, minimum: int) -> None:
    """Raise unless the option `option` of `solver` is an int >= `minimum`."""
    check_integer(solver, option, getattr(solver, option), minimum=minimum)


def check_bool(solver: Any, option: str) -> None:
    """Raise unless the option `option` of `solver` is True or False."""
    check_flag(solver, option, getattr(solver, option))


def check_nonnegative(solver: Any, option: str, *, allow_none: bool = False,
                      strict: bool = False) -> None:
    """Raise unless the option `option` of `solver` is a finite number >= 0 (> 0 if
    `strict`), or None when `allow_none`."""
    check_real(solver, option, getattr(solver, option), low=0, low_open=strict,
                     allow_none=allow_none)


def damped(a: Flat, fb: Flat, damp: float) -> Flat:
    """`(1 − β) a + β f(b)`: the relaxation step of Relaxed and Reversible."""
    return (1 - damp) * a + damp * fb


# Inner products are Hermitian, `⟨a, b⟩ = Σ conj(a_n) b_n` (conjugate-linear in the
# first argument, as `jnp.vdot`), so that complex states get real, non-negative norms
# and the least-squares and secant formulas of the real case hold unchanged. For real
# arrays `conj` is the identity and costs nothing. Where a history is involved, the
# small operand is conjugated and the result conjugated back, `Σ conj(h) x =
# conj(Σ h conj(x))`, rather than conjugating the whole history.


def sample_dot(a: Inexact[Array, "batch features"],
               b: Inexact[Array, "batch features"]) -> Inexact[Array, " batch"]:
    """Per-sample inner product `⟨a_b, b_b⟩ = Σ_n conj(a_bn) b_bn`."""
    return jnp.sum(jnp.conj(a) * b, axis=-1)


def sample_norm(x: Inexact[Array, "batch features"]) -> Float[Array, " batch"]:
    """Per-sample `‖x_b‖₂`, real also for complex `x`."""
    return jnp.sqrt(squared_norms(x))


# Histories are contracted with batched matrix products rather than broadcast-and-sum:
# XLA maps them to optimised kernels (an order of magnitude faster on CPU), and
# HIGHEST precision keeps GPUs from rounding float32 operands to TF32.


def history_dot(history: Inexact[Array, "batch history features"],
                x: Inexact[Array, "batch features"]) -> Inexact[Array, "batch history"]:
    """`⟨h_{b,i}, x_b⟩` for every sample `b` and history slot `i`."""
    return jnp.conj(jnp.einsum("bmn,bn->bm", history, jnp.conj(x),
                               precision=jax.lax.Precision.HIGHEST))


def history_combine(weights: Inexact[Array, "batch history"],
                    history: Inexact[Array, "batch history features"]
                    ) -> Inexact[Array, "batch features"]:
    """`Σ_i w_{b,i} h_{b,i}` for every sample `b` (no conjugation)."""
    return jnp.einsum("bm,bmn->bn", weights, history, precision=jax.lax.Precision.HIGHEST)


def after(x: Inexact[Array, "batch features"], read: Inexact[Array, "batch k"]
          ) -> Inexact[Array, "batch features"]:
    """`x`, made to depend on `read` (a result of the step's last read of a history
    buffer) without changing its value.

    Writing `x` into that buffer in place is only possible once every read of the old
    buffer is done; XLA does not always see that order (and drops optimisation
    barriers on CPU), and then copies the whole buffer each step. A data dependency
    fixes the order. A NaN in `read` makes `x` NaN, which only happens to a sample
    whose step is already NaN.
    """
    return x + (0 * jnp.sum(read, axis=-1, keepdims=True)).astype(x.dtype)
