"""Every FSpec form, pytree and batched states, precisions, transformations,
registration and bad input, for the three regularizers; values and gradients are
checked against the closed forms of conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax_reg import denoising_energy, hutchinson_jacobian_frobenius, jacobian_spectral_norm

REGULARIZERS = [jacobian_spectral_norm, hutchinson_jacobian_frobenius, denoising_energy]
NAMES = [r.__name__ for r in REGULARIZERS]
SPECTRAL, HUTCHINSON, DENOISING = REGULARIZERS


def _affine(x, A, b):
    return A @ x + b


def _affine_of_dict(x, p):
    return p["A"] @ x + p["b"]


def _affine_with_aux(x, A, b):
    pre = A @ x
    return pre + b, {"pre": pre}


# -- FSpec forms -------------------------------------------------------------------------
# Gradients must reach positional args, keyword args and module fields for every
# regularizer; the remaining forms share the same binding code and are checked once.
FORMS = {  # plus "args", conftest's affine_spec, and "module", conftest's Affine
    "kwargs": lambda A, b: (_affine, (A,), {"b": b}),
    "bare": lambda A, b: (lambda x: _affine(x, A, b)),
    "single_arg": lambda A, b: (_affine_of_dict, {"A": A, "b": b}),
    "has_aux": lambda A, b: (_affine_with_aux, (A, b)),
}
CASES = [(reg, form) for reg in REGULARIZERS for form in ("kwargs", "module")] + [
    (HUTCHINSON, "bare"), (DENOISING, "single_arg"), (HUTCHINSON, "has_aux")
]


@pytest.mark.parametrize("reg, form", CASES, ids=[f"{r.__name__}-{f}" for r, f in CASES])
def test_fspec_forms_pass_gradients_to_every_parameter(reg_env, linear_problem, reg, form):
    A, b, x = linear_problem
    f_spec_of = reg_env.Affine if form == "module" else FORMS[form]
    options = {"has_aux": True} if form == "has_aux" else {}
    value, grads = reg_env.value_and_grads(reg, f_spec_of, A, b, x, **options)
    reg_env.assert_matches_linear_truth(reg, value, grads, A, b, x)


def test_has_aux_is_required_for_a_pair_output(linear_problem, reg_env):
    A, b, x = linear_problem
    with pytest.raises(ValueError, match="pass has_aux=True"):
        HUTCHINSON(FORMS["has_aux"](A, b), x, key=reg_env.KEY)


# -- pytree and batched states -----------------------------------------------------------
# Per sample i, f is A_i = c_i Q_i (Q_i orthogonal) on the flattened sample, and x is
# its fixed point: σ_max = c_i, ‖A_i‖²_F / d = c_i² exactly per Rademacher probe, and
# the denoising energy is σ² c_i² χ²_d / d per draw.
C = np.array([0.5, 1.0, 2.0])
D = 7  # entries per sample: a (2, 2) leaf and a (3,) leaf


def _split(flat):
    return {"a": flat[:, :4].reshape(-1, 2, 2), "b": (flat[:, 4:],)}


def _pytree_batched_affine(x, A, b):
    flat = jnp.concatenate([x["a"].reshape(-1, 4), x["b"][0]], axis=1)
    return _split(jnp.einsum("bij,bj->bi", A, flat) + b)


@pytest.fixture(scope="module")
def pytree_problem(reg_env):
    rng = np.random.default_rng(4)
    A = reg_env.scaled_orthogonal(rng, D, C, batch=(3,))
    flat = rng.normal(size=(3, D))
    b = flat - np.einsum("bij,bj->bi", A, flat)
    return (_pytree_batched_affine, (A, b)), _split(jnp.asarray(flat))


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
def test_pytree_state_per_sample_and_whole(reg_env, pytree_problem, reg):
    """`batch_axis=0`: one closed form per sample. No batch axis: the whole state, whose
    Jacobian is block diagonal, so `σ_max = max c_i` and `‖J‖²_F / d` is the mean over
    samples (`d = 3 · 7`); the denoising energy reduces like the latter."""
    f_spec, x = pytree_problem
    options = reg_env.OPTIONS[reg.__name__]
    per_sample = reg(f_spec, x, key=reg_env.KEY, batch_axis=0, **options)
    assert per_sample.shape == (3,)
    if reg is DENOISING:
        s2, n = reg_env.SIGMA**2, reg_env.N_SAMPLES
        std = s2 * C**2 * np.sqrt(2 / (D * n))  # Var χ²_d / d = 2 / d
        np.testing.assert_array_less(np.abs(per_sample - s2 * C**2), reg_env.Z * std)
        return
    whole = reg(f_spec, x, key=reg_env.KEY, **options)
    assert whole.shape == ()
    if reg is SPECTRAL:
        np.testing.assert_allclose(per_sample, C, rtol=1e-9)
        np.testing.assert_allclose(whole, C.max(), rtol=1e-9)
    else:
        np.testing.assert_allclose(per_sample, C**2, rtol=1e-10)
        np.testing.assert_allclose(whole, np.mean(C**2), rtol=1e-10)


# -- precisions --------------------------------------------------------------------------
# f runs in the state's dtype through the same flat map for all three regularizers.
# Every regularizer in every precision, under the suite's strict dtype and rank promotion.
PRECISIONS = [(reg, dtype) for reg in REGULARIZERS
              for dtype in (jnp.float16, jnp.bfloat16, jnp.float32)]


@pytest.mark.parametrize("reg, dtype", PRECISIONS,
                         ids=[f"{r.__name__}-{jnp.dtype(d).name}" for r, d in PRECISIONS])
def test_low_precision_states_give_float32_results(reg_env, linear_problem, reg, dtype):
    """`f` runs in the state's dtype, the estimate in float32: against the float64
    closed form of the rounded inputs, within a few roundings of the state's dtype
    plus the statistical tolerance. Gradients come back in the parameters' dtype."""
    A, b, x = (a.astype(dtype) for a in linear_problem)
    value, grads = reg_env.value_and_grads(reg, reg_env.affine_spec, A, b, x)
    assert value.dtype == jnp.float32
    assert all(g.dtype == dtype and bool(jnp.all(jnp.isfinite(g))) for g in grads)
    truth, _, value_std, _ = reg_env.linear_truth(
        reg, *(np.asarray(a, np.float64) for a in (A, b, x))
    )
    np.testing.assert_allclose(value, truth, rtol=4 * float(jnp.finfo(dtype).eps),
                               atol=reg_env.Z * value_std)


# -- transformations ---------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
def test_jit_of_vmap_over_keys_of_value_and_grad(reg_env, linear_problem, reg):
    """Each key of a batch, under `jit` (with a traced `sigma`), gives an estimate and
    gradients that match the closed forms; distinct keys give distinct draws."""
    A, b, x = linear_problem
    keys = jax.random.split(reg_env.KEY)
    sigma = {"sigma": jnp.asarray(reg_env.SIGMA)} if reg is DENOISING else {}

    @jax.jit
    def batched(keys, options):
        return jax.vmap(
            lambda k: reg_env.value_and_grads(reg, reg_env.affine_spec, A, b, x, key=k, **options)
        )(keys)

    values, grads = batched(keys, sigma)
    for i in range(len(keys)):
        reg_env.assert_matches_linear_truth(
            reg, values[i], jax.tree.map(lambda g: g[i], grads), A, b, x
        )
    if reg is not SPECTRAL:  # converged power iterations agree to rounding
        assert values[0] != values[1]


# -- registration ------------------------------------------------------------------------


def test_registered_with_banax():
    regs = {r.name: r for r in banax.registrations("regularizer")}
    for reg in REGULARIZERS:
        assert regs[reg.__name__].distribution == "banax-reg"
        assert banax.get_regularizer(reg.__name__) is reg
        assert getattr(banax.regularization, reg.__name__) is reg
    with pytest.raises(LookupError, match="jacobian_spectral_norm"):
        banax.get_regularizer("jacobian_frobenius")


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
@without_annotation_checks()
def test_missing_or_invalid_key(reg_env, reg):
    x = jnp.ones(3)
    with pytest.raises(TypeError, match=f"{reg.__name__}.*'key'"):
        reg(jnp.tanh, x)
    with pytest.raises(TypeError, match=r"needs a PRNG key: pass key=jax.random.key\(seed\)"):
        reg(jnp.tanh, x, key=None)
    with pytest.raises(TypeError, match="must be a PRNG key .* got int"):
        reg(jnp.tanh, x, key=0)
    with pytest.raises(ValueError, match=r"single PRNG key, .* shape \(2,\)"):
        reg(jnp.tanh, x, key=jax.random.split(reg_env.KEY))
    with pytest.raises(ValueError, match=r"single PRNG key, .* shape \(2, 2\)"):
        reg(jnp.tanh, x, key=jax.random.split(jax.random.PRNGKey(0)))


def test_legacy_keys_and_numpy_n_steps_are_accepted(reg_env, linear_problem):
    """A raw uint32 key draws what its typed wrapper draws; a NumPy integer `n_steps`
    is the Python int (the checks are shared by the three regularizers)."""
    A, b, x = linear_problem
    raw = jax.random.PRNGKey(3)
    legacy = reg_env.value_and_grads(SPECTRAL, reg_env.affine_spec, A, b, x, key=raw,
                                     n_steps=np.int64(100))
    typed = reg_env.value_and_grads(SPECTRAL, reg_env.affine_spec, A, b, x,
                                    key=jax.random.wrap_key_data(raw))
    np.testing.assert_array_equal(legacy[0], typed[0])
    reg_env.assert_matches_linear_truth(SPECTRAL, *legacy, A, b, x)


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
@pytest.mark.parametrize(
    "n_steps, error, message",
    [(0, ValueError, "must be >= 1, got 0"), (-2, ValueError, "must be >= 1, got -2"),
     (2.0, TypeError, "Python int"), (True, TypeError, "Python int"),
     (jnp.array(3), TypeError, "Python int")],
)
@without_annotation_checks()
def test_invalid_n_steps(reg_env, reg, n_steps, error, message):
    with pytest.raises(error, match=f"{reg.__name__}: n_steps .*{message}"):
        reg(jnp.tanh, jnp.ones(3), key=reg_env.KEY, n_steps=n_steps)


@pytest.mark.parametrize(
    "sigma, message",
    [(-0.1, ">= 0, got -0.1"), (float("nan"), ">= 0, got nan"),
     (jnp.ones(2), r"scalar, got shape \(2,\)")],
)
@without_annotation_checks()
def test_invalid_sigma(reg_env, sigma, message):
    with pytest.raises(ValueError, match=f"sigma.*{message}"):
        DENOISING(jnp.tanh, jnp.ones(3), key=reg_env.KEY, sigma=sigma)
    with pytest.raises(ValueError, match="scalar"):  # shapes are checked under jit too
        jax.jit(lambda s: DENOISING(jnp.tanh, jnp.ones(3), key=reg_env.KEY, sigma=s))(
            jnp.ones(2))


@pytest.mark.parametrize("reg", REGULARIZERS, ids=NAMES)
@pytest.mark.parametrize(
    "f_spec, x, error, message",
    [
        (lambda x: x[:2], jnp.ones(3), ValueError, "same structure"),
        ((jnp.tanh, (), {}, ()), jnp.ones(3), TypeError, "f_spec must be one of"),
        (("tanh", ()), jnp.ones(3), TypeError, "must be callable"),
        (jnp.tanh, jnp.ones(3, jnp.int32), TypeError, "must be floating point"),
        (lambda x: x, jnp.ones(3, jnp.complex64), TypeError, "real floating-point"),
        (jnp.tanh, jnp.ones((2, 3)), ValueError, "batch_axis=2 is out of range"),
    ],
    ids=["wrong_output", "malformed_fspec", "not_callable", "integer_state",
         "complex_state", "bad_batch_axis"],
)
@without_annotation_checks()
def test_bad_calls_are_explained(reg_env, reg, f_spec, x, error, message):
    batch_axis = 2 if "batch_axis" in message else None
    with pytest.raises(error, match=f"{reg.__name__}: .*{message}"):
        reg(f_spec, x, key=reg_env.KEY, batch_axis=batch_axis)
