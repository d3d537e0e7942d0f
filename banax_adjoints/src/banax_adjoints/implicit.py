"""The implicit-function-theorem adjoint."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

import banax
from banax.extend import (
    AbstractLinearSolveAdjoint,
    AbstractSolver,
    FlagOption,
    FlatSolution,
    LowRankInverseJacobian,
    check_flag,
    check_real,
    residual_norms,
    solve_flat,
)

from ._backward import real_form, widened
from ._validation import check_solver


class Implicit(AbstractLinearSolveAdjoint):
    """Exact gradient at the fixed point by the implicit function theorem.

    At `z* = f(z*, θ)` the gradient of a loss `L(z*)` is `θ̄ = (∂f/∂θ)ᵀ λ` where `λ`
    solves the backward linear system

        (I − Jᵀ) λ = ḡ,   J = ∂f/∂z at z*,   ḡ = ∂L/∂z*.

    The system is solved matrix-free (only `v ↦ Jᵀv`, one VJP of `f` each) by
    `b_solver`, then one VJP gives `θ̄`. The forward iterations are never
    differentiated, so memory does not depend on `max_steps` and the forward solver may
    use any `loop_kind` (`"lax"` is cheapest). `x0` gets no gradient: the fixed point
    does not depend on it.

    `b_solver` is either:

    - a banax solver, run on the fixed-point form `λ = ḡ + Jᵀλ` starting from `ḡ`
      (e.g. `Picard(rtol=1e-8)`; `Anderson` for faster convergence). Each step costs
      one VJP, and fixed-point iteration needs many steps when the spectral radius of
      `J` is close to 1. The call's `backward_budget` caps its steps at run time; or
    - a lineax linear solver applied to the operator `v ↦ v − Jᵀv`, such as
      `lineax.GMRES(rtol=1e-6, atol=1e-6)` or `lineax.BiCGStab(...)`. Krylov methods
      need far fewer VJPs than fixed-point iteration on ill-conditioned systems.
      (`lineax.CG` needs a symmetric positive-definite operator, which `I − Jᵀ`
      generally is not.) It runs with `throw=False` and reports lineax's own result
      and `num_steps`; its `max_steps` is fixed at compile time, so it takes no
      `backward_budget`.

    Left out, `b_solver` defaults to the forward solver itself (its class and options)
    with `loop_kind="lax"` and `keep_best=False`: `Jᵀ` has the eigenvalues of `J`, so
    the backward iteration contracts like the forward one did, and the gradient is
    as accurate as the forward's tolerance allows. How the backward solve ended is
    reported to a `backward_probe` and handled by `on_failure` (see
    `banax.extend.AbstractBackwardRuleAdjoint`).

    The gradient is only as good as the forward fixed point: if the forward solve
    stopped far from `z*`, prefer `BPTT`, which differentiates what actually ran.
    In batch mode the system is block-diagonal (one block per sample); a banax
    `b_solver` stops per sample, a lineax one solves the whole batch at once. Either
    way the VJPs run once over the whole batch.

    **Warm start (SHINE).** When the forward solver keeps a low-rank estimate
    `(I − J)⁻¹ ≈ I + Uᵀ V` (`banax.extend.LowRankInverseJacobian`, e.g. Broyden), its
    transpose gives the backward solve a starting point, `λ₀ = ḡ + Vᵀ (U ḡ)` (Ramzi et al., ICLR
    2022), which a banax `b_solver` then refines to its own tolerance: the gradient is
    as exact as from `λ₀ = ḡ`. It saves VJPs only where the estimate is good along
    `ḡ`, not just along the forward steps; on the `banax bench` problem it saved none
    (30.1 against 30.3 mean backward steps; `benchmarks/warm_start.py`), hence off by
    default. Other forward solvers (and lineax `b_solver`s) start from `ḡ`.

    **Arguments:**

    - `solver`: the forward solver.
    - `b_solver`: the backward solver (see above); default: the forward solver's.
    - `warm_start`: start a banax `b_solver` from the forward's inverse-Jacobian
        estimate when it has one (see above). Default False.
    - `on_failure`: `"warn"` (default), `"raise"` or `"ignore"` when the backward
        solve does not converge.
    """

    solver: AbstractSolver
    b_solver: AbstractSolver | lx.AbstractLinearSolver | None = None
    warm_start: FlagOption = eqx.field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        if self.b_solver is None and isinstance(self.solver, AbstractSolver):
            self.b_solver = eqx.tree_at(
                lambda s: (s.loop_kind, s.keep_best), self.solver, ("lax", False)
            )

    @property
    def takes_backward_budget(self) -> bool:
        return isinstance(self.b_solver, AbstractSolver)

    def __check_init__(self) -> None:
        check_solver("Implicit", "solver", self.solver)
        check_flag(self, "warm_start", self.warm_start)
        if not isinstance(self.b_solver, (AbstractSolver, lx.AbstractLinearSolver)):
            raise TypeError(
                "Implicit: b_solver must be a banax.Solver (e.g. "
                "banax.get_solver('picard', rtol=1e-8)) or a lineax linear solver (e.g. "
                f"lineax.GMRES(rtol=1e-6, atol=1e-6)), got {self.b_solver!r}."
            )
        if isinstance(self.b_solver, lx.AbstractLinearSolver):
            # lineax does not validate its tolerances: a NaN one never stops the solve.
            for option in ("rtol", "atol"):
                if hasattr(self.b_solver, option):
                    check_real(
                        f"Implicit: b_solver {type(self.b_solver).__name__}", option,
                        getattr(self.b_solver, option), low=0.0,
                    )

    def adjoint_solve(
        self,
        vjp: Callable[[jax.Array], jax.Array],
        g: jax.Array,
        forward: FlatSolution,
        budget: jax.Array | None,
    ) -> tuple[jax.Array, banax.BackwardStats]:
        vjp, g = widened(vjp, g)
        if isinstance(self.b_solver, AbstractSolver):
            lam0 = self._initial_guess(g, forward)
            sol = solve_flat(self.b_solver, lambda lam: g + vjp(lam), lam0, budget)
            return sol.z, banax.BackwardStats.from_flat(sol.result, sol.stats)
        assert self.b_solver is not None  # filled in by __post_init__, checked at __check_init__
        # Complex states in real form: f's VJP may be only real-linear.
        vjp_r, g_r, back = real_form(vjp, g)
        operator = lx.FunctionLinearOperator(
            lambda v: v - vjp_r(v), jax.eval_shape(lambda: g_r)
        )
        sol = lx.linear_solve(operator, g_r, self.b_solver, throw=False)
        lam = back(sol.value)
        # lineax solves the whole batch as one system: one result and step count.
        abs_err, rel_err = residual_norms(lam, g + vjp(lam))
        ended = lambda r: jnp.broadcast_to(sol.result == r, abs_err.shape)  # noqa: E731
        code = jnp.select(
            [~jnp.isfinite(abs_err), ended(lx.RESULTS.successful),
             ended(lx.RESULTS.max_steps_reached)],
            [banax.Result.DIVERGED, banax.Result.CONVERGED, banax.Result.MAX_STEPS],
            banax.Result.DIVERGED,
        )
        steps = jnp.broadcast_to(jnp.asarray(sol.stats.get("num_steps", 0)), code.shape)
        stats = banax.Stats(steps=steps, abs_err=abs_err, rel_err=rel_err)
        return lam, banax.BackwardStats.from_flat(code, stats)

    def _initial_guess(self, g: jax.Array, forward: FlatSolution) -> jax.Array:
        """`ḡ + Vᵀ (U ḡ)` per sample from the forward's `(I − J)⁻¹ ≈ I + Uᵀ V`, or `ḡ`."""
        if not (self.warm_start and isinstance(self.solver, LowRankInverseJacobian)):
            return g
        return self.solver.inverse_jacobian_vjp(forward.state, g)
