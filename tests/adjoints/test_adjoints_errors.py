"""Invalid pairings and options fail at construction, saying what to use instead; the
registry builds every adjoint by name, with nested solver specs."""

import lineax as lx
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax.adjoint import (
    BPTT,
    GDEQ,
    JFB,
    Implicit,
    NeumannPhantom,
    Reversible,
    UnrollPhantom,
)

NAMES = ("bptt", "implicit", "jfb", "gdeq", "unroll_phantom", "neumann_phantom",
         "reversible")


def _solver(name, **options):
    return banax.get_solver(name, **options)


class _DampTwo(type(_solver("picard"))):
    """A plugin's solver whose `damp` option NeumannPhantom cannot use."""

    damp: float = 2.0


#: Pairings an adjoint cannot work with: `banax.PairingError`, a TypeError as banax
#: 0.1.5 raises it (and a ValueError).
PAIRINGS = {
    "bptt-lax": (lambda: BPTT(solver=_solver("picard")), "loop_kind='checkpointed'"),
    "bptt-line-search": (
        lambda: BPTT(solver=_solver("broyden", ls_steps=3, loop_kind="checkpointed")),
        "ls_steps=0"),
    "gdeq-no-factors": (lambda: GDEQ(solver=_solver("anderson")), "Broyden"),
    "reversible-picard": (lambda: Reversible(solver=_solver("picard")),
                          "get_solver('reversible'"),
    "reversible-broyden": (lambda: Reversible(solver=_solver("broyden", ls_steps=3)),
                           "InvertibleStep"),
    "unroll-line-search": (
        lambda: UnrollPhantom(solver=_solver("picard"),
                              b_solver=_solver("broyden", ls_steps=3)),
        "differentiable_step is False"),
}


@pytest.mark.parametrize("name", PAIRINGS)
def test_bad_pairings_are_type_errors(name):
    build, message = PAIRINGS[name]
    with pytest.raises(TypeError) as error:
        build()
    assert isinstance(error.value, banax.PairingError)
    assert isinstance(error.value, ValueError)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda: Reversible(solver=_solver("reversible", keep_best=True)), ValueError,
         "keep_best=False"),
        (lambda: Implicit(solver=_solver("picard"), b_solver="picard"), TypeError,
         "lineax.GMRES"),
        (lambda: JFB(solver="picard"), TypeError, "banax.Solver instance"),
        (lambda: UnrollPhantom(solver=_solver("picard"), b_solver="relaxed"), TypeError,
         "b_solver must be a banax.Solver"),
        (lambda: NeumannPhantom(solver=_solver("picard"), b_solver=_DampTwo()),
         ValueError, "b_solver.damp must be a number in (0, 1]"),
        (lambda: Implicit(solver=_solver("picard"), on_failure="explode"), ValueError,
         "on_failure"),
    ],
    ids=["reversible-keep-best", "implicit-b-solver-name", "jfb-not-a-solver",
         "unroll-b-solver-name", "neumann-damp", "on-failure"],
)
@without_annotation_checks()
def test_bad_options_fail_at_construction(build, error, message):
    with pytest.raises(error) as raised:
        build()
    assert message in str(raised.value)


def test_the_second_unroll_spelling_is_gone():
    """`UnrollPhantom` reads its steps from `b_solver`, as `NeumannPhantom` does."""
    with pytest.raises(TypeError, match="n_steps"):
        UnrollPhantom(solver=_solver("picard"), n_steps=3)


def test_line_search_is_refused_by_adjoints_that_unroll_the_step():
    """A solver that can invert its step but has an undifferentiable one (standing in
    for a reversible solver with a line search) is refused by the reversible adjoint
    through the `differentiable_step` property alone."""
    reversible = type(_solver("reversible"))

    class WithLineSearch(reversible):
        @property
        def differentiable_step(self):
            return False

    with pytest.raises(banax.PairingError, match="differentiable_step is False"):
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


@pytest.mark.parametrize("option", ["rtol", "atol"])
def test_lineax_b_solver_tolerances_are_checked(option):
    import lineax as lx

    tolerances = {"rtol": 1e-6, "atol": 1e-6, option: float("nan")}
    with pytest.raises(ValueError, match=f"b_solver GMRES: {option} must be a non-negative"):
        banax.get_adjoint("implicit", solver="picard", b_solver=lx.GMRES(**tolerances))
