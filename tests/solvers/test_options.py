"""Solver options: defaults of the seed's tables, the registry names, and bad values
rejected at construction with a message naming the option, the value and the range."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks
from hypothesis import given

import banax
import banax_solvers
from banax.extend import InvertibleStep, LowRankInverseJacobian

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
    # (solver, option, value, exception, words of the message)
    ("relaxed", "damp", 0.0, ValueError, "(0, 1]"),
    ("relaxed", "damp", 1.2, ValueError, "(0, 1]"),
    ("relaxed", "damp", -0.5, ValueError, "(0, 1]"),
    ("relaxed", "damp", float("nan"), ValueError, "(0, 1]"),
    ("relaxed", "damp", True, TypeError, "(a bool)"),
    ("anderson", "damp", 1.5, ValueError, "(0, 1]"),
    ("anderson", "damp", "0.5", TypeError, "(0, 1]"),
    ("reversible", "damp", 1.0, ValueError, "1 - damp"),
    ("reversible", "damp", 0.0, ValueError, "(0, 1)"),
    ("anderson", "depth", 0, ValueError, ">= 1"),
    ("anderson", "depth", 2.0, TypeError, "an int >= 1"),
    ("anderson", "depth", True, TypeError, "(a bool)"),
    ("broyden", "history_size", 0, ValueError, ">= 1"),
    ("broyden", "ls_steps", -1, ValueError, "non-negative int"),
    ("broyden", "spectral_clip", 0.0, ValueError, "positive finite number"),
    ("broyden", "spectral_clip", -1.0, ValueError, "or None"),
    ("broyden", "spectral_clip", float("inf"), ValueError, "positive finite number"),
    ("anderson", "ridge", -1e-6, ValueError, "non-negative finite number"),
    ("anderson", "ridge", float("inf"), ValueError, "non-negative finite number"),
    ("anderson", "ridge", float("nan"), ValueError, "non-negative finite number"),
    ("anderson", "use_linalg", 1, TypeError, "True or False"),
    ("anderson", "use_linalg", "yes", TypeError, "True or False"),
    ("picard", "atol", -1e-3, ValueError, "non-negative"),
    ("picard", "atol", float("nan"), ValueError, "finite"),
    ("picard", "atol", float("inf"), ValueError, "finite"),
    ("picard", "atol", True, TypeError, "(a bool)"),
    ("picard", "rtol", "1e-5", TypeError, "non-negative"),
    ("broyden", "rtol", -1.0, ValueError, "non-negative"),
    ("broyden", "rtol", float("-inf"), ValueError, "0.0 disables it"),
    ("anderson", "max_steps", 0, ValueError, ">= 1"),
    ("anderson", "max_steps", True, TypeError, "step_budget=jnp.array(k)"),
    ("picard", "max_steps", 50.0, TypeError, "an int >= 1"),
    ("picard", "max_steps", float("inf"), TypeError, "an int >= 1"),
    ("picard", "max_steps", 2**31, ValueError, "an int >= 1 and <= 2147483647"),
    ("relaxed", "loop_kind", "scan", ValueError, "checkpointed"),
    ("picard", "keep_best", "no", TypeError, "True or False"),
    ("picard", "keep_best", 1, TypeError, "True or False"),
    ("picard", "batch_axis", -1, ValueError, "None or a non-negative int"),
    ("picard", "batch_axis", 0.0, TypeError, "None or a non-negative int"),
]


@pytest.mark.parametrize("name, option, value, error, hint", BAD,
                         ids=[f"{n}-{o}={v!r}" for n, o, v, _, _ in BAD])
@without_annotation_checks()
def test_bad_options_fail_at_construction(name, option, value, error, hint):
    with pytest.raises(error) as info:
        banax.get_solver(name, **{option: value})
    message = str(info.value)
    cls = CLASSES[name].__name__
    assert message.startswith(f"{cls}: {option} must be ")
    assert repr(value) in message and hint in message


@pytest.mark.parametrize("name, option", [("picard", "atol"), ("anderson", "damp"),
                                          ("broyden", "max_steps")])
@without_annotation_checks()
def test_jax_arrays_are_refused_as_options(name, option):
    value = jnp.asarray(1 if option == "max_steps" else 0.5)
    with pytest.raises(TypeError, match=f"{option} must be a Python .*compile-time"):
        banax.get_solver(name, **{option: value})


NUMPY = [
    ("picard", "rtol", np.float32(0.5), float),
    ("picard", "atol", np.float64(1e-6), float),
    ("picard", "max_steps", np.int64(50), int),
    ("picard", "max_steps", np.int32(7), int),
    ("picard", "keep_best", np.bool_(True), bool),
    ("picard", "batch_axis", np.int64(0), int),
    ("picard", "loop_kind", np.str_("bounded"), str),
    ("relaxed", "damp", np.float32(0.5), float),
    ("anderson", "damp", np.float64(1.0), float),
    ("anderson", "depth", np.int64(3), int),
    ("anderson", "ridge", np.float32(1e-4), float),
    ("anderson", "use_linalg", np.bool_(False), bool),
    ("broyden", "history_size", np.int16(4), int),
    ("broyden", "ls_steps", np.uint8(2), int),
    ("broyden", "spectral_clip", np.float32(1.5), float),
    ("reversible", "damp", np.float32(0.5), float),
]


@pytest.mark.parametrize("name, option, value, kind", NUMPY,
                         ids=[f"{n}-{o}={v!r}" for n, o, v, _ in NUMPY])
def test_numpy_scalars_are_accepted_as_the_equal_python_scalar(name, option, value, kind):
    """Configurations loaded through NumPy/YAML give NumPy scalars; they become Python
    scalars, which `eqx.filter_jit` treats as static (a NumPy scalar would be traced)."""
    solver = banax.get_solver(name, **{option: value})
    stored = getattr(solver, option)
    assert type(stored) is kind and stored == value.item()
    assert solver == banax.get_solver(name, **{option: value.item()})
    assert hash(solver) == hash(banax.get_solver(name, **{option: value.item()}))
    assert not any(eqx.is_array(leaf) for leaf in jax.tree.leaves(solver))


def test_numpy_options_run_under_jit_like_python_ones():
    w = jnp.array([[0.5, 0.1], [0.0, 0.4]])

    def steps(solver):
        adjoint = banax.adjoint.JFB(solver=solver)
        return int(eqx.filter_jit(adjoint)((lambda x, w: w @ x + 1.0, w),
                                           jnp.zeros(2)).stats.steps)

    python = banax.get_solver("anderson", rtol=1e-6, max_steps=40, depth=3, damp=0.9)
    numpy = banax.get_solver("anderson", rtol=np.float64(1e-6), max_steps=np.int64(40),
                             depth=np.int32(3), damp=np.float32(0.9))
    assert steps(numpy) == steps(python)


@given(value=st.one_of(
    st.floats(), st.integers(-5, 5), st.booleans(), st.none(), st.text(max_size=3),
))
def test_tolerances_accept_exactly_the_finite_non_negative_numbers(value):
    valid = (isinstance(value, (int, float)) and not isinstance(value, bool)
             and np.isfinite(value) and value >= 0)
    for option in ("atol", "rtol"):
        if valid:
            assert getattr(banax.get_solver("picard", **{option: value}), option) == value
            np_value = np.float64(value)
            assert getattr(banax.get_solver("picard", **{option: np_value}), option) == value
        else:
            with without_annotation_checks(), pytest.raises(
                    (TypeError, ValueError), match=f"Picard: {option} must be"):
                banax.get_solver("picard", **{option: value})


@given(damp=st.floats(allow_nan=False, allow_infinity=False))
def test_damp_is_accepted_exactly_on_its_interval(damp):
    for name in ("relaxed", "anderson"):
        if 0 < damp <= 1:
            assert banax.get_solver(name, damp=damp).damp == damp
            assert banax.get_solver(name, damp=np.float64(damp)).damp == damp
        else:
            with pytest.raises(ValueError, match="damp must be a number in"):
                banax.get_solver(name, damp=damp)
    if not 0 < damp < 1:
        with pytest.raises(ValueError, match=r"damp must be a number in \(0, 1\)"):
            banax.get_solver("reversible", damp=damp)


@given(value=st.integers(-3, 12))
def test_history_lengths_are_accepted_exactly_from_one(value):
    for name, option in (("anderson", "depth"), ("broyden", "history_size")):
        if value >= 1:
            assert getattr(banax.get_solver(name, **{option: value}), option) == value
            assert getattr(banax.get_solver(name, **{option: np.int64(value)}), option) == value
        else:
            with pytest.raises(ValueError, match=option):
                banax.get_solver(name, **{option: value})


def test_options_are_plain_fields_that_tree_at_edits():
    solver = banax.get_solver("anderson", rtol=1e-3)
    edited = eqx.tree_at(lambda s: (s.rtol, s.depth, s.damp), solver, (1e-9, 2, 0.5))
    assert (edited.rtol, edited.depth, edited.damp) == (1e-9, 2, 0.5)
    assert solver.rtol == 1e-3


@pytest.mark.parametrize(
    "where, value, error, words",
    [
        (lambda a: a.solver.rtol, -1.0, ValueError, "rtol must be a non-negative finite"),
        (lambda a: a.solver.rtol, float("nan"), ValueError, "got nan"),
        (lambda a: a.solver.max_steps, 0, ValueError, "max_steps must be an int >= 1"),
        (lambda a: a.solver.loop_kind, "scan", ValueError, "loop_kind must be one of"),
        (lambda a: a.solver.damp, 2.0, ValueError, "damp must be a number in (0, 1]"),
    ],
    ids=["rtol-negative", "rtol-nan", "max-steps-0", "loop-kind", "damp"],
)
def test_options_edited_by_tree_at_are_checked_at_the_call(where, value, error, words):
    """`eqx.tree_at` skips `__check_init__`; the adjoint call checks the options again."""
    adjoint = banax.adjoint.JFB(solver=banax.get_solver("relaxed"))
    edited = eqx.tree_at(where, adjoint, value)
    with pytest.raises(error) as info:
        edited(lambda x: 0.5 * x + 1.0, jnp.zeros(2))
    assert words in str(info.value)


def test_a_numpy_option_set_by_tree_at_is_normalised_or_refused_under_jit():
    adjoint = banax.adjoint.JFB(solver=banax.get_solver("picard"))
    edited = eqx.tree_at(lambda a: a.solver.rtol, adjoint, np.float32(1e-3))
    with pytest.raises(TypeError, match="rtol must be a Python float, got a JAX array.*"
                                        "compile-time configuration"):
        eqx.filter_jit(edited)(lambda x: 0.5 * x + 1.0, jnp.zeros(2))
    sol = edited(lambda x: 0.5 * x + 1.0, jnp.zeros(2))  # outside jit: made a float
    assert type(edited.solver.rtol) is float and sol.result == banax.Result.CONVERGED
