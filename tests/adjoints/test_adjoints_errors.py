"""Invalid pairings and options fail at construction, saying what to use instead; the
registry builds every adjoint by name, with nested solver specs."""

import lineax as lx
import pytest

import banax
from banax.adjoint import (
    BPTT, GDEQ, JFB, Implicit, NeumannPhantom, Reversible, UnrollPhantom,
)

NAMES = ("bptt", "implicit", "jfb", "gdeq", "unroll_phantom", "neumann_phantom",
         "reversible")


def _solver(name, **options):
    return banax.get_solver(name, **options)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: BPTT(solver=_solver("picard")), "loop_kind='checkpointed'"),
        (lambda: BPTT(solver=_solver("broyden", ls_steps=3, loop_kind="checkpointed")),
         "ls_steps=0"),
        (lambda: GDEQ(solver=_solver("anderson")), "Broyden"),
        (lambda: Reversible(solver=_solver("picard")), "get_solver('reversible'"),
        (lambda: Reversible(solver=_solver("broyden", ls_steps=3)), "InvertibleStep"),
        (lambda: Reversible(solver=_solver("reversible", keep_best=True)),
         "keep_best=False"),
        (lambda: Implicit(solver=_solver("picard"), b_solver="picard"), "lineax.GMRES"),
        (lambda: JFB(solver="picard"), "banax.Solver instance"),
        (lambda: UnrollPhantom(solver=_solver("picard"), n_steps=0), "n_steps"),
        (lambda: UnrollPhantom(solver=_solver("picard"), damp=1.5), "(0, 1]"),
    ],
    ids=["bptt-lax", "bptt-line-search", "gdeq-no-factors", "reversible-picard",
         "reversible-broyden", "reversible-keep-best", "implicit-b-solver-name",
         "jfb-not-a-solver", "phantom-steps", "phantom-damp"],
)
def test_bad_pairings_fail_at_construction(build, message):
    with pytest.raises((ValueError, TypeError)) as error:
        build()
    assert message in str(error.value)


def test_line_search_is_refused_by_adjoints_that_unroll_the_step():
    """A solver that can invert its step but has an undifferentiable one (standing in
    for a reversible solver with a line search) is refused by the reversible adjoint
    through the `differentiable_step` property alone."""
    reversible = type(_solver("reversible"))

    class WithLineSearch(reversible):
        @property
        def differentiable_step(self):
            return False

    with pytest.raises(ValueError, match="differentiable_step is False"):
        Reversible(solver=WithLineSearch())


def test_registry_builds_every_adjoint_from_nested_specs():
    solvers = {
        "bptt": {"name": "picard", "loop_kind": "checkpointed"},
        "gdeq": "broyden",
        "reversible": {"name": "reversible", "damp": 0.5},
    }
    b_solvers = {"implicit": {"name": "anderson", "rtol": 1e-8},
                 "neumann_phantom": {"name": "relaxed", "damp": 0.5, "max_steps": 4}}
    for name in NAMES:
        options = {"solver": solvers.get(name, "picard")}
        if name in b_solvers:
            options["b_solver"] = b_solvers[name]
        adjoint = banax.get_adjoint(name, **options)
        assert isinstance(adjoint, banax.Adjoint)
        assert isinstance(adjoint.solver, banax.Solver)
        assert getattr(banax.adjoint, type(adjoint).__name__) is type(adjoint)
    neumann = banax.get_adjoint("neumann_phantom", solver="picard",
                                b_solver=b_solvers["neumann_phantom"])
    assert neumann.damp == 0.5 and neumann.b_solver.max_steps == 4
    gmres = lx.GMRES(rtol=1e-6, atol=1e-6)
    assert banax.get_adjoint("implicit", solver="picard", b_solver=gmres).b_solver is gmres
