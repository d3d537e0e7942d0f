"""The solver bases and the capabilities a solver may advertise.

Every solver is an `AbstractSolver`: the shared options and the stopping test. It is
one of two kinds, and `banax.extend.solve` runs either:

- an `AbstractIterativeSolver` (the seed's `banax.solver.Solver`) supplies an initial
  state and a step, and banax's loop runs them;
- an `AbstractSolveCombinator` is made of whole solves of other solvers (such as
  `banax.solver.Fallback`) and supplies `run`, which solves through `banax.extend.solve`.
"""

import abc
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Inexact, Int

from ._layout import FlatState
from ._options import (
    FlagOption,
    IntOption,
    RealOption,
    check_choice,
    check_flag,
    check_integer,
    check_real,
    normalise_options,
)
from ._solution import FlatSolution

LoopKind = Literal["lax", "bounded", "checkpointed"]
LOOP_KINDS: tuple[LoopKind, ...] = ("lax", "bounded", "checkpointed")
MAX_STEPS_LIMIT = 2**31 - 1
SolverState = TypeVar("SolverState")


class AbstractSolver(eqx.Module):
    """What every fixed-point solver speaks: its shared options and its stopping test.

    Not subclassed directly: an iterative solver subclasses `AbstractIterativeSolver`
    (`banax.solver.Solver`), a solver made of whole solves `AbstractSolveCombinator`.

    **Shared options:**

    - `atol`: absolute tolerance on `‖f(z) − z‖₂`; `0.0` disables it.
    - `rtol`: relative tolerance on `‖f(z) − z‖₂ / ‖f(z)‖₂`; `0.0` disables it. The
        loop stops when either enabled test holds (or the residual is exactly zero).
    - `max_steps`: hard cap on the number of steps, fixed at compile time. Vary the
        depth at run time with the adjoint's `step_budget` instead.
    - `loop_kind`: `"lax"` (a `lax.while_loop`, cheapest, not reverse-differentiable),
        `"bounded"` (reverse-differentiable, memory grows with `max_steps`) or
        `"checkpointed"` (reverse-differentiable, recomputes to save memory). `BPTT`
        needs one of the last two.
    - `batch_axis`: `None`, or the axis of the state that indexes independent samples.
        Residuals, stopping, mixing and statistics are then per sample, while `f` is
        still called once on the whole batch. Converged samples are frozen.
    - `keep_best`: return each sample's lowest-residual iterate instead of the last.
    - `check_every`: test for convergence once every `check_every` steps (an int
        >= 1, default 1). On an accelerator the loop's condition is a round trip to
        the host, which dominates small solves; with `k > 1` the loop body runs `k`
        steps and masks those past a sample's stopping point or the step budget, so
        the result, `stats` and trace are those of `check_every=1`, at the price of up
        to `k − 1` wasted evaluations of `f` and a body `k` times larger to compile.
        On a CPU keep 1.

    **Precision.** Residuals and solver histories are kept in
    `banax.extend.working_dtype` of the state (float32 for float16/bfloat16), but the iterate
    is stored in the state's dtype, whose rounding leaves a relative residual of a
    fraction of its machine epsilon `ε`. A tolerance finer than that cannot be met: when
    every enabled test is below `banax.reachable_tolerances(dtype, N)` — `rtol < ε`,
    `atol < ε √N` for `N` entries of order one per sample (bfloat16: `ε = 2⁻⁷ ≈ 0.0078`;
    float16: `9.8e-4`; float32: `1.2e-7`) — the loop warns with a
    `banax.BanaxPrecisionWarning` at trace time, naming the reachable values. Nothing is
    clamped: the solve runs as asked.

    **Complex states** (complex64/complex128) work with Picard, Relaxed, Anderson and
    Broyden: inner products are Hermitian (`⟨a, b⟩ = Σ conj(a) b`) and residuals use
    `|·|²`, with real float32/float64 statistics.
    """

    atol: RealOption = eqx.field(default=0.0, kw_only=True)
    rtol: RealOption = eqx.field(default=1e-5, kw_only=True)
    max_steps: IntOption = eqx.field(default=50, kw_only=True)
    loop_kind: LoopKind = eqx.field(default="lax", kw_only=True)
    batch_axis: IntOption | None = eqx.field(default=None, kw_only=True)
    keep_best: FlagOption = eqx.field(default=False, kw_only=True)
    check_every: IntOption = eqx.field(default=1, kw_only=True)

    def __check_init__(self) -> None:
        # Runs after the subclasses' checks (Equinox walks the MRO from the subclass),
        # which therefore use the `banax.extend.check_*` functions that accept NumPy scalars.
        normalise_options(self)
        for option in ("atol", "rtol"):
            check_real(self, option, getattr(self, option), low=0, why="; 0.0 disables it")
        # Steps are counted in int32 (the statistics' dtype, with or without x64).
        check_integer(
            self, "max_steps", self.max_steps, minimum=1, maximum=MAX_STEPS_LIMIT,
            why=". To vary the depth at run time pass step_budget=jnp.array(k) to the "
                "adjoint call",
        )
        check_choice(self, "loop_kind", self.loop_kind, LOOP_KINDS)
        check_integer(self, "batch_axis", self.batch_axis, minimum=0, allow_none=True)
        check_flag(self, "keep_best", self.keep_best)
        check_integer(self, "check_every", self.check_every, minimum=1)

    @property
    def differentiable_step(self) -> bool:
        """Whether unrolling this solver's step (BPTT, reversible) gives gradients.

        Override to return False when the step contains a data-dependent inner loop,
        such as a line search; adjoints that differentiate the step then refuse it.
        """
        return True

    def meets_tolerance(
        self, abs_err: Float[Array, " batch"], rel_err: Float[Array, " batch"]
    ) -> Bool[Array, " batch"]:
        """The loop's per-sample stopping test: `‖f(z) − z‖ = 0`, or `≤ atol` when
        `atol > 0`, or `‖f(z) − z‖ / ‖f(z)‖ ≤ rtol` when `rtol > 0`. A step may call it to
        skip work (a line search) on samples that already stop the loop."""
        ok = abs_err == 0
        if self.atol > 0:
            ok = ok | (abs_err <= self.atol)
        if self.rtol > 0:
            ok = ok | (rel_err <= self.rtol)
        return ok


class AbstractIterativeSolver(AbstractSolver, Generic[SolverState]):
    """Base class of the solvers that banax's loop runs: an initial state and a step.

    The loop (stopping test, NaN guard, step budget, statistics, tracing, batch mode)
    belongs to banax; a solver supplies only `init` and `step`. The seed's name for
    this class is `banax.solver.Solver` (also `banax.Solver`).

    **Writing a solver.** Subclass, add your options as fields (with defaults), and
    implement `init` and `step`. Both see the state as a flat array `z` of shape
    `(B, N)`: `B` samples (1 outside batch mode) of `N` features. Reduce over the last
    axis for per-sample quantities, never over the first. Every non-scalar array in
    your state must be per-sample with the batch axis first (`(B, ...)`), so that the
    loop can freeze converged samples; quantities shared by all samples (a step
    counter) must be scalars. Call `f` as
    `fz, trace = f(z, trace)` and thread `trace` through; pass `tag="..."` at trial
    evaluations that are not iterates (e.g. line search).
    """

    @abc.abstractmethod
    def init(self, z0: FlatState, fz0: FlatState) -> SolverState:
        """The solver's state before the first step, given `z0` and `f(z0)`."""

    @abc.abstractmethod
    def step(
        self, f: Callable[..., tuple[FlatState, Any]], z: FlatState, fz: FlatState,
        state: SolverState, trace: Any,
    ) -> tuple[FlatState, FlatState, SolverState, Any]:
        """One iteration: from `(z, f(z), state)` to `(z', f(z'), state')`, with
        `f(z, trace, tag=None) -> (f(z), trace)` a `TracedFunction` or any callable of
        that form (adjoints' backward passes step with untraced functions).

        Must evaluate `f` at the new iterate (the loop uses `f(z')` for the residual and
        hands it to the next step), and return the threaded `trace`.
        """


Solver = AbstractIterativeSolver


class AbstractSolveCombinator(AbstractSolver):
    """Base class of the solvers made of whole solves of other solvers.

    Such a solver has no single step: `run` solves `z = f(z)` from `z0` by calling
    `banax.extend.solve` on other solvers (e.g. one after the other on the samples the
    first failed, as `banax.solver.Fallback` does) and combines their `FlatSolution`s.
    `banax.extend.solve` calls `run` for it, so every adjoint runs it like any solver.

    Its shared options describe the whole solve (read them off the inner solvers in
    `__init__`): `max_steps` caps the `step_budget` a call may give, `loop_kind` says
    whether the whole solve is reverse-differentiable, `batch_axis` is the inner
    solvers' common one. As it has no single step, it cannot take the inference
    settings of a `DEQ`, invert its step or expose inverse-Jacobian factors.
    """

    @abc.abstractmethod
    def run(
        self, f: Callable[..., tuple[FlatState, Any]], z0: FlatState, trace: Any,
        step_budget: Int[Array, ""] | None,
    ) -> FlatSolution:
        """Solve `z = f(z)` from `z0`, with `f(z, trace, tag=None) -> (f(z), trace)` a
        `TracedFunction` (or any callable of that form), threading `trace` and capping
        the steps of all the inner solves together at `step_budget` (an integer array,
        or `None`)."""


class LowRankInverseJacobian(eqx.Module):
    """Capability: the solver's state holds a low-rank estimate of `(I − J_f)⁻¹`.

    `inverse_jacobian_factors(state)` returns `(U, V)` with shapes `(B, m, N)` such
    that, for each sample `b`, `(I − J_f)⁻¹ ≈ I + U[b]ᵀ V[b]`. Adjoints such as GDEQ use it
    to precondition the backward pass without knowing which solver produced it.
    """

    @abc.abstractmethod
    def inverse_jacobian_factors(
        self, state: Any
    ) -> tuple[Float[Array, "batch rank features"], Float[Array, "batch rank features"]]:
        ...

    def inverse_jacobian_vjp(
        self, state: Any, g: Inexact[Array, "batch features"]
    ) -> Inexact[Array, "batch features"]:
        """`(I − J_f)⁻ᵀ g ≈ (I + Uᵀ V)ᵀ g = g + Vᵀ (U g)` for each sample, from the
        factors in `state`.

        Computed in `g`'s dtype (pass it in `banax.extend.working_dtype`), at the
        highest matmul precision, which keeps GPUs from rounding float32 operands to
        TF32. The transpose is a plain one, without conjugation, as JAX's VJP
        `v ↦ Jᵀ v` is for complex states too.
        """
        u, v = (a.astype(g.dtype) for a in self.inverse_jacobian_factors(state))
        highest = jax.lax.Precision.HIGHEST
        coefficients = jnp.einsum("bmn,bn->bm", u, g, precision=highest)
        return g + jnp.einsum("bm,bmn->bn", coefficients, v, precision=highest)


class InvertibleStep(eqx.Module):
    """Capability: the solver's step can be run backwards exactly.

    The step is viewed as a map `(z, state) -> (z', state')` that calls an untraced
    `f: (B, N) -> (B, N)`. `forward_map` must compute exactly the iterate and state that
    `step` computes, and for every state a solve of `recording()` produced (from `init`
    on), `inverse_map(f, *forward_map(f, z, state))` must give back `(z, state)`: bit
    for bit, or the adjoint's gradient drifts as the rewind amplifies the difference.
    The reversible adjoint runs its forward solve with `recording()` and then uses the
    pair to rebuild the trajectory backwards.

    `recording()` returns the solver set up to keep, during the solve, whatever the
    inverse needs beyond the final state (the reversible solver keeps the digits its
    fixed-point step drops: a few bits per element per step). The default keeps
    nothing: the solver itself.
    """

    def recording(self) -> "InvertibleStep":
        return self

    @abc.abstractmethod
    def forward_map(self, f: Any, z: FlatState, state: Any) -> tuple[FlatState, Any]:
        ...

    @abc.abstractmethod
    def inverse_map(self, f: Any, z: FlatState, state: Any) -> tuple[FlatState, Any]:
        ...
