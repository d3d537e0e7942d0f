"""No silent acceptance: the core's option checks, and the call's checks of x0, f_spec,
has_aux and trace, each asserting the exception type and the words of its message."""

import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks
from hypothesis import given

import banax
from banax import trace_history, trace_last
from banax.extend import bind, check_choice, check_flag, check_integer, check_real
from minimal import Direct, Iterate, Trial

W = jnp.array([[0.2, 0.1], [0.0, 0.3]])
B = jnp.array([1.0, 2.0])
EXPECTED = jnp.linalg.solve(jnp.eye(2) - W, B)
SOLVE = Direct(Iterate(rtol=1e-12, max_steps=200))


def affine(x, w, b):
    return w @ x + b


# --- option validators ----------------------------------------------------------------


@given(value=st.one_of(st.floats(), st.integers(-10, 10), st.booleans()))
def test_check_real_accepts_exactly_the_finite_numbers_of_its_interval(value):
    valid = (not isinstance(value, bool) and math.isfinite(value) and 0 < value <= 1)
    if valid:
        for given_as in (value, np.float64(value)):
            out = check_real("Owner", "beta", given_as, low=0, high=1, low_open=True)
            assert type(out) is float and out == value
    else:
        error = TypeError if isinstance(value, bool) else ValueError
        with pytest.raises(error, match=r"Owner: beta must be a number in \(0, 1\], got "):
            check_real("Owner", "beta", value, low=0, high=1, low_open=True)


@pytest.mark.parametrize(
    "check, value, error, words",
    [
        (lambda v: check_real("S", "tol", v, low=0), float("nan"), ValueError,
         "S: tol must be a non-negative finite number, got nan"),
        (lambda v: check_real("S", "tol", v, low=0), float("inf"), ValueError,
         "non-negative finite number, got inf"),
        (lambda v: check_real("S", "tol", v, low=0), True, TypeError, "(a bool)"),
        (lambda v: check_real("S", "tol", v, low=0), "1e-3", TypeError, "got '1e-3'"),
        (lambda v: check_real("S", "clip", v, low=0, low_open=True, allow_none=True),
         0.0, ValueError, "positive finite number or None"),
        (lambda v: check_real("S", "tol", v, low=0), jnp.asarray(0.1), TypeError,
         "must be a Python float, got a JAX array"),
        (lambda v: check_integer("S", "k", v, minimum=1), 2.0, TypeError,
         "S: k must be an int >= 1, got 2.0"),
        (lambda v: check_integer("S", "k", v, minimum=1), True, TypeError,
         "got True (a bool)"),
        (lambda v: check_integer("S", "k", v, minimum=0), -1, ValueError,
         "k must be a non-negative int, got -1"),
        (lambda v: check_flag("S", "on", v), "no", TypeError,
         "S: on must be True or False, got 'no'"),
        (lambda v: check_flag("S", "on", v), 1, TypeError, "True or False, got 1"),
        (lambda v: check_choice("S", "kind", v, ("a", "b")), "c", ValueError,
         "S: kind must be one of ('a', 'b'), got 'c'"),
    ],
)
def test_option_checks_name_the_owner_option_value_and_range(check, value, error, words):
    with pytest.raises(error) as info:
        check(value)
    assert words in str(info.value)


def test_numpy_scalars_pass_every_check_as_python_scalars():
    assert check_integer("S", "k", np.int64(3), minimum=1) == 3
    assert check_flag("S", "on", np.bool_(True)) is True
    assert check_choice("S", "kind", np.str_("a"), ("a",)) == "a"
    assert type(check_real("S", "x", np.float32(0.5), low=0)) is float


class Halving(banax.Solver):
    """A plugin-style solver whose own option is checked with the core's validators."""

    weight: float = 0.5

    def __check_init__(self):
        check_real(self, "weight", self.weight, low=0, high=1, low_open=True)

    def init(self, z0, fz0):
        return None

    def step(self, f, z, fz, state, trace):
        z = (1 - self.weight) * z + self.weight * fz
        fz, trace = f(z, trace)
        return z, fz, None, trace


def test_a_plugin_solver_gets_numpy_options_normalised_and_bad_ones_refused():
    solver = Halving(weight=np.float32(0.5), max_steps=np.int64(300), rtol=np.float64(1e-10))
    assert [type(v) for v in (solver.weight, solver.max_steps, solver.rtol)] == [
        float, int, float]
    # Python scalars are static under filter_jit, so the solve compiles and runs.
    sol = eqx.filter_jit(Direct(solver))((affine, (W, B)), jnp.zeros(2))
    assert jnp.allclose(sol.value, EXPECTED, atol=1e-8)
    with pytest.raises(ValueError, match=r"Halving: weight must be a number in \(0, 1\]"):
        Halving(weight=1.5)


def test_adjoint_options_are_normalised_too():
    adjoint = Direct(Iterate(max_steps=np.int64(5)))
    assert type(adjoint.solver.max_steps) is int


# --- x0 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x0, words",
    [
        ([0.0, 0.0], "x0[0] is a Python float (0.0). A list or tuple of numbers is a "
                     "pytree of scalars, not a vector: pass jnp.asarray([...]"),
        (1.0, "x0 is a Python float"),
        ("ab", "x0 is a str ('ab')"),
        ({"a": jnp.zeros(2), "b": "s"}, "x0['b'] is a str"),
        (jnp.zeros(2, jnp.int32), "x0 has dtype int32; fixed-point states must be floating"),
        (jax.ShapeDtypeStruct((2,), jnp.float64), "x0 is a jax.ShapeDtypeStruct, a shape "
                                                  "without values; pass an array"),
    ],
    ids=["list-of-floats", "python-float", "string", "dict-with-string", "int-array",
         "shape-dtype-struct"],
)
def test_non_array_or_integer_leaves_of_x0_are_refused_naming_the_leaf(x0, words):
    with pytest.raises(TypeError) as info:
        SOLVE(lambda x: x, x0)
    assert words in str(info.value)


def test_numpy_x0_is_accepted():
    sol = SOLVE((affine, (W, B)), np.zeros(2))
    assert jnp.allclose(sol.value, EXPECTED, atol=1e-10)


def test_an_empty_batch_is_refused():
    solve = Direct(Iterate(batch_axis=0))
    with pytest.raises(ValueError, match="empty batch .* needs at least one sample"):
        solve(lambda x: x, jnp.zeros((0, 2)))


def test_a_state_dtype_change_is_reported_as_a_dtype_problem():
    with pytest.raises(ValueError) as info:
        SOLVE(lambda x: x.astype(jnp.float32), jnp.zeros(2, jnp.float64))
    message = str(info.value)
    assert "f changes the state's dtype" in message and "x0.astype(jnp.float32)" in message


# --- f_spec ---------------------------------------------------------------------------


def test_a_list_is_one_argument_in_both_tuple_forms():
    def f(x, wb):
        return wb[0] @ x + wb[1]

    for f_spec in ((f, [W, B]), (f, [W, B], {})):
        assert bind(f_spec).args == ([W, B],)
        assert jnp.allclose(SOLVE(f_spec, jnp.zeros(2)).value, EXPECTED, atol=1e-10)


@pytest.mark.parametrize("f_spec", [(affine, [W, B]), (affine, [W, B], {})])
def test_a_list_meant_as_several_arguments_is_explained(f_spec):
    with pytest.raises(TypeError) as info:
        SOLVE(f_spec, jnp.zeros(2))
    message = str(info.value)
    assert "f failed when called as f(x0, *args, **kwargs)" in message
    assert "missing 1 required positional argument: 'b'" in message
    assert "list, which f receives as ONE argument; pass a tuple" in message


def test_f_failing_on_x0_says_how_it_was_called():
    with pytest.raises(TypeError) as info:
        SOLVE((affine, (W, B)), jnp.zeros(3))
    message = str(info.value)
    assert "with x0 float64[3], 2 extra positional argument(s)" in message
    assert "Check that x0 has the structure and shapes f expects" in message


# --- has_aux --------------------------------------------------------------------------


def test_has_aux_with_a_tuple_state_is_explained():
    def f(x):
        return (0.5 * x[0], 0.5 * x[1])

    with pytest.raises(ValueError) as info:
        SOLVE(f, (jnp.zeros(2), jnp.zeros(2)), has_aux=True)
    message = str(info.value)
    assert "the whole output is the state" in message and "Pass has_aux=False" in message


def test_has_aux_accepts_numpy_bools():
    sol = SOLVE((affine, (W, B)), jnp.zeros(2), has_aux=np.bool_(False))
    assert jnp.allclose(sol.value, EXPECTED, atol=1e-10)


# --- trace ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trace_fn",
    [lambda acc, x, fx: acc + 1, lambda acc, x, fx, aux, extra: acc + 1],
    ids=["three-parameters", "five-parameters"],
)
def test_a_trace_function_of_the_wrong_arity_is_refused(trace_fn):
    with pytest.raises(TypeError) as info:
        SOLVE((affine, (W, B)), jnp.zeros(2), trace=(trace_fn, jnp.array(0)))
    assert "trace_fn is called as trace_fn(acc, x, fx, f_aux, **tags)" in str(info.value)


def test_a_trace_function_without_tags_is_refused_at_a_tagged_trial():
    solve = Direct(Trial(rtol=1e-8, max_steps=20))
    with pytest.raises(TypeError) as info:
        solve((affine, (W, B)), jnp.zeros(2),
              trace=(lambda acc, x, fx, aux: acc + 1, jnp.array(0)))
    assert "tag='line_search'" in str(info.value) and "accept **tags" in str(info.value)


def test_a_lossy_trace_dtype_is_refused_not_cast():
    with pytest.raises(TypeError) as info:
        SOLVE((affine, (W, B)), jnp.zeros(2),
              trace=(lambda acc, x, fx, aux: acc.astype(jnp.float64) + 0.5,
                     jnp.array(0, jnp.int32)))
    message = str(info.value)
    assert "trace_fn returns float64 where trace_init holds int32" in message


def test_python_number_accumulators_take_the_dtype_trace_fn_computes():
    solve = Direct(Iterate(rtol=0.0, atol=0.0, max_steps=15))
    for init in (0, jnp.array(0)):
        sol = solve((affine, (W, B)), jnp.zeros(2),
                    trace=(lambda acc, x, fx, aux: acc + 0.5, init))
        assert sol.trace.dtype == jnp.float64 and float(sol.trace) == 8.0  # 16 evals


def test_a_lossless_trace_dtype_is_kept_as_trace_init_says():
    sol = SOLVE((affine, (W, B)), jnp.zeros(2),
                trace=trace_last(lambda x, fx, aux: fx.astype(jnp.float32), jnp.zeros(2)))
    assert sol.trace.dtype == jnp.float64
    assert jnp.allclose(sol.trace, EXPECTED, atol=1e-5)


def test_trace_init_must_hold_arrays_or_numbers():
    with pytest.raises(TypeError, match="trace_init must be a pytree of arrays or numbers, "
                                        "but trace_init\\['a'\\] is a str"):
        SOLVE((affine, (W, B)), jnp.zeros(2), trace=(lambda a, x, fx, aux: a, {"a": "s"}))


def test_trace_history_checks_the_value_shape_and_dtype():
    with pytest.raises(ValueError, match=r"project returned a value of shape \(2,\), but "
                                         r"init_value has shape \(\)"):
        SOLVE((affine, (W, B)), jnp.zeros(2), trace=trace_history(lambda x, fx, a: fx, 5))
    with pytest.raises(TypeError, match="project returned float64 values, which do not fit "
                                        "an init_value of dtype int32"):
        SOLVE((affine, (W, B)), jnp.zeros(2),
              trace=trace_history(lambda x, fx, a: fx[0], 5, jnp.array(0, jnp.int32)))
    # A Python init_value takes the projection's dtype instead of truncating it.
    sol = SOLVE((affine, (W, B)), jnp.zeros(2),
                trace=trace_history(lambda x, fx, a: fx[0], np.int64(3), init_value=0))
    assert sol.trace[1].dtype == jnp.float64 and float(sol.trace[1][0]) == 1.0
    with pytest.raises(TypeError, match="trace_history: n_evals must be an int >= 1"):
        trace_history(lambda x, fx, a: fx[0], True)


# --- utils and step budget ------------------------------------------------------------


@without_annotation_checks()
def test_pytree_helpers_name_the_bad_leaf_or_key():
    with pytest.raises(TypeError, match=r"zeros_like needs a pytree of arrays, but "
                                        r"tree\['a'\] is a str"):
        banax.zeros_like({"a": "s"})
    with pytest.raises(TypeError, match=r"key must be a single PRNG key such as "
                                        r"jax.random.key\(0\), got int"):
        banax.half_normal_like(0, jnp.zeros(2))


def test_a_negative_step_budget_is_clamped_to_zero_steps():
    sol = SOLVE((affine, (W, B)), jnp.zeros(2), step_budget=jnp.array(-3))
    assert int(sol.stats.steps) == 0 and sol.result == banax.Result.MAX_STEPS
    assert jnp.array_equal(sol.value, jnp.zeros(2))


# --- DEQ inputs -----------------------------------------------------------------------


class Cell(eqx.Module):
    w: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(self.w @ z.astype(self.w.dtype) + x)  # computes in w's dtype


def test_a_deq_z0_of_another_dtype_or_made_of_numbers_is_explained():
    deq = banax.DEQ(Cell(0.3 * jnp.eye(2)), solver="picard", state_shape=2)
    x = jnp.ones(2)
    with pytest.raises(ValueError) as info:
        deq(x, z0=jnp.zeros(2, jnp.float32))
    assert "the cell changes the state's dtype" in str(info.value)
    assert "z0.astype(jnp.float64)" in str(info.value)
    with pytest.raises(TypeError, match=r"Every leaf of z0 must be an array, but z0\[0\] is "
                                        r"a Python float"):
        deq(x, z0=[0.0, 0.0])


def test_a_deq_state_shape_may_hold_numpy_ints():
    deq = banax.DEQ(Cell(0.3 * jnp.eye(2)), solver="picard", state_shape=(np.int64(2),))
    assert deq.state_shape == (2,) and type(deq.state_shape[0]) is int
