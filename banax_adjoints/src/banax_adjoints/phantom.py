"""Phantom gradients: the implicit gradient truncated after a few relaxed steps.

Both phantoms rest on the relaxed map `f_β(z) = (1 − β) z + β f(z)`, which has the
same fixed point as `f` and Jacobian `J_β = (1 − β) I + β J`. Since
`I − J_β = β (I − J)`, the implicit gradient's inverse expands as

    (I − J)⁻¹ = β Σ_{k≥0} J_β^k,

and a phantom gradient keeps the first `K` terms. `K = 1`, `β = 1` is `JFB`; the
truncation error shrinks like `ρ(J_β)^K`, so more steps approach `Implicit`.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

import banax
from banax import FlatSolution, Problem

from ._backward import widened
from ._validation import check_solver


def _check_damp(adjoint: str, damp: float, source: str) -> None:
    banax.check_real(
        adjoint, source, damp, low=0, high=1, low_open=True,
        why="; it weighs f in the relaxed step (1 − damp) z + damp f(z), and damp=1 is "
            "the plain step",
    )


class UnrollPhantom(banax.BackwardRuleAdjoint):
    """Unrolled phantom gradient: backpropagate through a few relaxed steps from `z*`.

    Starting from the forward solver's fixed point `z₀ = z*` (not differentiated), run

        z_{k+1} = (1 − β) z_k + β f(z_k, θ),   k = 0 … K − 1,

    and use `∂z_K/∂θ` as the gradient of `z*`. The value returned is exactly the forward
    solver's `z*`; only the gradient comes from the unroll. At an exact fixed point this
    equals `(∂f/∂θ)ᵀ β Σ_{k<K} (J_βᵀ)^k ḡ` (see the module docstring); when `z*` is
    inexact, the unroll also accounts for the steps still moving.

    Cost: `K` evaluations and `K` VJPs of `f`, all in the backward pass. Memory: the `K`
    unrolled states, independent of the solver's `max_steps`. Biased for finite `K`;
    `n_steps=1, damp=1` is JFB. A poor choice when the spectral radius of `J` is close
    to 1 (many steps needed); use `Implicit` with a Krylov `b_solver` then.

    **Arguments:**

    - `solver`: the forward solver (any `loop_kind`).
    - `n_steps`: the number `K ≥ 1` of unrolled steps. Default 5.
    - `damp`: the relaxation `β` in (0, 1]. Default 1.0 (plain steps); values below 1
        help when `J` has eigenvalues near −1 or a spectral radius above 1 along some
        directions, and slow the series down otherwise.
    """

    solver: banax.Solver
    n_steps: int = eqx.field(default=5, kw_only=True)
    damp: float = eqx.field(default=1.0, kw_only=True)

    def __check_init__(self) -> None:
        check_solver("UnrollPhantom", "solver", self.solver)
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) \
                or self.n_steps < 1:
            raise ValueError(
                f"UnrollPhantom: n_steps must be an int >= 1, got {self.n_steps!r}."
            )
        _check_damp("UnrollPhantom", self.damp, "damp")

    def backward(
        self, problem: Problem, forward: FlatSolution, g: jax.Array
    ) -> tuple[Any, None]:
        params, f_with = problem.parameters()
        beta = self.damp

        def unroll(p: Any) -> jax.Array:
            f = f_with(p)

            def relaxed_step(z: jax.Array, _: None) -> tuple[jax.Array, None]:
                return ((1 - beta) * z + beta * f(z)).astype(z.dtype), None

            z, _ = jax.lax.scan(relaxed_step, forward.z, None, length=self.n_steps)
            return z

        _, vjp = jax.vjp(unroll, params)
        (p_bar,) = vjp(g)
        return p_bar, None


class NeumannPhantom(banax.LinearSolveAdjoint):
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
    when the spectral radius of `J` is close to 1; use `Implicit` then.

    **Arguments:**

    - `solver`: the forward solver (any `loop_kind`).
    - `b_solver`: a banax solver whose `max_steps` (and `damp`, if any) set the series.
    """

    solver: banax.Solver
    b_solver: banax.Solver

    def __check_init__(self) -> None:
        check_solver("NeumannPhantom", "solver", self.solver)
        check_solver("NeumannPhantom", "b_solver", self.b_solver)
        _check_damp("NeumannPhantom", self.damp, "b_solver.damp")

    @property
    def damp(self) -> float:
        """The relaxation `β` of the series, from `b_solver`."""
        return getattr(self.b_solver, "damp", 1.0)

    def adjoint_solve(
        self,
        vjp: Callable[[jax.Array], jax.Array],
        g: jax.Array,
        forward: FlatSolution,
    ) -> jax.Array:
        vjp, g = widened(vjp, g)
        beta = self.damp

        def add_term(_: int, carry: tuple[jax.Array, jax.Array]) -> tuple:
            term, total = carry
            term = (1 - beta) * term + beta * vjp(term)
            return term, total + term

        _, total = jax.lax.fori_loop(
            1, self.b_solver.max_steps, add_term, (g, g)
        )
        return beta * total
