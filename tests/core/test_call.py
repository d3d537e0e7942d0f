"""The adjoint call: FSpec forms, validation at the call, has_aux and tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import trace_count, trace_history, trace_last, trace_last_aux
from minimal import Direct, Iterate, Trial

W = jnp.array([[0.2, 0.1], [0.0, 0.3]])
B = jnp.array([1.0, 2.0])
EXPECTED = jnp.linalg.solve(jnp.eye(2) - W, B)
SOLVE = Direct(Iterate(rtol=1e-12, max_steps=200))


@pytest.mark.parametrize(
    "f_spec",
    [
        lambda x: W @ x + B,
        ((lambda x, w: w @ x + B), W),
        ((lambda x, w: w @ x + B), (W,)),
        ((lambda x, w, b: w @ x + b), (W, B)),
        ((lambda x, w, *, bias: w @ x + bias), (W,), {"bias": B}),
        # A list is ONE argument in both tuple forms (the seed's rule).
        ((lambda x, wb: wb[0] @ x + wb[1]), [W, B]),
        ((lambda x, wb: wb[0] @ x + wb[1]), [W, B], {}),
    ],
    ids=["bare", "single-arg", "one-tuple", "args", "args-kwargs", "list-one-arg",
         "list-one-arg-kwargs"],
)
def test_every_fspec_form_reaches_the_same_fixed_point(f_spec):
    assert jnp.allclose(SOLVE(f_spec, jnp.zeros(2)).value, EXPECTED, atol=1e-10)


def test_bind_wraps_a_single_non_tuple_argument():
    bound = banax.extend.bind((lambda x, w: w @ x, W))
    assert bound.args[0] is W and bound.kwargs == {}


@pytest.mark.parametrize(
    "f_spec, match",
    [
        (3, "f_spec must be one of"),
        ((), "f_spec must be one of"),
        ((lambda x: x, (), {}, 1), "f_spec must be one of"),
        (("not callable", ()), "first element of f_spec must be callable"),
        ((lambda x: x, (), [1]), "third element of f_spec must be a dict"),
    ],
)
@without_annotation_checks()
def test_malformed_fspec_is_a_type_error(f_spec, match):
    with pytest.raises(TypeError, match=match):
        SOLVE(f_spec, jnp.zeros(2))


def test_output_structure_shape_or_dtype_mismatch_is_caught_at_the_call():
    with pytest.raises(ValueError, match="must return a state with the same"):
        SOLVE(lambda x: jnp.concatenate([x, x]), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"f changes the state's dtype: x0 is float64\[2\] "
                       r"but f\(x0\) is float32\[2\].*x0.astype\(jnp.float32\)"):
        SOLVE(lambda x: x.astype(jnp.float32), jnp.zeros(2, jnp.float64))
    with pytest.raises(ValueError, match="must return a state with the same"):
        SOLVE(lambda t: {"a": t["a"]}, {"a": jnp.zeros(2), "b": jnp.zeros(1)})
    with pytest.raises(ValueError, match="pass has_aux=True"):
        SOLVE(lambda x: (x, {"aux": x}), jnp.zeros(2))


@without_annotation_checks()
def test_has_aux_mismatch_and_bad_has_aux():
    with pytest.raises(TypeError, match="must return a pair"):
        SOLVE(lambda x: x, jnp.zeros(2), has_aux=True)
    with pytest.raises(TypeError, match="has_aux must be True or False"):
        SOLVE(lambda x: x, jnp.zeros(2), has_aux=1)


def test_integer_or_empty_states_are_rejected():
    with pytest.raises(TypeError, match="must be floating point"):
        SOLVE(lambda x: x, jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="at least one array"):
        SOLVE(lambda x: x, {})


def test_has_aux_keeps_aux_out_of_the_value_and_into_the_trace():
    def f(x):
        pre = W @ x + B
        return pre, {"pre": pre, "norm": jnp.linalg.norm(pre)}

    init = {"pre": jnp.zeros(2), "norm": jnp.zeros(())}
    sol = SOLVE(f, jnp.zeros(2), has_aux=True, trace=trace_last_aux(init))
    assert jnp.allclose(sol.value, EXPECTED, atol=1e-10)
    assert jnp.allclose(sol.trace["pre"], W @ sol.value + B, atol=1e-10)


def test_trace_count_includes_the_initial_evaluation():
    sol = SOLVE(lambda x: W @ x + B, jnp.zeros(2), trace=trace_count())
    assert int(sol.trace) == int(sol.stats.steps) + 1


def test_trace_sees_tagged_trials_and_accepts_plain_trace_functions():
    tags = []

    def fold(acc, x, fx, f_aux, tag=None):
        tags.append(tag)  # runs at trace time: records which call sites are tagged
        return acc + (1000 if tag == "line_search" else 1)

    sol = Direct(Trial(rtol=1e-8, max_steps=200))(
        lambda x: W @ x + B, jnp.zeros(2), trace=(fold, jnp.array(0))
    )
    steps = int(sol.stats.steps)
    assert int(sol.trace) == 1 + steps + 1000 * steps
    assert set(tags) == {None, "line_search"}
    # A solver without tags works with a 4-argument trace function.
    plain = SOLVE(lambda x: W @ x + B, jnp.zeros(2), trace=(lambda a, x, fx, aux: a + 1, 0))
    assert int(plain.trace) == int(plain.stats.steps) + 1


def test_trace_history_records_residuals_at_every_evaluation():
    sol = SOLVE(
        lambda x: W @ x + B, jnp.zeros(2),
        trace=trace_history(lambda x, fx, aux: jnp.linalg.norm(fx - x), n_evals=64),
    )
    count, buffer = sol.trace
    count = int(count)
    assert count == int(sol.stats.steps) + 1 and buffer.shape == (64,)
    # Independent truth: replay plain iteration with numpy.
    x, expected = np.zeros(2), []
    for _ in range(count):
        fx = np.asarray(W) @ x + np.asarray(B)
        expected.append(np.linalg.norm(fx - x))
        x = fx
    assert np.allclose(buffer[:count], expected, rtol=1e-9)
    assert np.all(np.asarray(buffer[count:]) == 0)


def test_trace_history_drops_evaluations_past_its_buffer():
    sol = SOLVE(lambda x: W @ x + B, jnp.zeros(2),
                trace=trace_history(lambda x, fx, aux: x[0], n_evals=3, init_value=-1.0))
    count, buffer = sol.trace
    assert int(count) > 3 and buffer.shape == (3,) and float(buffer[0]) == 0.0
    with pytest.raises(ValueError, match="n_evals must be an int >= 1"):
        trace_history(lambda x, fx, aux: x, n_evals=0)


def test_trace_last_keeps_the_final_projection():
    sol = SOLVE(lambda x: W @ x + B, jnp.zeros(2),
                trace=trace_last(lambda x, fx, aux: fx, jnp.zeros(2)))
    assert jnp.allclose(sol.trace, W @ sol.value + B)


@without_annotation_checks()
def test_malformed_trace_is_caught_at_the_call():
    with pytest.raises(TypeError, match="trace must be a pair"):
        SOLVE(lambda x: x / 2, jnp.zeros(2), trace=trace_count)
    with pytest.raises(ValueError, match="structure and shapes of trace_init"):
        SOLVE(lambda x: x / 2, jnp.zeros(2), trace=(lambda a, x, fx, aux: x, jnp.zeros(3)))


def test_zeros_like_and_half_normal_like():
    tree = {"a": jnp.ones((200, 50), jnp.float32), "b": jnp.ones(7, jnp.bfloat16)}
    zeros = banax.zeros_like(tree)
    assert all(bool(jnp.all(v == 0)) for v in jax.tree.leaves(zeros))
    noise = banax.half_normal_like(jax.random.key(0), tree)
    assert jax.tree.structure(noise) == jax.tree.structure(tree)
    assert noise["a"].dtype == jnp.float32 and noise["b"].dtype == jnp.bfloat16
    a = np.asarray(noise["a"])
    zero_fraction = np.mean(a == 0)
    assert abs(zero_fraction - 0.5) < 0.03  # 10⁴ Bernoulli(½) draws: σ = 0.005
    nonzero = a[a != 0]
    assert abs(nonzero.mean()) < 0.05 and abs(nonzero.std() - 1) < 0.05
    with pytest.raises(TypeError, match="floating-point"):
        banax.half_normal_like(jax.random.key(0), jnp.zeros(3, jnp.int32))


def test_result_codes_are_the_integers_of_banax_0_1_5():
    assert [int(code) for code in banax.Result] == [0, 1, 2]
    assert banax.Result(1) is banax.Result.MAX_STEPS
    assert "max_steps" in banax.Result.MAX_STEPS.message
    assert "last finite iterate" in banax.Result.DIVERGED.message


@pytest.mark.parametrize("max_steps, code", [(200, 0), (3, 1)])
def test_a_result_compares_as_an_int_and_as_a_code_inside_jit(max_steps, code):
    solve = Direct(Iterate(rtol=1e-12, max_steps=max_steps))

    @jax.jit
    def checks(w):
        sol = solve((lambda x, w: w @ x + B, w), jnp.zeros(2))
        return sol.result, sol.result == code, sol.result == banax.Result(code)

    result, as_int, as_code = checks(W)
    assert result.dtype == jnp.int32 and result.shape == ()
    assert int(result) == banax.Result(code) and bool(as_int) and bool(as_code)


def test_batched_results_are_an_int_array_with_a_short_summary():
    solve = Direct(Iterate(rtol=1e-12, max_steps=4, batch_axis=0))
    # Row 0 starts at its fixed point; the others need more than 4 steps; row 2 blows up.
    x0 = jnp.stack([EXPECTED, jnp.zeros(2), jnp.array([jnp.inf, 0.0])])
    sol = solve(lambda x: x @ W.T + B[None, :], x0)
    assert sol.result.dtype == jnp.int32
    assert sol.result.tolist() == [0, 1, 2]
    assert (sol.result == banax.Result.MAX_STEPS).tolist() == [False, True, False]
    assert banax.result_summary(sol.result) == "CONVERGED: 1, MAX_STEPS: 1, DIVERGED: 1"
    assert banax.result_summary(jnp.zeros(16, jnp.int32)) == "CONVERGED: 16"
