"""banax.nn.GraphCell and Graph: the cell against a dense reference of the same maths,
the well-posedness projection, contraction, implicit gradients against a dense
implicit-function-theorem solve, batch mode, and each bad input's message."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks
from jax.experimental import sparse

import banax
from banax.nn import Graph, GraphCell
from banax.nn._graph import project_rows_l1
from helpers import dense_implicit_grad

TOL = {jnp.float32: 2e-5, jnp.float64: 1e-11}


def _close(a, b, dtype):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=TOL[dtype],
                                   atol=TOL[dtype] * np.max(np.abs(y)))


def _edges(n, seed=0):
    """A path over `n` nodes plus a few random chords (an irregular graph)."""
    rng = np.random.default_rng(seed)
    s, r = np.arange(n - 1), np.arange(1, n)
    extra = rng.integers(0, n, (2, n // 2))
    return np.concatenate([s, extra[0]]), np.concatenate([r, extra[1]])


def _dense_normalised(senders, receivers, n):
    """`D^{-1/2} (A + I) D^{-1/2}`, written densely."""
    a = np.eye(n)
    a[senders, receivers] = 1
    a[receivers, senders] = 1
    d = a.sum(axis=1)
    return a / np.sqrt(d[:, None] * d[None, :])


def _supports(weight, radius):
    """Per row of a concrete `weight`: None if inside the ℓ1 ball of `radius`, else the
    support of its projection, found by trying every size (no sorting trick)."""
    supports = []
    for a in np.abs(np.asarray(weight, np.float64)):
        if a.sum() <= radius:
            supports.append(None)
            continue
        for k in range(1, a.size + 1):
            theta = (np.sort(a)[::-1][:k].sum() - radius) / k
            if np.sum(a > theta) == k:  # the threshold gives back the support it came from
                break
        supports.append(a > theta)
    return supports


def _reference_projection(weight, radius, supports=None):
    """Each row onto the ℓ1 ball, `sign(w) (|w| − θ)` on the support, θ in jnp (so
    that it differentiates); the supports from a concrete copy of `weight`."""
    supports = _supports(weight, radius) if supports is None else supports
    rows = []
    for row, support in zip(weight, supports):
        if support is None:
            rows.append(row)
            continue
        support = jnp.asarray(support)
        theta = (jnp.sum(jnp.where(support, jnp.abs(row), 0)) - radius) / jnp.sum(
            support.astype(row.dtype))
        rows.append(jnp.sign(row) * jnp.where(support, jnp.abs(row) - theta, 0))
    return jnp.stack(rows)


def _reference_cell(weight, inject, adjacency, z, u, kappa, rho, act=jax.nn.relu,
                    supports=None):
    w = _reference_projection(weight, kappa / rho, supports)
    return act(adjacency @ (z @ w.T + u @ inject.T))


def _normal(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64).astype(dtype)


@pytest.fixture(scope="module")
def graph64():
    s, r = _edges(7)
    return Graph.from_edges(s, r, 7, dtype=jnp.float64), _dense_normalised(s, r, 7)


def test_from_edges_is_the_symmetric_normalisation_with_unit_spectral_radius(graph64):
    graph, dense = graph64
    np.testing.assert_allclose(np.asarray(graph.adjacency.todense()), dense, rtol=1e-12)
    assert graph.num_nodes == 7
    # ρ is an upper bound, tight to the power iteration's tolerance.
    assert 1.0 <= float(graph.spectral_radius) <= 1.0 + 2e-4


def test_spectral_radius_of_a_general_adjacency_bounds_the_dense_one():
    a = np.abs(np.asarray(_normal(0, (9, 9), jnp.float64)))
    a[a < 0.8] = 0  # sparse, not symmetric, not normalised
    a[0, 1] = -2.0  # a negative weight: ρ(|A|) is the bound the cell needs
    graph = Graph(sparse.BCOO.fromdense(jnp.asarray(a)))
    truth = np.max(np.abs(np.linalg.eigvals(np.abs(a))))
    assert truth <= float(graph.spectral_radius) <= truth * (1 + 2e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cell_matches_the_dense_reference_values_and_gradients(dtype, activation):
    s, r = _edges(6, seed=1)
    graph = Graph.from_edges(s, r, 6, dtype=dtype)
    dense = jnp.asarray(_dense_normalised(s, r, 6), dtype)
    # A large W, so that the projection is active on most rows.
    cell = GraphCell(4, 3, kappa=0.8, activation=activation, key=jax.random.key(0),
                     dtype=dtype)
    cell = eqx.tree_at(lambda c: c.weight, cell, _normal(1, (4, 4), dtype))
    z, u = _normal(2, (6, 4), dtype), _normal(3, (6, 3), dtype)
    act = jax.nn.relu if activation == "relu" else jnp.tanh
    rho = float(graph.spectral_radius)
    supports = _supports(cell.weight, 0.8 / rho)

    def ours(params, z, u):
        return jnp.sum(jnp.sin(eqx.combine(params, cell)(z, (graph, u))))

    def theirs(params, z, u):
        w, om = params
        return jnp.sum(jnp.sin(_reference_cell(w, om, dense, z, u, 0.8, rho, act, supports)))

    params = eqx.filter(cell, eqx.is_inexact_array)
    _close(cell(z, (graph, u)),
           _reference_cell(cell.weight, cell.inject, dense, z, u, 0.8, rho, act), dtype)
    g_ours = jax.grad(ours, argnums=(0, 1, 2))(params, z, u)
    g_theirs = jax.grad(theirs, argnums=(0, 1, 2))((cell.weight, cell.inject), z, u)
    _close(((g_ours[0].weight, g_ours[0].inject), g_ours[1], g_ours[2]), g_theirs, dtype)


def test_projection_bounds_the_weight_after_every_update(graph64):
    graph, _ = graph64
    cell = GraphCell(5, 2, kappa=0.7, key=jax.random.key(0))
    z, u = _normal(0, (7, 5), jnp.float64), _normal(1, (7, 2), jnp.float64)

    @jax.jit
    def step(cell):
        # A loss that pushes W outwards, with a large step: W leaves the ball.
        grads = jax.grad(lambda c: -jnp.sum(c(z, (graph, u)) ** 2) - jnp.sum(c.weight))(cell)
        return jax.tree.map(lambda p, g: p - 0.5 * g, cell, grads)

    bound = 0.7 / float(graph.spectral_radius)
    for _ in range(5):
        cell = step(cell)
        w = cell.projected_weight(graph)
        assert np.max(np.sum(np.abs(np.asarray(w)), axis=1)) <= bound * (1 + 1e-12)
    assert np.max(np.sum(np.abs(np.asarray(cell.weight)), axis=1)) > 2 * bound
    # The projection is the nearest point of the ball, and leaves rows inside it alone.
    np.testing.assert_allclose(cell.projected_weight(graph),
                               _reference_projection(cell.weight, bound), rtol=1e-12)
    small = cell.weight * (0.5 * bound / np.max(np.sum(np.abs(np.asarray(cell.weight)), 1)))
    np.testing.assert_array_equal(project_rows_l1(small, jnp.asarray(bound)), small)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_cell_is_a_contraction_in_the_perron_weighted_norm(activation):
    s, r = _edges(8, seed=2)
    graph = Graph.from_edges(s, r, 8, dtype=jnp.float64)
    dense = _dense_normalised(s, r, 8)
    eigvals, eigvecs = np.linalg.eigh(dense)
    v = np.abs(eigvecs[:, -1])  # the Perron vector (ρ = 1)
    cell = GraphCell(4, 3, kappa=0.9, activation=activation, key=jax.random.key(0))
    cell = eqx.tree_at(lambda c: c.weight, cell, 3 * _normal(1, (4, 4), jnp.float64))
    u = _normal(2, (8, 3), jnp.float64)

    def norm(d):
        return np.max(np.abs(np.asarray(d)) / v[:, None])

    ratios = []
    for seed in range(20):
        z1, z2 = _normal(10 + seed, (8, 4), jnp.float64), _normal(40 + seed, (8, 4), jnp.float64)
        ratios.append(norm(cell(z1, (graph, u)) - cell(z2, (graph, u))) / norm(z1 - z2))
    assert max(ratios) <= 0.9 + 1e-12
    # The map really is expansive without the projection (so the test could fail).
    w = cell.weight
    raw = np.max(np.abs(np.linalg.eigvals(np.kron(dense, np.asarray(w)))))
    assert raw > 1


def _deq(axis, cell):
    solver = {"name": "picard", "rtol": 1e-13, "atol": 1e-14, "max_steps": 400,
              "batch_axis": axis}
    return banax.DEQ(cell, adjoint={"name": "implicit", "solver": solver, "b_solver": solver})


def test_implicit_gradient_matches_the_dense_ift_gradient(graph64):
    graph, dense = graph64
    dense = jnp.asarray(dense)
    cell = GraphCell(4, 3, kappa=0.9, key=jax.random.key(3))
    cell = eqx.tree_at(lambda c: c.weight, cell, 2 * _normal(4, (4, 4), jnp.float64))
    u = _normal(5, (7, 3), jnp.float64)
    c = _normal(6, (7, 4), jnp.float64)
    deq = _deq(None, cell)

    def loss(params, u):
        model = eqx.combine(params, deq)
        return jnp.sum(c * model((graph, u)))

    params = eqx.filter(deq, eqx.is_inexact_array)
    g_params, g_u = jax.grad(loss, argnums=(0, 1))(params, u)

    rho = float(graph.spectral_radius)
    supports = _supports(cell.weight, 0.9 / rho)

    def f(z, theta):
        w, om, u = theta
        return _reference_cell(w, om, dense, z, u, 0.9, rho, supports=supports)

    z_star = deq((graph, u))
    np.testing.assert_allclose(z_star, f(z_star, (cell.weight, cell.inject, u)), atol=1e-12)
    truth = dense_implicit_grad(f, z_star, (cell.weight, cell.inject, u), c)
    ours = (g_params.cell.weight, g_params.cell.inject, g_u)
    for a, b in zip(ours, truth):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_batch_mode_equals_per_sample_solves():
    graphs = [Graph.from_edges(*_edges(6, seed=k), 6, dtype=jnp.float64) for k in range(3)]
    # One graph with a different spectral radius (not normalised): its own projection.
    a = np.asarray(graphs[2].adjacency.todense()) * 1.7
    graphs[2] = Graph(sparse.BCOO.fromdense(jnp.asarray(a), nse=graphs[2].adjacency.nse + 4))
    cell = GraphCell(4, 2, key=jax.random.key(0))
    cell = eqx.tree_at(lambda c: c.weight, cell, 2 * _normal(1, (4, 4), jnp.float64))
    u = _normal(2, (3, 6, 2), jnp.float64)
    c = _normal(3, (3, 6, 4), jnp.float64)
    stacked = Graph.stack(graphs)

    def loss_batched(params):
        return jnp.sum(c * _deq(0, eqx.combine(params, cell))((stacked, u)))

    def loss_single(params):
        single = _deq(None, eqx.combine(params, cell))
        return sum(jnp.sum(c[i] * single((g, u[i]))) for i, g in enumerate(graphs))

    params = eqx.filter(cell, eqx.is_inexact_array)
    z_b = _deq(0, cell)((stacked, u))
    for i, g in enumerate(graphs):
        np.testing.assert_allclose(z_b[i], _deq(None, cell)((g, u[i])), rtol=1e-10,
                                   atol=1e-12)
    g_b = jax.grad(loss_batched)(params)
    g_s = jax.grad(loss_single)(params)
    for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
    # One graph shared by a batch of node inputs, without stacking (outside a DEQ).
    z = _normal(4, (3, 6, 4), jnp.float64)
    shared = cell(z, (graphs[0], u))
    for i in range(3):
        np.testing.assert_allclose(shared[i], cell(z[i], (graphs[0], u[i])), rtol=1e-12)


def test_zero_state_lets_the_deq_run_without_state_shape(graph64):
    graph, _ = graph64
    cell = GraphCell(4, 3, key=jax.random.key(0))
    z = banax.DEQ(cell, solver="anderson")((graph, jnp.ones((7, 3))))
    assert z.shape == (7, 4)
    assert cell.zero_state((graph, jnp.ones((2, 7, 3)))).shape == (2, 7, 4)


# -- bad input: one line each, naming the argument and the fix -------------------------


@without_annotation_checks()
def test_bad_adjacencies():
    with pytest.raises(TypeError, match="adjacency must be a jax.experimental.sparse.BCOO"):
        Graph(jnp.eye(3))
    with pytest.raises(ValueError, match="adjacency must be a square"):
        Graph(sparse.BCOO.fromdense(jnp.ones((3, 4))))
    bad = jnp.eye(3).at[0, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="adjacency has 1 non-finite entries"):
        Graph(sparse.BCOO.fromdense(bad))
    with pytest.raises(ValueError, match="adjacency has 1 non-finite entries"):
        Graph(sparse.BCOO.fromdense(jnp.eye(3).at[2, 2].set(jnp.nan)))
    with pytest.raises(TypeError, match="adjacency must hold floats"):
        Graph(sparse.BCOO.fromdense(jnp.eye(3, dtype=jnp.int32)))
    with pytest.raises(TypeError, match="adjacency is traced"):
        jax.jit(lambda a: Graph(sparse.BCOO.fromdense(a, nse=3)).spectral_radius)(jnp.eye(3))
    with pytest.raises(ValueError, match=r"node indices must lie in \[0, num_nodes=3\)"):
        Graph.from_edges([0, 1], [1, 3], 3)
    with pytest.raises(ValueError, match="1-D integer arrays of equal length"):
        Graph.from_edges([0, 1], [1], 3)
    with pytest.raises(ValueError, match="same number of nodes"):
        Graph.stack([Graph.from_edges([0], [1], 2), Graph.from_edges([0], [1], 3)])


@without_annotation_checks()
def test_bad_cell_arguments_and_calls(graph64):
    graph, _ = graph64
    for kappa in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"kappa must be in \(0, 1\)"):
            GraphCell(4, 3, kappa=kappa, key=jax.random.key(0))
    with pytest.raises(ValueError, match="activation must be 'relu' or 'tanh'"):
        GraphCell(4, 3, activation="gelu", key=jax.random.key(0))
    with pytest.raises(TypeError, match="features must be an int >= 1"):
        GraphCell(0, 3, key=jax.random.key(0))
    cell = GraphCell(4, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match="the adjacency has 7 nodes but the state has 5"):
        cell(jnp.zeros((5, 4)), (graph, jnp.zeros((5, 3))))
    with pytest.raises(ValueError, match=r"u \(nodes, 3\) or \(N, nodes, 3\)"):
        cell(jnp.zeros((7, 4)), (graph, jnp.zeros((7, 2))))
    with pytest.raises(TypeError, match=r"x must be a tuple \(graph, u\)"):
        cell(jnp.zeros((7, 4)), jnp.zeros((7, 3)))
    stacked = Graph.stack([graph, graph])
    with pytest.raises(ValueError, match="a batch of 2 graphs needs a state"):
        cell(jnp.zeros((3, 7, 4)), (stacked, jnp.zeros((3, 7, 3))))
    # Through the DEQ, a mismatched graph fails before the solve, in one line.
    with pytest.raises(ValueError, match="the adjacency has 7 nodes but the state has 5"):
        banax.DEQ(cell, solver="picard")((graph, jnp.zeros((5, 3))))
