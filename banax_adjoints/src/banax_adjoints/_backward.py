"""Pieces shared by the backward passes of the adjoints in this package.

- `BackwardRuleAdjoint`: the base of adjoints whose gradient is not of the linear-solve
  form `(∂f/∂θ)ᵀ λ` (the unrolled phantom gradient, the reversible adjoint). The forward
  solve runs untouched (any loop kind, nothing stored per step) and a custom VJP calls
  the subclass's `backward`.
- `parameters`: the arrays gradients flow to, and `f` as a function of them.
- `widened`: the backward linear system in at least float32.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp

import banax
from banax import FlatSolution, Problem

Params = Any
"""The inexact arrays of `problem.f.bound` (`None` elsewhere): what gradients reach."""


def parameters(problem: Problem) -> tuple[Params, Callable[[Params], Callable]]:
    """Split `f`'s parameters from the rest of it.

    Returns `(params, f_with)` where `f_with(p)` is the untraced flat map
    `(B, N) -> (B, N)` with parameters `p`: differentiate through `f_with` to get the
    cotangent of `params`. Parameters are the floating-point arrays in `f`'s positional
    and keyword arguments and inside `f` itself when it is an `eqx.Module`.
    """
    params, static = eqx.partition(problem.f.bound, eqx.is_inexact_array)

    def f_with(p: Params) -> Callable:
        return problem.f.with_bound(eqx.combine(p, static)).evaluate

    return params, f_with


def widened(
    vjp: Callable[[jax.Array], jax.Array], g: jax.Array
) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
    """`(vjp, g)` working in at least float32.

    A backward solve accumulates many products; in float16/bfloat16 it would stall far
    from its tolerance. The VJP itself still runs in the state's dtype.
    """
    wide = jnp.promote_types(g.dtype, jnp.float32)
    return (lambda v: vjp(v.astype(g.dtype)).astype(wide)), g.astype(wide)


class BackwardRuleAdjoint(banax.Adjoint):
    """Base class of adjoints that supply their whole backward pass.

    The forward pass is `banax.solve(self.solver, problem)` under a custom VJP, so
    nothing of the iteration is stored and any `loop_kind` works. On the backward pass
    `backward(problem, forward, g)` receives the forward solve and `ḡ = ∂L/∂z` and
    returns the cotangents of the parameters and of the initial state.
    """

    @abc.abstractmethod
    def backward(
        self, problem: Problem, forward: FlatSolution, g: jax.Array
    ) -> tuple[Params, jax.Array | None]:
        """Return `(θ̄, z̄₀)`.

        `θ̄` has the structure of `parameters(problem)[0]`; `z̄₀` is the flat cotangent
        of the initial state, or `None` when the rule gives it no gradient.
        """

    def solve(self, problem: Problem) -> FlatSolution:
        return _solve_with_rule(problem, self)


@eqx.filter_custom_vjp
def _solve_with_rule(problem: Problem, adjoint: BackwardRuleAdjoint) -> FlatSolution:
    return banax.solve(adjoint.solver, problem)


@_solve_with_rule.def_fwd
def _solve_with_rule_fwd(perturbed, problem, adjoint):
    del perturbed
    forward = banax.solve(adjoint.solver, problem)
    return forward, forward


@_solve_with_rule.def_bwd
def _solve_with_rule_bwd(forward, grad_obj, perturbed, problem, adjoint):
    cotangent = eqx.filter(problem, lambda _: False)
    g = grad_obj.z
    if g is None:
        return cotangent
    forward = jax.lax.stop_gradient(forward)
    p_bar, z0_bar = adjoint.backward(problem, forward, g)
    p_bar = jax.tree.map(
        lambda wanted, grad: grad if wanted else None,
        perturbed.f.bound, p_bar, is_leaf=lambda x: x is None,
    )
    if not perturbed.z0:
        z0_bar = None
    is_none = lambda x: x is None  # noqa: E731
    cotangent = eqx.tree_at(lambda p: p.f.bound, cotangent, p_bar, is_leaf=is_none)
    return eqx.tree_at(lambda p: p.z0, cotangent, z0_bar, is_leaf=is_none)
