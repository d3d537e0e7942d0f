"""Every adjoint in batch mode on an `eqx.Module` cell with aux output, tracing and a
step budget; the approximate adjoints against the dense implicit gradient."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import banax
from banax.adjoint import BPTT, GDEQ, JFB, Implicit, NeumannPhantom, Reversible, UnrollPhantom
from helpers import contraction_matrix, tree_allclose


class AuxCell(eqx.Module):
    """A batched cell with weights inside `f`, a positional and a keyword argument, and
    an aux output (each sample's input sum)."""

    weight: jax.Array

    def __call__(self, z, x, *, scale):
        return jnp.tanh(z @ self.weight.T + scale * x), jnp.sum(z, axis=-1)


def _aux_problem():
    keys = jax.random.split(jax.random.key(7), 3)
    cell = AuxCell(contraction_matrix(keys[0], 6, 0.8, symmetric=False))
    # Samples of different sizes stop after different numbers of steps.
    x = jax.random.normal(keys[1], (4, 6)) * jnp.array([[0.01], [0.3], [1.0], [3.0]])
    spec = (cell, (x,), {"scale": jnp.asarray(0.7)})
    return spec, jnp.zeros((4, 6)), jax.random.normal(keys[2], (4, 6))


TOL = {"atol": 1e-10, "rtol": 0.0, "max_steps": 200, "batch_axis": 0}
#: Evaluations of f per step of each forward solver, for the trace count.
EVALS_PER_STEP = {"picard": 1, "broyden": 1, "reversible": 2}


def _adjoint(name):
    picard = banax.get_solver("picard", **TOL)
    return {
        "implicit": ("picard", Implicit(solver=picard, b_solver=banax.get_solver(
            "picard", **TOL))),
        "bptt": ("picard", BPTT(solver=banax.get_solver(
            "picard", loop_kind="checkpointed", **TOL))),
        "reversible": ("reversible", Reversible(solver=banax.get_solver(
            "reversible", damp=0.5, **TOL))),
        "jfb": ("picard", JFB(solver=picard)),
        "gdeq": ("broyden", GDEQ(solver=banax.get_solver("broyden", **TOL))),
        "unroll_phantom": ("picard", UnrollPhantom(
            solver=picard, b_solver=banax.get_solver("relaxed", damp=0.9, max_steps=3))),
        "neumann_phantom": ("picard", NeumannPhantom(
            solver=picard, b_solver=banax.get_solver("relaxed", damp=0.9, max_steps=3))),
    }[name]


def _count_and_aux(acc, x, fx, f_aux):
    count, _ = acc
    return count + 1, f_aux


@eqx.filter_jit
def _run(adjoint, spec, x0, c, budget):
    def loss(spec):
        sol = adjoint(spec, x0, has_aux=True, trace=(_count_and_aux, (0, jnp.zeros(4))),
                      step_budget=budget)
        return jnp.vdot(c, sol.value), sol

    return eqx.filter_value_and_grad(loss, has_aux=True)(spec)


@functools.cache
def _results(name):
    """(converged solve and gradient, solve and gradient under a budget of 3 steps)."""
    solver, adjoint = _adjoint(name)
    spec, x0, c = _aux_problem()
    full = _run(adjoint, spec, x0, c, jnp.asarray(TOL["max_steps"]))
    short = _run(adjoint, spec, x0, c, jnp.asarray(3))
    return solver, full, short


ALL = ("implicit", "bptt", "reversible", "jfb", "gdeq", "unroll_phantom", "neumann_phantom")


@pytest.mark.parametrize("name", ALL)
def test_every_adjoint_in_batch_mode_with_aux_trace_and_budget(name):
    solver, ((_, sol), grad), ((_, short), short_grad) = _results(name)
    _, ((_, reference), implicit_grad) = _results("implicit")[:2]

    # The forward value is the fixed point, whatever the gradient rule.
    assert (sol.result == banax.Result.CONVERGED).all()
    assert tree_allclose(sol.value, reference.value, rtol=0, atol=1e-9)
    # Per-sample stopping, and the trace folded over every evaluation of the batch.
    steps = sol.stats.steps
    assert steps.shape == (4,) and len(set(steps.tolist())) > 1
    count, last_aux = sol.trace
    assert int(count) == 1 + EVALS_PER_STEP[solver] * int(steps.max())
    # The last evaluation was at the final iterate of the samples still running.
    last = steps == steps.max()
    assert jnp.allclose(last_aux[last], sol.value.sum(-1)[last])
    # Gradients reach the weights inside f, the positional and the keyword argument.
    leaves = jax.tree.leaves(eqx.filter(grad, eqx.is_inexact_array))
    assert len(leaves) == 3
    assert all(jnp.isfinite(g).all() and jnp.abs(g).max() > 1e-3 for g in leaves)
    if name in ("bptt", "reversible"):
        # Exact ones agree with the implicit gradient, up to the forward tolerance.
        assert max(_relative_errors(grad, implicit_grad)) < 1e-5
    # A traced step budget caps the steps without recompiling and still differentiates.
    assert short.stats.steps.max() == 3
    assert (short.result == banax.Result.MAX_STEPS).any()
    short_leaves = jax.tree.leaves(eqx.filter(short_grad, eqx.is_inexact_array))
    assert all(jnp.isfinite(g).all() for g in short_leaves)


def _relative_errors(grad, truth):
    """‖ĝ − g‖ / ‖g‖ for each parameter leaf."""
    return [
        float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(
            jax.tree.leaves(eqx.filter(grad, eqx.is_inexact_array)), jax.tree.leaves(truth)
        )
    ]


def _relative_error(adj, adjoint, cell_name="vector"):
    cell = adj.make_cell(cell_name)
    sol, grad = adj.grad(adjoint, cell)
    truth = adj.truth(cell_name)
    assert tree_allclose(sol.value, truth.z_star, rtol=0, atol=1e-9)
    return max(_relative_errors(grad, truth.grad))


def _picard():
    return banax.get_solver("picard", atol=1e-12, rtol=0.0, max_steps=300)


def test_more_phantom_steps_come_closer_to_the_implicit_gradient(adj):
    def neumann(k):
        return NeumannPhantom(solver=_picard(), b_solver=banax.get_solver(
            "picard", max_steps=k))

    jfb = _relative_error(adj, JFB(solver=_picard()))
    # One plain step is JFB; the truncation error then shrinks like ρ(J)^K.
    assert _relative_error(adj, neumann(1)) == pytest.approx(jfb, rel=1e-9)
    eight = _relative_error(adj, neumann(8))
    assert jfb > 0.1 and eight < jfb / 10
    # At an exact fixed point unrolling K steps sums the same K terms.
    unrolled = _relative_error(adj, UnrollPhantom(
        solver=_picard(), b_solver=banax.get_solver("picard", max_steps=8)))
    assert unrolled == pytest.approx(eight, rel=1e-6)


def test_gdeq_is_closer_than_jfb_with_a_broyden_forward(adj):
    # Broyden's inverse-Jacobian estimate needs a few secant pairs; history covers N = 5.
    broyden = banax.get_solver("broyden", history_size=8, atol=1e-12, rtol=0.0,
                               max_steps=100)
    jfb = _relative_error(adj, JFB(solver=broyden))
    gdeq = _relative_error(adj, GDEQ(solver=broyden))
    assert jfb > 0.1
    assert gdeq < jfb / 2


@pytest.mark.parametrize(
    "b_solver, budget",
    [
        (("relaxed", {"damp": 0.5}), 10),
        (("relaxed", {"damp": 0.5}), 3),
        (("anderson", {"depth": 3}), None),
    ],
    ids=["relaxed-budget-10", "relaxed-budget-3", "anderson"],
)
def test_unroll_phantom_is_bptt_through_the_b_solvers_steps_from_z_star(adj, b_solver, budget):
    """`UnrollPhantom(b_solver=S)` differentiates `K = S.max_steps` steps of `S` from
    the forward's `z*` (or `backward_budget` of them): BPTT through the same steps from
    the same point is the truth, for any solver with a differentiable step."""
    name, options = b_solver
    k = 10
    cell = adj.make_cell("vector")
    unroll = UnrollPhantom(solver=_picard(), b_solver=banax.get_solver(
        name, max_steps=k, loop_kind="checkpointed", **options))
    kwargs = {} if budget is None else {"backward_budget": jnp.array(budget)}
    # Both start from the same point, where the forward is told to take no step: an
    # inexact z*, since Anderson's mixing weights are ill-conditioned at a residual of
    # zero, and the unroll accounts for the steps still moving.
    start = dataclasses.replace(cell, x0=adj.truth("vector").z_star + 0.05)
    _, ours = adj.grad(unroll, start, step_budget=jnp.array(0), **kwargs)
    # Tolerances off: BPTT runs exactly its max_steps from the fixed point. (Both
    # relaxed cases share one compiled unroll: the budget is a traced array.)
    bptt = BPTT(solver=banax.get_solver(
        name, max_steps=k if budget is None else budget, atol=0.0, rtol=0.0,
        loop_kind="checkpointed", **options))
    _, theirs = adj.grad(bptt, start)
    assert max(_relative_errors(ours, eqx.filter(theirs, eqx.is_inexact_array))) < 1e-9
