"""Exact adjoints (BPTT, Implicit with every kind of backward solver, Reversible)
against the dense implicit gradient and finite differences, on every cell, in float32
and float64; and the reversible adjoint against BPTT through the same steps."""

import equinox as eqx
import jax
import jax.numpy as jnp

import banax
from banax.adjoint import BPTT, Reversible
from helpers import tree_allclose


def _tolerance(kind, dtype):
    if dtype == jnp.float32:
        return {"rtol": 2e-3, "atol": 2e-4}
    return {"rtol": 1e-7, "atol": 1e-9}


def test_matches_the_dense_implicit_gradient(adj, exact_case):
    exact_kind, cell_name, dtype = exact_case
    cell = adj.make_cell(cell_name, dtype)
    truth = adj.truth(cell_name)
    adjoint = adj.exact_adjoint(exact_kind, dtype, cell.batch_axis)
    sol, grad = adj.grad(adjoint, cell)
    tol = _tolerance(exact_kind, dtype)

    assert tree_allclose(sol.value, truth.z_star, **_tolerance("", dtype))
    params = eqx.filter(grad, eqx.is_inexact_array)
    assert jax.tree.structure(params) == jax.tree.structure(truth.grad)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
    assert tree_allclose(params, truth.grad, **tol)
    # Finite differences are independent of the dense solve: a second truth.
    assert tree_allclose(cell.leaf(grad), truth.fd, **tol)


def test_reversible_is_bptt_through_the_same_steps(adj):
    """The reversible adjoint rewinds the very steps BPTT differentiates: they agree to
    rounding, for the parameters and for `x0`, with samples that stop after different
    numbers of steps."""
    cell = adj.make_cell("batched")
    options = {"damp": 0.5, "atol": 1e-4, "rtol": 0.0, "max_steps": 12, "batch_axis": 0}
    reversible = banax.get_solver("reversible", **options)
    unrolled = banax.get_solver("reversible", loop_kind="checkpointed", **options)

    @eqx.filter_jit
    def grads(adjoint, spec, x0):
        def loss(spec_x0):
            sol = adjoint(*spec_x0)
            return adj.linear_loss(cell.c, sol.value), sol.stats.steps

        return eqx.filter_grad(loss, has_aux=True)((spec, x0))

    x0 = cell.x0
    ours, steps = grads(Reversible(solver=reversible), cell.spec, x0)
    theirs, bptt_steps = grads(BPTT(solver=unrolled), cell.spec, x0)
    assert len(set(steps.tolist())) > 1 and (steps == bptt_steps).all()
    ours, theirs = eqx.filter((ours, theirs), eqx.is_inexact_array)
    assert tree_allclose(ours, theirs, rtol=1e-9, atol=1e-12)
    assert jnp.abs(ours[1]).max() > 1e-3  # x0 does receive a gradient


def test_implicit_without_b_solver_solves_backwards_with_the_forward_solver(adj):
    """The default backward solver is the forward one, run as a plain `lax` loop: the
    backward system has the spectrum of the forward Jacobian, so it converges as the
    forward did, to the forward's tolerance."""
    forward = banax.get_solver("anderson", atol=1e-11, rtol=0.0, max_steps=250,
                               loop_kind="checkpointed", keep_best=True)
    adjoint = banax.get_adjoint("implicit", solver=forward)
    assert type(adjoint.b_solver) is type(forward)
    assert adjoint.b_solver.loop_kind == "lax" and adjoint.b_solver.keep_best is False
    assert adjoint.b_solver.atol == forward.atol and adjoint.b_solver.depth == forward.depth
    cell = adj.make_cell("vector")
    _, grad = adj.grad(adjoint, cell)
    assert tree_allclose(eqx.filter(grad, eqx.is_inexact_array), adj.truth("vector").grad,
                         rtol=1e-7, atol=1e-9)
