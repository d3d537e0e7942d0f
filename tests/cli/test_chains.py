"""`banax demo --task chains`: the data, the models' reach, a short training run that
lowers the loss, the command line's output and its bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax.cli import _chains, _training, main


@pytest.fixture
def optax_promotion():
    """optax's Adam mixes a Python float with an int32 step count, which the suite's
    strict dtype promotion rejects; banax's own code runs strict either way."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_chains_show_the_class_only_at_the_head():
    data = _chains.chains(7, chains_per_class=5, seed=1)
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        assert x.shape == (10, 7, 2) and y.shape == (10, 7) and y.dtype == np.int32
        assert np.array_equal(np.bincount(y[:, 0]), [5, 5])
        assert np.array_equal(np.argmax(x[:, 0], axis=1), y[:, 0])  # the head's one-hot
        assert not x[:, 1:].any()  # nothing anywhere else
        assert np.all(y == y[:, :1])  # every node carries its chain's class


def test_parse_model():
    assert _chains.parse_model(None) == (("deq", "gcn"), _chains.DEFAULT_LENGTHS)
    assert _chains.parse_model("all:5,8") == (("deq", "gcn", "unrolled"), (5, 8))
    for bad in ("mlp", "deq:", "deq:1", "deq:ten"):
        with pytest.raises(ValueError, match="--model"):
            _chains.parse_model(bad)


def test_path_graph_is_the_papers_directed_normalised_chain():
    # The paper's adjacency in its own orientation: edges i -> i+1 only, plus
    # self-loops, normalised by the row sums; the cell's one-row-per-node form is
    # its transpose. Its eigenvalues are its diagonal: ρ = 1.
    length = 6
    a = np.eye(length) + np.eye(length, k=1)
    d = a.sum(axis=1)
    paper = a / np.sqrt(d[:, None] * d[None, :])
    graph = _chains.path_graph(length)
    dense = np.asarray(graph.adjacency.todense())
    np.testing.assert_allclose(dense, paper.T, rtol=1e-6)
    assert not np.triu(dense, k=1).any()  # node i hears only itself and i - 1
    np.testing.assert_allclose(float(graph.spectral_radius),
                               np.max(np.abs(np.linalg.eigvals(np.abs(dense)))), rtol=1e-6)


def test_the_cell_starts_at_kappa_times_the_identity():
    model = _chains.ChainsDEQ({"name": "implicit", "solver": "picard"}, 5, 4,
                              key=jax.random.key(0))
    np.testing.assert_allclose(model.deq.cell.weight, _chains.KAPPA * np.eye(4), rtol=1e-7)
    # On the ball's boundary (ρ = 1), so the projection keeps it as it is.
    np.testing.assert_allclose(model.deq.cell.projected_weight(_chains.path_graph(5)),
                               _chains.KAPPA * np.eye(4), rtol=1e-6)


def test_the_two_layer_gcn_sees_two_hops_and_the_deq_the_whole_chain():
    # Change the head's input: the GCN's logits move at nodes 0-2 only; the DEQ's
    # (solved for enough steps) beyond (where relu has not zeroed the state).
    length = 8
    x = jnp.zeros((1, length, 2), jnp.float32).at[0, 0, 0].set(1.0)
    moved = x.at[0, 0].set(jnp.asarray([0.0, 1.0], jnp.float32))
    gcn = _chains.ChainsGCN(length, 4, key=jax.random.key(0))
    change = np.abs(np.asarray(gcn(moved)[0] - gcn(x)[0]))[0].sum(axis=1)
    assert np.all(change[:3] > 0) and np.all(change[3:] == 0)
    solver = {"name": "picard", "batch_axis": 0, "max_steps": _chains.solve_steps(length),
              "rtol": 0.0, "atol": 0.0}
    deq = _chains.ChainsDEQ({"name": "implicit", "solver": solver}, length, 4,
                            key=jax.random.key(0))
    change = np.abs(np.asarray(deq(moved)[0] - deq(x)[0]))[0].sum(axis=1)
    assert np.all(change > 1e-3)  # every node, the tail included, hears the head


def test_readout_is_unit_length_and_scale_free():
    z = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [3e-10, 4e-10], [3e-17, 4e-17]], jnp.float32)
    out = _chains.readout(z)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0], [0.6, 0.8], [0, 0]], rtol=1e-6)
    grad = jax.grad(lambda z: jnp.sum(_chains.readout(z)[:, 0]))(z)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_training_lowers_the_loss(optax_promotion):
    data = _chains.chains(6, chains_per_class=8, seed=0)
    solver = {"name": "picard", "batch_axis": 0, "max_steps": 8, "rtol": 0.0, "atol": 0.0}
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                                on_failure="ignore")
    model = _chains.ChainsDEQ(adjoint, 6, 16, key=jax.random.key(0))

    @eqx.filter_jit
    def loss(model, x, y):
        return _training.cross_entropy(model(x)[0], y)

    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    before = float(loss(model, x, y))
    model, history = _training.train(model, data, _training.optimizer(40, 3e-2),
                                     epochs=10, batch=4)
    after = float(loss(model, x, y))
    assert after < 0.5 * before, (before, after)
    assert history[-1].test_accuracy > 0.9
    # A fixed step count (rtol = atol = 0): fewer only at an exact float32 fixed point.
    assert all(1 <= e.f_steps <= 8 and 1 <= e.b_steps <= 8 for e in history)
    # The implicit adjoint's projection keeps W in its ball: ‖W̃‖_∞ ≤ κ/ρ.
    graph = _chains.path_graph(6)
    w = model.deq.cell.projected_weight(graph)
    assert np.max(np.sum(np.abs(np.asarray(w)), axis=1)) <= _chains.KAPPA * (1 + 1e-6)


@pytest.mark.slow
def test_demo_prints_epochs_and_the_final_accuracy(capsys, tmp_path):
    plot = tmp_path / "chains.png"
    assert main(["demo", "--task", "chains", "--model", "both:5", "--epochs", "2",
                 "--width", "4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "epoch   2/2" in out and "forward steps" in out and "backward steps" in out
    assert "deq length 5: test accuracy" in out and "gcn length 5: test accuracy" in out
    assert "test accuracy by chain length" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, words", [
    (("--model", "transformer"), "the chains task trains deq, gcn"),
    (("--model", "deq:0"), "integers >= 2"),
    (("--epochs", "0"), "--epochs must be >= 1, got 0"),
    (("--plot", "/no/such/dir/x.png"), "the directory /no/such/dir does not exist"),
    (("--solver", "nope"), "nope"),
])
def test_bad_input_is_one_line_before_any_work(capsys, args, words):
    # A later --model replaces the first (argparse keeps the last).
    assert main(["demo", "--task", "chains", "--model", "deq:4", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
