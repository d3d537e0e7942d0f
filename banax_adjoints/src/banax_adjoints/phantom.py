"""Phantom gradients: the implicit gradient truncated after a few relaxed steps.

Both phantoms rest on the relaxed map `f_β(z) = (1 − β) z + β f(z)`, which has the
same fixed point as `f` and Jacobian `J_β = (1 − β) I + β J`. Since
`I − J_β = β (I − J)`, the implicit gradient's inverse expands as

    (I − J)⁻¹ = β Σ_{k≥0} J_β^k,

and a phantom gradient keeps the first `K` terms. `K = 1`, `β = 1` is `JFB`; the
truncation error shrinks like `ρ(J_β)^K`, so more steps approach `Implicit`. Both read
`K` (and the step) from their `b_solver`, by default `Picard(max_steps=5)`: five plain
steps. The call's `backward_budget` lowers `K` at run time.
"""

from collections.abc import Callable
from typing import Any

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int

import banax
from banax.extend import (
    AbstractBackwardRuleAdjoint,
    AbstractLinearSolveAdjoint,
    AbstractSolver,
    FlatSolution,
    Problem,
    check_real,
    residual_norms,
)

from ._backward import widened
from ._validation import check_differentiable_step, check_solver


def _check_damp(adjoint: str, damp: float, source: str) -> None:
    check_real(
        adjoint, source, damp, low=0, high=1, low_open=True,
        why="; it weighs f in the relaxed step (1 − damp) z + damp f(z), and damp=1 is "
            "the plain step",
    )


def _default_b_solver() -> AbstractSolver:
    return banax.get_solver("picard", max_steps=5)


def _terms(b_solver: AbstractSolver, budget: jax.Array | None) -> Any:
    """`K`: `b_solver.max_steps`, lowered to the call's backward budget if any."""
    if budget is None:
        return b_solver.max_steps
    return jnp.clip(budget, 0, b_solver.max_steps)


def _report(steps: Any, abs_err: jax.Array, rel_err: jax.Array) -> banax.BackwardStats:
    """A phantom's report: its `K` steps, and CONVERGED unless it overflowed, since the
    truncation is the method, not a failure."""
    result = jnp.where(jnp.isfinite(abs_err), banax.Result.CONVERGED, banax.Result.DIVERGED)
    steps = jnp.broadcast_to(jnp.asarray(steps), abs_err.shape)
    return banax.BackwardStats.from_flat(
        result, banax.Stats(steps=steps, abs_err=abs_err, rel_err=rel_err)
    )


class UnrollPhantom(AbstractBackwardRuleAdjoint):
    """Unrolled phantom gradient: backpropagate through `K` steps of `b_solver` from
    `z*`.

    Starting from the forward solver's fixed point `z₀ = z*` (not differentiated), run
    `b_solver`'s own iteration (its `init` and `step`) for exactly `K =
    b_solver.max_steps` steps, ignoring its tolerances, and use `∂z_K/∂θ` as the
    gradient of `z*`. With `Relaxed(damp=β)` the steps are `z_{k+1} = (1 − β) z_k + β
    f(z_k, θ)`, and at an exact fixed point the gradient equals `(∂f/∂θ)ᵀ β Σ_{k<K}
    (J_βᵀ)^k ḡ` (see the module docstring); with `Picard` it is `β = 1`; any solver
    with a differentiable step works (Anderson's unroll differentiates its mixing
    too). When `z*` is inexact the unroll also accounts for the steps still moving.
    The value returned is exactly the forward solver's `z*`; only the gradient comes
    from the unroll.

    `b_solver.loop_kind` sets the unroll's memory: `"checkpointed"` stores about
    `√(2K)` states and recomputes the rest (and stops at a smaller backward budget);
    `"lax"` and `"bounded"` unroll a scan of `K` steps that stores them all (steps past
    a backward budget are computed and discarded).

    Cost: `K + 1` evaluations and `K + 1` VJPs of `f`, all in the backward pass;
    memory independent of the forward solver's `max_steps`. Biased for finite `K`;
    one `Picard` step is JFB. A poor choice when the spectral radius of `J` is close to
    1 (many steps needed); use `Implicit` with a Krylov `b_solver` then. The
    `backward_probe` receives `K` as steps and the residual `‖f(z_K) − z_K‖` at the
    end of the unroll.

    **Arguments:**

    - `solver`: the forward solver (any `loop_kind`).
    - `b_solver`: the solver whose `K = max_steps` steps are unrolled; its step must
        be differentiable. Default `Picard(max_steps=5)`.
    - `on_failure`: see `banax.extend.AbstractBackwardRuleAdjoint` (the unroll fails
        only when it overflows).
    """

    solver: AbstractSolver
    b_solver: banax.Solver = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.b_solver is None:
            # Equinox lets __post_init__ set fields of its frozen dataclass.
            self.b_solver = _default_b_solver()  # pyright: ignore[reportAttributeAccessIssue]

    def __check_init__(self) -> None:
        check_solver("UnrollPhantom", "solver", self.solver)
        # The unroll runs the b_solver's own init and step.
        check_solver("UnrollPhantom", "b_solver", self.b_solver, stepwise=True)
        check_differentiable_step("UnrollPhantom", self.b_solver)

    @property
    def takes_backward_budget(self) -> bool:
        return True

    def backward(
        self, problem: Problem, forward: FlatSolution, g: jax.Array
    ) -> tuple[Any, None, banax.BackwardStats]:
        params, f_with = problem.parameters()
        b_solver = self.b_solver
        steps = _terms(b_solver, problem.backward_budget)

        def unroll(p: Any) -> tuple[jax.Array, jax.Array]:
            fn = f_with(p)

            def f(z: jax.Array, trace: Any, tag: str | None = None) -> tuple:
                return fn(z), trace

            def body(carry: tuple) -> tuple:
                k, z, fz, state = carry
                z, fz, state, _ = b_solver.step(f, z, fz, state, None)
                return k + 1, z, fz, state

            z, fz = forward.z, fn(forward.z)
            init = (jnp.asarray(0), z, fz, b_solver.init(z, fz))
            if b_solver.loop_kind == "checkpointed":
                _, z, fz, _ = eqxi.while_loop(
                    lambda carry: carry[0] < steps, body, init,
                    max_steps=b_solver.max_steps, kind="checkpointed",
                )
                return z, fz

            # A scan of K steps stores them all, and nothing more (a bounded loop would
            # pad to its 16-step base); steps past a budget keep the carry.
            def masked(carry: tuple, _: None) -> tuple[tuple, None]:
                new = body(carry)
                return jax.tree.map(
                    lambda a, b: jnp.where(carry[0] < steps, a, b), new, carry
                ), None

            (_, z, fz, _), _ = jax.lax.scan(masked, init, None, length=b_solver.max_steps)
            return z, fz

        (z, fz), vjp = jax.vjp(unroll, params)
        (p_bar,) = vjp((g, jax.tree.map(jnp.zeros_like, fz)))
        return p_bar, None, _report(steps, *residual_norms(z, fz))


class NeumannPhantom(AbstractLinearSolveAdjoint):
    """Neumann-series phantom gradient: the implicit gradient with `(I − J)⁻ᵀ`
    truncated to `K` terms.

        λ = β Σ_{k=0}^{K−1} (J_βᵀ)^k ḡ,   J_β = (1 − β) I + β J,   θ̄ = (∂f/∂θ)ᵀ λ,

    all evaluated at the forward solver's `z*` (see the module docstring). The terms
    are read off `b_solver`: `K = b_solver.max_steps` and `β = b_solver.damp` if it has
    such an option (e.g. `Relaxed`), else `β = 1`; its tolerances and loop kind are not
    used, since the series always has `K` terms. This is what running a relaxed
    fixed-point iteration on `λ = ḡ + Jᵀλ` from 0 for `K` steps would give.

    Cost: `K − 1` VJPs of `f` plus one for the parameters; memory independent of
    `max_steps`. Biased for finite `K` (`K = 1, β = 1` is JFB). Like `UnrollPhantom` at
    an exact fixed point, but it never re-evaluates `f` away from `z*`. A poor choice
    when the spectral radius of `J` is close to 1; use `Implicit` then. The
    `backward_probe` receives `K` as steps and the residual `‖ḡ + Jᵀλ − λ‖` of `λ` in
    the backward system (one more VJP, computed only when the probe is read).

    **Arguments:**

    - `solver`: the forward solver (any `loop_kind`).
    - `b_solver`: a banax solver whose `max_steps` (and `damp`, if any) set the series.
        Default `Picard(max_steps=5)`.
    - `on_failure`: see `banax.extend.AbstractBackwardRuleAdjoint` (the series fails
        only when it overflows).
    """

    solver: AbstractSolver
    b_solver: AbstractSolver = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.b_solver is None:
            # Equinox lets __post_init__ set fields of its frozen dataclass.
            self.b_solver = _default_b_solver()  # pyright: ignore[reportAttributeAccessIssue]

    def __check_init__(self) -> None:
        check_solver("NeumannPhantom", "solver", self.solver)
        check_solver("NeumannPhantom", "b_solver", self.b_solver)
        _check_damp("NeumannPhantom", self.damp, "b_solver.damp")

    @property
    def takes_backward_budget(self) -> bool:
        return True

    @property
    def damp(self) -> float:
        """The relaxation `β` of the series, from `b_solver`."""
        return getattr(self.b_solver, "damp", 1.0)

    def adjoint_solve(
        self,
        vjp: Callable[[jax.Array], jax.Array],
        g: jax.Array,
        forward: FlatSolution,
        budget: jax.Array | None,
    ) -> tuple[jax.Array, banax.BackwardStats]:
        vjp, g = widened(vjp, g)
        beta = self.damp
        terms = _terms(self.b_solver, budget)

        def add_term(_: Int[Array, ""], carry: tuple[jax.Array, jax.Array]) -> tuple:
            term, total = carry
            term = (1 - beta) * term + beta * vjp(term)
            return term, total + term

        _, total = jax.lax.fori_loop(1, terms, add_term, (g, g))
        # A budget of 0 terms leaves λ = 0 (no gradient through the fixed point).
        lam = jnp.where(terms > 0, beta * total, 0).astype(g.dtype)
        return lam, _report(terms, *residual_norms(lam, g + vjp(lam)))
