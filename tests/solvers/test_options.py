"""Solver options: defaults of the seed's tables, the registry names, and bad values
rejected at construction with a message naming the option, the value and the range."""

import hypothesis.strategies as st
import pytest
from hypothesis import given

import banax
import banax_solvers
from banax import InvertibleStep, LowRankInverseJacobian

NAMES = ("picard", "relaxed", "reversible", "broyden", "anderson")
CLASSES = {
    "picard": banax_solvers.Picard,
    "relaxed": banax_solvers.Relaxed,
    "reversible": banax_solvers.Reversible,
    "broyden": banax_solvers.Broyden,
    "anderson": banax_solvers.Anderson,
}


@pytest.mark.parametrize("name", NAMES)
def test_registry_names_resolve_to_the_plugin_classes(name):
    cls = CLASSES[name]
    assert getattr(banax.solver, cls.__name__) is cls
    solver = banax.get_solver(name, rtol=1e-7)
    assert type(solver) is cls and solver.rtol == 1e-7
    # The shared defaults of the seed's table.
    assert (solver.atol, solver.max_steps, solver.loop_kind) == (0.0, 50, "lax")
    assert (solver.batch_axis, solver.keep_best) == (None, False)


def test_defaults_of_the_seed_table():
    assert banax.get_solver("relaxed").damp == 0.8
    assert banax.get_solver("reversible").damp == 0.8
    broyden = banax.get_solver("broyden")
    assert (broyden.history_size, broyden.ls_steps, broyden.spectral_clip) == (10, 0, 1.5)
    anderson = banax.get_solver("anderson")
    assert (anderson.depth, anderson.damp, anderson.ridge, anderson.use_linalg) == (
        5, 0.8, 1e-6, True)


def test_capabilities_are_advertised_by_type_not_by_name():
    assert isinstance(banax.get_solver("broyden"), LowRankInverseJacobian)
    assert isinstance(banax.get_solver("reversible"), InvertibleStep)
    for name in ("picard", "relaxed", "anderson"):
        solver = banax.get_solver(name)
        assert not isinstance(solver, (LowRankInverseJacobian, InvertibleStep))


def test_line_search_makes_broyden_step_non_differentiable():
    assert banax.get_solver("broyden").differentiable_step
    assert not banax.get_solver("broyden", ls_steps=3).differentiable_step
    for name in ("picard", "relaxed", "reversible", "anderson"):
        assert banax.get_solver(name).differentiable_step


BAD = [
    ("relaxed", "damp", 0.0, "(0, 1]"),
    ("relaxed", "damp", 1.2, "(0, 1]"),
    ("relaxed", "damp", -0.5, "(0, 1]"),
    ("anderson", "damp", 1.5, "(0, 1]"),
    ("anderson", "damp", "0.5", "(0, 1]"),
    ("reversible", "damp", 1.0, "1 - damp"),
    ("reversible", "damp", 0.0, "(0, 1)"),
    ("anderson", "depth", 0, ">= 1"),
    ("anderson", "depth", 2.0, ">= 1"),
    ("broyden", "history_size", 0, ">= 1"),
    ("broyden", "ls_steps", -1, ">= 0"),
    ("broyden", "spectral_clip", 0.0, "> 0"),
    ("broyden", "spectral_clip", -1.0, "None"),
    ("anderson", "ridge", -1e-6, ">= 0"),
    ("anderson", "use_linalg", 1, "True or False"),
    ("picard", "atol", -1e-3, "non-negative"),
    ("broyden", "rtol", -1.0, "non-negative"),
    ("anderson", "max_steps", 0, ">= 1"),
    ("relaxed", "loop_kind", "scan", "checkpointed"),
]


@pytest.mark.parametrize("name, option, value, hint", BAD,
                         ids=[f"{n}-{o}={v!r}" for n, o, v, _ in BAD])
def test_bad_options_fail_at_construction(name, option, value, hint):
    with pytest.raises(ValueError) as info:
        banax.get_solver(name, **{option: value})
    message = str(info.value)
    assert option in message and repr(value) in message and hint in message


@given(damp=st.floats(allow_nan=False, allow_infinity=False))
def test_damp_is_accepted_exactly_on_its_interval(damp):
    for name, upper_ok in (("relaxed", True), ("anderson", True), ("reversible", False)):
        valid = 0 < damp < 1 or (upper_ok and damp == 1)
        if valid:
            assert banax.get_solver(name, damp=damp).damp == damp
        else:
            with pytest.raises(ValueError, match="damp"):
                banax.get_solver(name, damp=damp)


@given(value=st.integers(-3, 12))
def test_history_lengths_are_accepted_exactly_from_one(value):
    for name, option in (("anderson", "depth"), ("broyden", "history_size")):
        if value >= 1:
            assert getattr(banax.get_solver(name, **{option: value}), option) == value
        else:
            with pytest.raises(ValueError, match=option):
                banax.get_solver(name, **{option: value})
