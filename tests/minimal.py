"""The smallest solver and adjoint one can write against banax's public extension
points; the core's tests use them so that they do not depend on the plugins."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp

import banax


class Iterate(banax.Solver):
    """Plain iteration z ← f(z), written as a third party would."""

    def init(self, z0: Any, fz0: Any) -> None:
        return None

    def step(self, f, z, fz, state, trace):
        fz_next, trace = f(fz, trace)
        return fz, fz_next, state, trace


class Trial(banax.Solver):
    """Relaxed iteration that also evaluates one tagged trial point per step (like a
    line search), to exercise trace tags and extra evaluations."""

    def init(self, z0: Any, fz0: Any) -> None:
        return None

    def step(self, f, z, fz, state, trace):
        _, trace = f(0.5 * (z + fz), trace, tag="line_search")
        fz_next, trace = f(fz, trace)
        return fz, fz_next, state, trace


class Counter(banax.Solver):
    """Plain iteration that keeps a per-sample step count in its state."""

    def init(self, z0: Any, fz0: Any) -> Any:
        return jnp.zeros(z0.shape[:1], jnp.int32)

    def step(self, f, z, fz, state, trace):
        fz_next, trace = f(fz, trace)
        return fz, fz_next, state + 1, trace


class Direct(banax.Adjoint):
    """Differentiates straight through the loop (what BPTT does)."""

    solver: banax.Solver

    def solve(self, problem):
        return banax.extend.solve(self.solver, problem)


class DenseImplicit(banax.extend.AbstractLinearSolveAdjoint):
    """IFT gradient with λ from a fixed-point solve of λ = g + Jᵀλ."""

    solver: banax.Solver
    b_solver: banax.Solver = eqx.field(
        default_factory=lambda: Iterate(rtol=1e-12, max_steps=2000)
    )

    def adjoint_solve(self, vjp, g, forward, budget):
        return banax.extend.solve_flat(self.b_solver, lambda lam: g + vjp(lam), g, budget).z
