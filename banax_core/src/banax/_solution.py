"""What a solve returns: `Solution`, its `Stats`, its `Result` code, the
`BackwardStats` of a backward solve, and the `FlatSolution` that solvers and adjoints
work with."""

import enum
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._layout import FlatState


class Result(enum.IntEnum):
    """How a solve ended: the integer codes 0, 1, 2 of `sol.result`.

    `sol.result` is an int32 array (one code per sample in batch mode), so
    `sol.result == Result.CONVERGED`, `sol.result == 0` and `int(sol.result) ==
    Result.CONVERGED` all hold for a converged solve, inside `jax.jit` too. Each code
    has a `message` saying what to do about it; `result_summary` counts a batch's codes.
    """

    message: str

    def __new__(cls, value: int, message: str) -> "Result":
        member = int.__new__(cls, value)
        member._value_ = value
        member.message = message
        return member

    CONVERGED = 0, "The iteration met the tolerance."
    MAX_STEPS = 1, (
        "The iteration reached max_steps (or the step budget) before meeting the "
        "tolerance. Raise max_steps, loosen atol/rtol, or use a faster solver."
    )
    DIVERGED = 2, (
        "The residual became NaN or infinite; the value is the last finite iterate. "
        "Check f for overflow, lower the damping or the learning rate, or use a higher "
        "precision."
    )


def result_summary(result: ArrayLike) -> str:
    """Count the codes of a (batched) result: e.g. `"CONVERGED: 14, MAX_STEPS: 2"`.

    Takes `sol.result` or `BackwardStats.result_codes()` outside `jit` (it reads the
    values); codes that do not occur are left out.
    """
    codes = np.asarray(result).astype(np.int64).ravel()
    return summary_of_counts([int(np.sum(codes == code)) for code in Result])


def summary_of_counts(counts: Any) -> str:
    """`result_summary` from the number of samples with each code, in code order."""
    return ", ".join(f"{code.name}: {int(count)}" for code, count in zip(Result, counts)
                     if count)


class Stats(eqx.Module):
    """Per-solve statistics, in at least float32 whatever the state's dtype.

    **Fields:**

    - `steps`: number of solver steps taken (not counting the initial evaluation).
    - `abs_err`: `‖f(z) − z‖₂` at the returned iterate.
    - `rel_err`: `‖f(z) − z‖₂ / ‖f(z)‖₂` at the returned iterate.

    In batch mode each field has one entry per sample.
    """

    steps: Int[Array, "*batch"]
    abs_err: Float[Array, "*batch"]
    rel_err: Float[Array, "*batch"]


class Solution(eqx.Module):
    """The result of an adjoint call.

    **Fields:**

    - `value`: the fixed point, with the structure of `x0`; it carries gradients
        according to the adjoint.
    - `result`: an int32 `Result` code (an array of them, one per sample, in batch
        mode).
    - `stats`: a `Stats`.
    - `trace`: the final accumulator of the `trace` fold, or `None`.
    """

    value: Any
    result: Int[Array, "*batch"]
    stats: Stats
    trace: Any


class BackwardStats(eqx.Module):
    """How the backward solve of a gradient ended, delivered as a gradient.

    A backward solve runs inside `jax.grad`, where nothing can be returned but
    cotangents. So pass a *probe* to the call, `adjoint(f, x0,
    backward_probe=BackwardStats.probe())`, and differentiate with respect to it too:
    its "gradient" is the `BackwardStats` of that call's backward solve, inside `jit`
    and per sample in batch mode (`probe(batch_size=B)`). The probe's value is never
    read; use one probe per adjoint call (two calls sharing one would add up).

    **Fields** (float32, since cotangents are floating point):

    - `steps`: the backward solver's steps (for `NeumannPhantom` its `K` terms, for
        `UnrollPhantom` its `K` unrolled steps).
    - `abs_err`: `‖ḡ + Jᵀλ − λ‖₂`, the residual of `λ` in `(I − Jᵀ) λ = ḡ`.
    - `rel_err`: `abs_err / ‖ḡ + Jᵀλ‖₂`.
    - `result`: the `Result` code as a float; `result_codes()` gives the int32 codes.

    All zero (0 steps, CONVERGED) for an adjoint that solves nothing backwards (JFB,
    GDEQ, BPTT), and when the loss does not depend on the solution.
    """

    steps: Float[Array, "*batch"]
    abs_err: Float[Array, "*batch"]
    rel_err: Float[Array, "*batch"]
    result: Float[Array, "*batch"]

    @classmethod
    def probe(cls, batch_size: int | None = None) -> "BackwardStats":
        """Zeros of shape `()`, or `(batch_size,)` for a call in batch mode."""
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
            or batch_size < 1
        ):
            raise ValueError(
                f"batch_size must be None or an int >= 1 (the number of samples of a "
                f"batch-mode call), got {batch_size!r}."
            )
        shape = () if batch_size is None else (int(batch_size),)
        zero = jnp.zeros(shape, jnp.float32)
        return cls(steps=zero, abs_err=zero, rel_err=zero, result=zero)

    def result_codes(self) -> Int[Array, "*batch"]:
        """`result` as int32 `Result` codes: compare with `== Result.CONVERGED`."""
        return jnp.round(self.result).astype(jnp.int32)

    @classmethod
    def from_flat(cls, result: Int[Array, " batch"], stats: Stats) -> "BackwardStats":
        """The per-sample float32 form of a flat solve's `(result, stats)`."""
        as32 = lambda x: jnp.asarray(x).astype(jnp.float32)  # noqa: E731
        return cls(
            steps=as32(stats.steps), abs_err=as32(stats.abs_err),
            rel_err=as32(stats.rel_err), result=as32(result),
        )


class FlatSolution(eqx.Module):
    """A solve on the flat `(B, N)` state: what adjoints work with.

    `result` and the `stats` fields have shape `(B,)`; `state` is the solver's final
    state (e.g. Broyden's inverse-Jacobian factors).
    """

    z: FlatState
    fz: FlatState
    state: Any
    result: Int[Array, " batch"]
    stats: Stats
    trace: Any
