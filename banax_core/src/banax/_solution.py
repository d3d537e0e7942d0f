"""What a solve returns: `Solution`, its `Stats` and its `Result` code."""

from typing import Any

import equinox as eqx
from jaxtyping import Array, Float, Int


class Result(eqx.Enumeration):
    """How a solve ended. Compare with `sol.result == Result.CONVERGED`.

    In batch mode the result is per sample (an array of codes).
    """

    CONVERGED = "The iteration met the tolerance."
    MAX_STEPS = (
        "The iteration reached max_steps (or the step budget) before meeting the "
        "tolerance. Raise max_steps, loosen atol/rtol, or use a faster solver."
    )
    DIVERGED = (
        "The residual became NaN or infinite. Check f for overflow, lower the damping "
        "or the learning rate, or use a higher precision."
    )


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
    - `result`: a `Result` code (per sample in batch mode).
    - `stats`: a `Stats`.
    - `trace`: the final accumulator of the `trace` fold, or `None`.
    """

    value: Any
    result: Result
    stats: Stats
    trace: Any
