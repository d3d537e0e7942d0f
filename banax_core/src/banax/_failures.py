"""How failed solves are reported: warnings and errors from inside `jit`, a summary of
a run's outcomes, and skipping an update that a failed solve would spoil.

A solve runs inside compiled code, so its outcome is an array the host never sees.
Failures reach the user by a host callback (`jax.debug.callback` under a `lax.cond`,
so that nothing leaves the device while every solve succeeds) or, with
`on_failure="raise"`, by `eqx.error_if`. A warning's text is fixed per adjoint and
per direction and is attributed to the user's line that traced the call, so that
Python's default filter shows it once per call site; the counts go to
`solve_summary()`.
"""

import contextlib
import dataclasses
import functools
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree

from ._solution import Result, Solution

ON_FAILURE = ("raise", "warn", "ignore")


class ForwardSolveWarning(UserWarning):
    """A forward solve diverged (its residual became NaN or infinite) for some samples
    (`on_failure="warn"`): their value is the last finite iterate, and the gradient of
    that step is unreliable."""


class BackwardSolveWarning(UserWarning):
    """A backward solve ended without converging (`on_failure="warn"`): the gradient of
    that step is unreliable."""


# Modules whose frames are not the user's call site.
_LIBRARIES = ("banax", "jax", "jaxlib", "equinox", "optax", "lineax", "optimistix",
              "jaxtyping", "typeguard", "beartype", "contextlib", "functools")


@dataclasses.dataclass(frozen=True)
class CallSite:
    """The user's line that traced a solve: where its warnings point."""

    filename: str
    lineno: int
    module: str

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"


def call_site() -> CallSite:
    """The innermost frame outside banax, its plugins and the JAX libraries."""
    frame = sys._getframe(1)
    last = frame
    while frame is not None:
        top = frame.f_globals.get("__name__", "").split(".")[0]
        if top not in _LIBRARIES and not top.startswith("banax_"):
            break
        last = frame
        frame = frame.f_back
    frame = frame or last
    return CallSite(frame.f_code.co_filename, frame.f_lineno,
                    frame.f_globals.get("__name__", "__main__"))


class SolveSummary:
    """The outcomes of the solves that ran while `banax.solve_summary()` was active,
    per call site and direction: how many samples ended with each `Result` code.

    `counts[(site, "forward")]` is an int64 array indexed by `Result`; `share(code)`
    the fraction of forward samples (over all sites) that ended with `code`, e.g.
    `summary.share(banax.Result.MAX_STEPS)`; `str(summary)` one line per site.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[CallSite, str], np.ndarray] = {}

    def add(self, site: CallSite, direction: str, counts: np.ndarray) -> None:
        key = (site, direction)
        self.counts[key] = self.counts.get(key, 0) + counts

    def total(self, direction: str = "forward") -> np.ndarray:
        """The counts of every call site together, indexed by `Result`."""
        jax.effects_barrier()
        total = np.zeros(len(Result), np.int64)
        for (_, kind), counts in self.counts.items():
            if kind == direction:
                total = total + counts
        return total

    def share(self, code: Result, direction: str = "forward") -> float:
        """The fraction of `direction`'s samples that ended with `code` (0 if none ran)."""
        total = self.total(direction)
        return float(total[int(code)] / total.sum()) if total.sum() else 0.0

    def __str__(self) -> str:
        jax.effects_barrier()
        lines = []
        for (site, direction), counts in sorted(self.counts.items(), key=str):
            shares = ", ".join(
                f"{code.name} {100 * int(n) / counts.sum():.1f}%"
                for code, n in zip(Result, counts) if n
            )
            lines.append(f"{site} {direction}: {int(counts.sum())} samples: {shares}")
        return "\n".join(lines) or "no solve recorded"


_ACTIVE: list[SolveSummary] = []


@dataclasses.dataclass(frozen=True)
class Context:
    """What a solve's reports need from trace time: the user's call site, and whether
    a summary was recording. Static (hashable), so that a compiled solve is traced
    again for another call site or once a summary opens."""

    site: CallSite
    recording: bool


def context() -> Context:
    """The reporting context of a call traced now (from inside banax)."""
    return Context(call_site(), bool(_ACTIVE))


# The context of the adjoint call being traced, for the backward rule it attaches.
_TRACING: list[Context] = []


@contextlib.contextmanager
def tracing(ctx: Context) -> Iterator[None]:
    """Make `ctx` the context of the solves traced inside the block."""
    _TRACING.append(ctx)
    try:
        yield
    finally:
        _TRACING.pop()


def current() -> Context:
    """The context of the adjoint call being traced; a fresh one outside any."""
    return _TRACING[-1] if _TRACING else context()


@contextlib.contextmanager
def solve_summary() -> Iterator[SolveSummary]:
    """Count the outcome of every forward and backward solve while active.

    Solves traced inside the block report every call to the host (one callback per
    call, a small cost), so that the share of samples that stopped at `MAX_STEPS` is
    known; solves traced before it report only their failures. Open it before the
    training step is first called (`jit` caches the trace):

        with banax.solve_summary() as summary:
            for batch in batches:
                model, opt_state = step(model, opt_state, *batch)
        print(summary)
    """
    summary = SolveSummary()
    _ACTIVE.append(summary)
    try:
        yield summary
    finally:
        jax.effects_barrier()
        _ACTIVE.remove(summary)


# One warnings registry per file, so that Python's default filter shows each warning
# once per call site (`warn_explicit` with no registry would show it every time).
_REGISTRIES: dict[str, dict[Any, Any]] = {}

_ADVICE = {
    "forward": (
        "the forward solve diverged (a NaN or infinite residual) for some samples; "
        "their value is the last finite iterate and the gradient of this step is "
        "unreliable. Check the inputs for NaN/inf and the cell for overflow, lower the "
        "learning rate, and skip such an update (banax.step_failed with banax.skip_if), "
        "or pass on_failure='raise' to stop here. sol.result flags the samples; "
        "banax.solve_summary() counts them over a run."
    ),
    "backward": (
        "the backward solve did not converge for some samples; the gradient of this "
        "step is unreliable. Give the backward solver more steps (b_solver max_steps or "
        "a larger backward_budget), try a Krylov b_solver (lineax.BiCGStab first; "
        "GMRES is far slower), or pass on_failure='raise' to stop here. A "
        "backward_probe reports the steps, residuals and codes; banax.solve_summary() "
        "counts them over a run."
    ),
}

_CATEGORY = {"forward": ForwardSolveWarning, "backward": BackwardSolveWarning}


def _failed(direction: str, codes: Int[Array, "*batch"]) -> Bool[Array, "*batch"]:
    """A forward sample fails when it diverged (MAX_STEPS is a budgeted outcome);
    a backward one unless it converged."""
    if direction == "forward":
        return codes == Result.DIVERGED
    return codes != Result.CONVERGED


def report(direction: str, name: str, on_failure: str, codes: Int[Array, "*batch"],
           outputs: Any, ctx: Context, advice: str | None = None) -> Any:
    """Apply `on_failure` to the result codes of a solve and return `outputs` (routed
    through `eqx.error_if` for `"raise"`). `advice` replaces the generic text of the
    message, for an adjoint whose failures have a cause of their own."""
    site, recording = ctx.site, ctx.recording
    failed = jnp.any(_failed(direction, codes))
    message = f"{name}: {advice or _ADVICE[direction]}"
    if on_failure == "raise" and jax.tree.leaves(outputs):
        outputs = _raising(outputs, failed, message)
    warn = on_failure == "warn"
    if not (warn or recording):
        return outputs
    # The host gets the count of each code, not the codes: a batch sharded over
    # devices would otherwise be gathered onto one device for the callback.
    counts = jnp.stack([jnp.sum(codes == code) for code in Result])

    def callback(counts: Any) -> None:
        # Under vmap the cond runs both branches and the counts gain batch axes:
        # add them up and look again.
        counts = np.asarray(counts).reshape(-1, len(Result)).sum(0).astype(np.int64)
        if recording:
            for summary in _ACTIVE:
                summary.add(site, direction, counts)
        bad = counts[Result.DIVERGED] if direction == "forward" else (
            counts.sum() - counts[Result.CONVERGED])
        if warn and bad:
            warnings.warn_explicit(
                message, _CATEGORY[direction], site.filename, site.lineno, site.module,
                _REGISTRIES.setdefault(site.filename, {}),
            )

    if recording:
        jax.debug.callback(callback, counts)
    else:
        jax.lax.cond(failed, lambda: jax.debug.callback(callback, counts), lambda: None)
    return outputs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _raising(x: PyTree, failed: Bool[Array, ""], message: str) -> PyTree:
    """`eqx.error_if(x, failed, message)`, on the cotangent of `x` too: when only
    the gradient of a computation is kept, its value (and a check on it alone) is
    dead code that the compiler removes."""
    return eqx.error_if(x, failed, message)


def _raising_fwd(x: PyTree, failed: Bool[Array, ""], message: str) -> Any:
    return _raising(x, failed, message), failed


def _raising_bwd(message: str, failed: Bool[Array, ""], g: PyTree) -> Any:
    return eqx.error_if(g, failed, message), None


_raising.defvjp(_raising_fwd, _raising_bwd)


def report_forward(adjoint: Any, solution: Solution, ctx: Context) -> Solution:
    """`report` for a forward `Solution` under `adjoint.on_failure`."""
    value = report("forward", type(adjoint).__name__, adjoint.on_failure,
                   solution.result, solution.value, ctx)
    return dataclasses.replace(solution, value=value)


def step_failed(*checked: Any) -> Bool[Array, ""]:
    """Whether a training step failed: some sample of a `Solution` among `checked`
    diverged, or some array of the other arguments (a loss, gradients) is not finite.

    With `skip_if`, this keeps the parameters and the optimizer's state as they were
    when a batch poisons the step (a NaN or infinite input, an overflowing cell).
    `optax.apply_if_finite` covers the non-finite gradients alone; a forward solve
    that diverged returns its last finite iterate, whose gradient may be finite yet
    meaningless, so check the `Solution` too.
    """
    flags = [jnp.asarray(False)]
    for item in checked:
        if isinstance(item, Solution):
            flags.append(jnp.any(item.result == Result.DIVERGED))
        else:
            flags += [~jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(item)
                      if eqx.is_inexact_array(a)]
    return jnp.any(jnp.stack(flags))


def skip_if(failed: Bool[Array, ""], new: PyTree, old: PyTree) -> PyTree:
    """`old` where `failed`, else `new`, array by array (other leaves from `new`):
    e.g. `(model, opt_state) = skip_if(failed, (new_model, new_opt_state), (model,
    opt_state))`."""
    new_arrays, static = eqx.partition(new, eqx.is_array)
    old_arrays = eqx.filter(old, eqx.is_array)
    kept = jax.tree.map(lambda n, o: jnp.where(failed, o, n), new_arrays, old_arrays)
    return eqx.combine(kept, static)
