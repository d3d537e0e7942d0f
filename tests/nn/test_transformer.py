"""banax.nn.TransformerCell against a plainly written reference of the same maths, its
causality, memory, batch mode and dropout, and the implicit gradient of a DEQ of it
against a dense implicit-function-theorem solve."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import nn
from helpers import dense_implicit_grad

DIM, HEADS, HIDDEN, LENGTH, MAX_LENGTH = 8, 2, 12, 5, 9


def _normal(seed, shape, dtype=jnp.float64):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64).astype(dtype)


def _cell(dropout=0.0, seed=0):
    cell = nn.TransformerCell(DIM, HEADS, HIDDEN, MAX_LENGTH, dropout=dropout,
                              key=jax.random.key(seed), dtype=jnp.float64)
    # Random layer-norm scales and shifts and position biases, so that the reference
    # checks where each enters (they start at 1, 0 and ALiBi's ramp).
    norms = tuple(eqx.tree_at(lambda n: (n.weight, n.bias), norm,
                              (1 + 0.3 * _normal(10 + i, (DIM,)), 0.3 * _normal(20 + i, (DIM,))))
                  for i, norm in enumerate(cell.norms))
    bias = cell.position_bias + 0.3 * _normal(30, cell.position_bias.shape)
    return eqx.tree_at(lambda c: (c.norms, c.position_bias), cell, (norms, bias))


# -- the reference: one head at a time, masks and biases built entry by entry ----------


def _layer_norm(v, norm):
    mean = jnp.mean(v, axis=-1, keepdims=True)
    var = jnp.mean((v - mean) ** 2, axis=-1, keepdims=True)
    return (v - mean) / jnp.sqrt(var + 1e-5) * norm.weight[None, :] + norm.bias[None, :]


def reference(cell, z, x, memory=None):
    """The cell's maths for one sequence, written out head by head."""
    heads, e = cell.qkv.shape[1], cell.qkv.shape[3]
    length, past = z.shape[0], 0 if memory is None else memory.shape[0]
    ln1, ln2, ln3 = (lambda v, n=n: _layer_norm(v, n) for n in cell.norms)
    # Rows of the attended span: the memory (no gradient, no injection), then z.
    span = ln1(z) if memory is None else jnp.concatenate(
        [ln1(jax.lax.stop_gradient(memory)), ln1(z)])
    injected = jnp.concatenate([jnp.zeros((past, z.shape[1])), x])
    heads_out = []
    for h in range(heads):
        wq, wk, wv = cell.qkv[0, h], cell.qkv[1, h], cell.qkv[2, h]
        uq, uk, uv = cell.inject[0, h], cell.inject[1, h], cell.inject[2, h]
        q = ln1(z) @ wq + x @ uq + cell.qkv_bias[0, h][None, :]
        k = span @ wk + injected @ uk + cell.qkv_bias[1, h][None, :]
        v = span @ wv + injected @ uv + cell.qkv_bias[2, h][None, :]
        index = np.zeros((length, past + length), int)
        allowed = np.zeros((length, past + length), bool)
        for i in range(length):
            for j in range(past + length):
                distance = past + i - j
                allowed[i, j] = distance >= 0
                index[i, j] = max(distance, 0)
        scores = q @ k.T / math.sqrt(e) + cell.position_bias[h][jnp.asarray(index)]
        scores = jnp.where(jnp.asarray(allowed), scores, -1e300)
        weights = jnp.exp(scores - jnp.max(scores, axis=1, keepdims=True))
        heads_out.append((weights / jnp.sum(weights, axis=1, keepdims=True)) @ v)
    wo = jnp.concatenate([cell.out[h] for h in range(heads)], axis=0)
    y = z + jnp.concatenate(heads_out, axis=1) @ wo + cell.out_bias[None, :]
    f = jnp.maximum(ln2(y) @ cell.ff_in + cell.ff_in_bias[None, :], 0.0) @ cell.ff_out
    return ln3(y + f + cell.ff_out_bias[None, :])


@eqx.filter_jit
def _apply(f, *args):
    return f(*args)


@pytest.fixture(scope="module")
def inputs():
    z = _normal(1, (2, LENGTH, DIM))
    x = _normal(2, (2, LENGTH, DIM))
    memory = _normal(3, (2, 3, DIM))
    return z, x, memory


@pytest.mark.parametrize("with_memory", [False, True], ids=["plain", "memory"])
def test_matches_the_reference_values_and_gradients(inputs, with_memory):
    cell = _cell()
    z, x, memory = (a[0] for a in inputs)
    c = _normal(4, z.shape)
    arg = (x, memory) if with_memory else x
    ref_memory = memory if with_memory else None

    value = eqx.filter_jit(reference)(cell, z, x, ref_memory)
    np.testing.assert_allclose(cell(z, arg), value, rtol=1e-12, atol=1e-12)

    @eqx.filter_jit
    def grads(f, cell, z, x):
        return eqx.filter_grad(lambda czx: jnp.sum(c * f(*czx)))((cell, z, x))

    got = grads(lambda c_, z, x: c_(z, (x, memory) if with_memory else x), cell, z, x)
    want = grads(lambda c_, z, x: reference(c_, z, x, ref_memory), cell, z, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_causal_a_change_at_t_moves_nothing_before_t(inputs):
    cell = _cell()
    z, x, _ = (a[0] for a in inputs)
    cell = eqx.filter_jit(cell)
    base = cell(z, x)
    # Not a constant shift, which the layer norms would remove.
    nudge = _normal(9, (DIM,))
    for t in range(LENGTH):
        moved_z = cell(z.at[t].add(nudge), x)
        moved_x = cell(z, x.at[t].add(nudge))
        for moved in (moved_z, moved_x):
            np.testing.assert_array_equal(moved[:t], base[:t])
            assert np.max(np.abs(moved[t] - base[t])) > 1e-3


def test_memory_is_attended_without_gradient(inputs):
    cell = _cell()
    call = eqx.filter_jit(cell)
    z, x, memory = (a[0] for a in inputs)
    with_memory = call(z, (x, memory))
    # Attended: every position's output depends on it...
    changed = call(z, (x, memory.at[0].add(_normal(9, (DIM,)))))
    assert np.all(np.max(np.abs(changed - with_memory), axis=1) > 1e-4)
    assert np.max(np.abs(with_memory - call(z, x))) > 1e-3
    # ...but no gradient flows into it, while the cell's key weights get one through it.
    g_memory = _apply(jax.grad(lambda m: jnp.sum(cell(z, (x, m)) ** 2)), memory)
    np.testing.assert_array_equal(g_memory, np.zeros_like(memory))
    g_memory_part = _apply(eqx.filter_grad(lambda c: jnp.sum(c(z, (x, memory)) ** 2)
                                           - jnp.sum(c(z, x) ** 2)), cell)
    assert np.max(np.abs(g_memory_part.qkv[1])) > 1e-6


def test_batch_equals_each_sequence(inputs):
    cell = eqx.filter_jit(_cell())
    z, x, memory = inputs
    for arg, per in (((x), lambda i: x[i]), ((x, memory), lambda i: (x[i], memory[i]))):
        batched = cell(z, arg)
        for i in range(z.shape[0]):
            np.testing.assert_allclose(batched[i], cell(z[i], per(i)), rtol=1e-13, atol=1e-13)
    assert _cell().zero_state((x, memory)).shape == z.shape
    assert _cell().zero_state(x[0]).shape == z[0].shape


def test_dropout_mask_is_fixed_per_key(inputs):
    cell = _cell(dropout=0.5)
    call = eqx.filter_jit(cell)
    z, x, _ = inputs
    a, b = jax.random.key(0), jax.random.key(1)
    np.testing.assert_array_equal(call(z, x, key=a), call(z, x, key=a))
    assert np.max(np.abs(call(z, x, key=a) - call(z, x, key=b))) > 1e-3
    # Sequences of a batch get their own masks: two equal sequences come out different.
    twins = call(jnp.stack([z[0], z[0]]), jnp.stack([x[0], x[0]]), key=a)
    assert np.max(np.abs(twins[0] - twins[1])) > 1e-3
    # One key, one mask at every iteration: the solve reaches a true fixed point of
    # z ↦ cell(z, x, key=a), which a fresh mask per iteration would not have.
    light = _cell(dropout=0.2)
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-10, "atol": 1e-10,
              "max_steps": 500}
    z_star, solution = _apply(lambda c, x: banax.DEQ(c, solver=solver)(
        x, key=a, return_solution=True), light, 0.5 * x)
    assert np.all(solution.result == banax.Result.CONVERGED), solution.stats
    np.testing.assert_allclose(_apply(lambda c, z: c(z, 0.5 * x, key=a), light, z_star),
                               z_star, atol=1e-8)
    # Inference mode turns dropout off.
    off = eqx.filter_jit(eqx.nn.inference_mode(cell))
    np.testing.assert_allclose(off(z, x), eqx.filter_jit(_cell())(z, x), rtol=1e-13,
                               atol=1e-13)


def test_implicit_gradient_matches_dense_ift():
    """A DEQ of the cell solved to 1e-12 in float64; the gradient of Σ c·z* with respect
    to the cell and the input equals `(∂f/∂θ)ᵀ (I − ∂f/∂z)⁻ᵀ c` from a dense solve."""
    cell = _cell()
    x = 0.5 * _normal(5, (2, 4, DIM))
    c = _normal(6, (2, 4, DIM))
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-12, "atol": 1e-12,
              "max_steps": 200}
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver)

    def loss(cell, x):
        z, solution = banax.DEQ(cell, adjoint=adjoint)(x, return_solution=True)
        return jnp.sum(c * z), (z, solution)

    (_, (z, solution)), grads = eqx.filter_jit(eqx.filter_value_and_grad(
        lambda cx: loss(*cx), has_aux=True))((cell, x))
    assert np.all(solution.result == banax.Result.CONVERGED)
    params, static = eqx.partition((cell, x), eqx.is_inexact_array)
    truth = dense_implicit_grad(
        lambda z, p: (lambda c_, x_: c_(z, x_))(*eqx.combine(p, static)), z, params, c)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(truth), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9 * np.max(np.abs(b)))


@pytest.mark.parametrize("kwargs, error, words", [
    ({"dim": 8, "heads": 3}, ValueError, ["heads must divide dim", "dim=8", "heads=3"]),
    ({"dim": 0}, TypeError, ["dim must be an int >= 1", "0"]),
    ({"max_length": 2.5}, TypeError, ["max_length must be an int >= 1"]),
    ({"dropout": 1.0}, ValueError, ["dropout must be a rate in [0, 1)", "1.0"]),
])
@without_annotation_checks()
def test_bad_construction(kwargs, error, words):
    args = {"dim": DIM, "heads": HEADS, "hidden": HIDDEN, "max_length": MAX_LENGTH} | kwargs
    with pytest.raises(error) as info:
        nn.TransformerCell(**args, key=jax.random.key(0))
    assert all(w in str(info.value) for w in words), str(info.value)


@without_annotation_checks()
def test_bad_calls(inputs):
    cell = _cell()
    z, x, memory = inputs
    long_z = _normal(7, (MAX_LENGTH + 1, DIM))
    bad = [
        (lambda: cell(long_z, long_z), ["length 10", "max_length=9", "max_length >= 10"]),
        # The memory counts towards the attended span.
        (lambda: cell(z[0], (x[0], _normal(8, (5, DIM)))), ["attends over 10",
                                                            "max_length=9"]),
        (lambda: cell(z, (x, memory[..., :6])), ["memory", "dim=8", "(2, 3, 6)"]),
        (lambda: cell(z, (x, memory[0])), ["memory", "batched like z"]),
        (lambda: cell(z, x[..., :6]), ["z and the embedded input x", "(2, 5, 6)"]),
        (lambda: cell(z, (x, memory, memory)), ["pair (embedded, memory)", "3 items"]),
    ]
    for call, words in bad:
        with pytest.raises(ValueError) as info:
            call()
        assert all(w in str(info.value) for w in words), str(info.value)
    with pytest.raises(TypeError, match=r"dropout=0.5 needs key="):
        _cell(dropout=0.5)(z, x)
