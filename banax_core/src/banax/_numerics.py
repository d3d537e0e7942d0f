"""The numerical conventions every solve shares: the working dtype, per-sample
residual norms, reachable tolerances, the step budget, and per-sample selection on
the flat `(B, N)` state.

The loop uses them, and so do solvers and adjoints (built in or from a plugin), so
that statistics, histories and backward solves are computed one way everywhere.
"""

import math
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Inexact, Int

from ._layout import FlatState


def working_dtype(dtype: Any) -> Any:
    """The dtype that statistics, solver histories and backward solves run in: the
    state's own, widened to at least single precision.

    float16, bfloat16 and float32 give float32; float64 stays float64; complex64 and
    complex128 stay themselves (their real parts are already single or double
    precision). Written without `jnp.promote_types`, which JAX's strict promotion
    refuses for float16/bfloat16 against float32.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"expected a floating or complex dtype, got {dtype}.")
    if jnp.issubdtype(dtype, jnp.complexfloating) or jnp.finfo(dtype).bits >= 32:
        return dtype
    return jnp.dtype(jnp.float32)


def stats_dtype(dtype: Any) -> Any:
    """The real dtype of residual norms: the real counterpart of `working_dtype`
    (float32 for float16/bfloat16/float32/complex64, float64 for float64/complex128)."""
    return jnp.finfo(working_dtype(dtype)).dtype


def squared_norms(x: Inexact[Array, "batch features"]) -> Float[Array, " batch"]:
    """Per-sample `‖x_b‖₂² = Σ |x_bn|²`, real also for complex `x`."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.sum(jnp.real(x) ** 2 + jnp.imag(x) ** 2, axis=-1)
    return jnp.sum(x**2, axis=-1)


def residual_norms(
    z: FlatState, fz: FlatState
) -> tuple[Float[Array, " batch"], Float[Array, " batch"]]:
    """Per-sample `(‖f(z) − z‖₂, ‖f(z) − z‖₂ / ‖f(z)‖₂)`, in `stats_dtype`.

    The norms are plain sums of squares in the working dtype. When `‖f(z)‖²` overflows
    (entries beyond about `1.8e19 / √N` in float32) the relative error is reported as
    `inf` rather than the `0` the division would give, so that such a sample is never
    taken to meet `rtol`; an overflowing `‖f(z) − z‖²` makes `abs_err` infinite, which
    the loop reports as DIVERGED.
    """
    wide = working_dtype(z.dtype)
    fz = fz.astype(wide)
    abs_err = jnp.sqrt(squared_norms(fz - z.astype(wide)))
    scale = jnp.sqrt(squared_norms(fz))
    rel_err = abs_err / jnp.where(scale > 0, scale, 1)
    rel_err = jnp.where(jnp.isinf(scale), jnp.inf, rel_err)
    return abs_err, rel_err


class BanaxPrecisionWarning(UserWarning):
    """A solver's tolerances are finer than the state's dtype can resolve, so the solve
    will most likely run to `max_steps` (see `check_tolerances`)."""


def reachable_tolerances(dtype: Any, features: int) -> tuple[float, float]:
    """`(rtol, atol)` below which a state of `dtype` with `features` entries per sample
    cannot be trusted to stop: `ε` and `ε √N`, with `ε` the dtype's machine epsilon.

    Rounding an iterate and its image `f(z)` to the state's dtype leaves a relative
    residual `‖f(z) − z‖ / ‖f(z)‖` of a fraction of `ε` (measured: 0.2–0.45 ε for
    bfloat16 and float32 tanh cells of 16 to 256 features, Picard, Anderson and
    Broyden alike), which no solver can go below. The absolute residual is then about
    `ε ‖z‖`, i.e. `ε √N` for entries of order one.
    """
    eps = float(jnp.finfo(dtype).eps)
    return eps, eps * math.sqrt(features)


def check_tolerances(solver: Any, dtype: Any, features: int) -> None:
    """Warn (at trace time) when every enabled stopping test of `solver` is finer than
    `reachable_tolerances(dtype, features)`; one reachable test is enough for the loop
    to stop. Nothing is said when both tests are disabled (a fixed number of steps)."""
    rtol_floor, atol_floor = reachable_tolerances(dtype, features)
    enabled = [t for t in ((solver.rtol, rtol_floor), (solver.atol, atol_floor)) if t[0] > 0]
    if enabled and all(tol < floor for tol, floor in enabled):
        name = jnp.dtype(dtype).name
        warnings.warn(
            f"{type(solver).__name__}: atol={solver.atol!r}, rtol={solver.rtol!r} are "
            f"finer than a {name} state can resolve; the residual of an iterate rounded "
            f"to {name} stalls near its machine epsilon, so this solve will likely run "
            f"to max_steps. Use rtol >= {rtol_floor:.3g} (or atol >= {atol_floor:.3g} "
            f"for {features} entries of order one per sample), or a wider dtype.",
            BanaxPrecisionWarning,
            stacklevel=2,
        )


def check_step_budget(
    step_budget: Any, name: str = "step_budget"
) -> Int[Array, ""] | None:
    """Validate a step budget (`name` is the argument's name in the messages): `None`
    or an integer JAX array of shape `()`."""
    if step_budget is None:
        return None
    if not isinstance(step_budget, (jax.Array, np.ndarray)):
        raise TypeError(
            f"{name} must be a JAX array or None, got {type(step_budget).__name__} "
            f"{step_budget!r}. Pass jnp.array({step_budget!r}) so that changing it does "
            "not recompile."
        )
    if step_budget.shape != () or not jnp.issubdtype(step_budget.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be a scalar integer array, got shape "
            f"{step_budget.shape} and dtype {step_budget.dtype}."
        )
    return jnp.asarray(step_budget)


def where_per_sample(mask: Bool[Array, " batch"], new: Any, old: Any) -> Any:
    """Per sample, `new` where `mask` holds and `old` elsewhere, leaf by leaf of two
    pytrees whose arrays carry the batch axis first.

    Scalar leaves are shared by all samples and non-array leaves are not data: both
    take `new`.
    """

    def pick(n: Any, o: Any) -> Any:
        if not eqx.is_array(n) or n.ndim == 0:
            return n
        return jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)
