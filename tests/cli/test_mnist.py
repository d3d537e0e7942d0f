"""The MNIST DEQ of `banax demo --data mnist` and `banax bench --task mnist`: data,
training, the adjoint study's report, and the command line's errors."""

import json
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax.cli import _mnist, _training, bench_mnist, main
from helpers import dense_jacobian


@pytest.fixture(scope="module")
def small() -> _training.Data:
    return _mnist.load(300, 100, seed=0)


@pytest.fixture
def optax_promotion():
    """optax's Adam mixes a Python float with an int32 step count, which the suite's
    strict dtype promotion rejects; banax's own code runs strict either way."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_load_is_a_balanced_disjoint_standardised_split():
    data = _mnist.load(seed=3)
    assert data.x_train.shape == (4000, 28, 28, 1) and data.x_test.shape == (1000, 28, 28, 1)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert np.array_equal(np.bincount(data.y_test), np.full(10, 100))
    assert np.array_equal(np.bincount(data.y_train), np.full(10, 400))
    # No image is in both sets (the 5,000 images are distinct).
    train = {row.tobytes() for row in data.x_train.reshape(4000, -1)}
    assert not any(row.tobytes() in train for row in data.x_test.reshape(1000, -1))
    pixels = np.concatenate([data.x_train.ravel(), data.x_test.ravel()])
    assert abs(pixels.mean()) < 0.1 and abs(pixels.std() - 1) < 0.1
    with pytest.raises(ValueError, match="at most 5000"):
        _mnist.load(4500, 1000)


def test_shifted_translates_each_image_within_the_limit():
    images = np.full((50, 28, 28, 1), -_mnist._MEAN / _mnist._STD, np.float32)
    images[:, 14, 14, 0] = 5.0
    moved = _mnist.shifted(images, np.random.default_rng(0), pixels=2)
    rows, cols = np.nonzero(moved[..., 0] == 5.0)[1:]
    assert len(rows) == 50  # one bright pixel per image, moved, never lost
    assert np.all(np.abs(rows - 14) <= 2) and np.all(np.abs(cols - 14) <= 2)
    assert len(set(zip(rows, cols))) > 5  # offsets differ between images
    assert np.all((moved == 5.0) | (moved == images[0, 0, 0, 0]))


@pytest.mark.slow
def test_training_lowers_the_loss_and_reports_both_solves(small, optax_promotion):
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-3, "max_steps": 20}
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                                on_failure="ignore")
    model = _mnist.MnistDEQ(adjoint, 8, key=jax.random.key(0))

    @eqx.filter_jit
    def loss(model, x, y):
        return _training.cross_entropy(model(x)[0], y)

    x, y = jnp.asarray(small.x_train), jnp.asarray(small.y_train)
    before = float(loss(model, x, y))
    model, history = _training.train(model, small, _training.optimizer(12), epochs=2,
                                     batch=50, augment=_mnist.shifted)
    after = float(loss(model, x, y))
    assert after < 0.8 * before, (before, after)
    assert [e.epoch for e in history] == [1, 2]
    for e in history:
        assert 1 <= e.f_steps <= 20 and 1 <= e.b_steps <= 20
        assert 0 <= e.b_failed <= 1 and 0 <= e.test_accuracy <= 1
        assert e.wall_s > 0 and e.cpu_s > 0
    assert history[1].wall_s > history[0].wall_s  # cumulative
    residuals = _training.residual_histories(model, jnp.asarray(small.x_test[:10]))
    assert residuals.shape[0] == 10 and residuals.shape[1] >= 2
    # Anderson from zero: the median residual ends far below where it starts.
    median = np.median(residuals, axis=0)
    assert median[-1] < 0.1 * median[0]


def _tiny_mdeq(weight: float) -> _mnist.MnistMDEQ:
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-3, "max_steps": 10}
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                                on_failure="ignore")
    return _mnist.MnistMDEQ(adjoint, (4, 4), jacobian_weight=weight, key=jax.random.key(0))


@pytest.mark.slow
def test_multiscale_penalty_adds_weight_times_the_dense_jacobian_norm(small):
    """The loss's penalty term, averaged over probes, against ‖∂f/∂z‖²_F / d from the
    dense Jacobian of the cell at the solve's `z*`."""
    weight = 0.5
    model = _tiny_mdeq(weight)
    x, y = jnp.asarray(small.x_train[:1]), jnp.asarray(small.y_train[:1])
    inject = model.inject(x)
    z = model.deq(inject)
    cross_entropy = _training.cross_entropy(model.logits(z), y)

    dense = dense_jacobian(model.deq.cell, z, inject)
    expected = float(jnp.sum(dense**2)) / dense.shape[0]

    loss = eqx.filter_jit(lambda m, k: _training.loss_and_solution(m, None, x, y, k)[0])
    terms = [(float(loss(model, jax.random.key(i))) - float(cross_entropy)) / weight
             for i in range(16)]
    assert np.mean(terms) == pytest.approx(expected, rel=0.1)
    assert np.std(terms) > 0  # a random probe, not the exact norm


def test_the_multiscale_penalty_refuses_bad_settings(small):
    with pytest.raises(ValueError, match="jacobian_weight must be >= 0.*got -1"):
        _tiny_mdeq(-1.0)
    x, y = jnp.asarray(small.x_train[:1]), jnp.asarray(small.y_train[:1])
    with pytest.raises(ValueError, match="jacobian_weight is 0.5.*needs a key"):
        _training.loss_and_solution(_tiny_mdeq(0.5), None, x, y)
    # A model without a penalty needs no key.
    assert _training.jacobian_weight(_tiny_mdeq(0.0)) == 0.0


@pytest.mark.slow
def test_the_study_reports_every_column(tmp_path, optax_promotion):
    report = tmp_path / "study.json"
    plots = tmp_path / "plots"
    plots.mkdir()
    assert main(["bench", "--task", "mnist", "--adjoints", "unroll_phantom",
                 "--epochs", "1", "--train-images", "100", "--test-images", "50",
                 "--width", "4", "--batch", "50", "--repeats", "1",
                 "--json", str(report), "--plot", str(plots)]) == 0
    result = json.loads(report.read_text())
    (row,) = result["adjoints"]
    assert row["adjoint"] == "unroll_phantom" and row["solver"] == "Anderson"
    assert 0 <= row["test_accuracy"] <= 1
    for key in ("train_wall_s", "train_cpu_s", "forward_ms", "memory_mb"):
        assert row[key] > 0, key
    assert row["backward_ms"] >= 0 and 1 <= row["forward_steps"] <= 20
    # The unrolled phantom takes exactly its b_solver's 5 steps backwards.
    assert row["backward_steps"] == 5
    assert len(row["history"]) == 1 and len(row["median_residual"]) >= 2
    assert result["backward_speedup_vs_implicit"] == {}  # no implicit row to compare with
    for name in ("mnist_accuracy.png", "mnist_residual.png"):
        assert (plots / name).read_bytes().startswith(b"\x89PNG")


def test_phantom_ratios_are_implicit_backward_over_the_phantoms():
    rows = [{"adjoint": "implicit", "backward_ms": 30.0},
            {"adjoint": "unroll_phantom", "backward_ms": 20.0},
            {"adjoint": "neumann_phantom", "backward_ms": 0.0},  # timing noise: skipped
            {"adjoint": "jfb", "backward_ms": 1.0}]
    assert bench_mnist.phantom_ratios(rows) == {"unroll_phantom": 1.5}


def test_study_table_has_the_columns():
    row = {"adjoint": "jfb", "solver": "Anderson", "test_accuracy": 0.981,
           "train_wall_s": 90.2, "train_cpu_s": 80.4, "forward_ms": 12.34,
           "backward_ms": 1.5, "forward_steps": 14.2, "backward_steps": 0.0,
           "memory_mb": 3.25}
    header, rule, line = bench_mnist.table([row]).splitlines()
    assert [c.strip() for c in header.strip("|").split("|")] == bench_mnist.COLUMNS
    assert line == "| jfb | Anderson | 98.1% | 90 / 80 | 12.3 | 1.5 | 14.2 | 0.0 | 3.2 |"


@pytest.mark.parametrize(
    "args, words",
    [
        (("--adjoints", "implicit,gdeq"), "subset of implicit,jfb,unroll_phantom"),
        (("--epochs", "0"), "--epochs must be >= 1, got 0"),
        (("--width", "6"), "(4 groups) must divide; got 6"),
        (("--train-images", "4500"), "at most 5000"),
        (("--batch", "500", "--train-images", "100"), "--batch 500 is larger than"),
        (("--plot", "no_such_dir"), "--plot no_such_dir: with --task mnist it names a "
                                    "directory"),
        (("--json", "no_such_dir/o.json"), "--json no_such_dir/o.json: the directory"),
    ],
)
def test_study_bad_input_is_one_line_before_any_work(capsys, args, words):
    assert main(["bench", "--task", "mnist", *args]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("banax bench: error: ") and words in out


@pytest.mark.parametrize("hidden", ["mlxtend", "optax", "matplotlib"])
def test_study_missing_dependency_says_what_to_install(monkeypatch, capsys, tmp_path, hidden):
    monkeypatch.setitem(sys.modules, hidden, None)  # makes `import hidden` fail
    assert main(["bench", "--task", "mnist", "--plot", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert out == (f"banax bench: error: --task mnist needs {hidden}: "
                   "pip install 'banax[demo]'.\n")


@pytest.mark.parametrize(
    "args",
    [("--json", "no_such_dir/o.json"), ("--adjoints", "--json", "no_such_dir/o.json"),
     ("--plot", "no_such_dir/r.png")],
    ids=["solvers-json", "adjoints-json", "solvers-plot"],
)
def test_bench_missing_directory_fails_before_the_run(capsys, args):
    assert main(["bench", *args]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no_such_dir does not exist; create it first" in out


def test_bench_task_solvers_refuses_adjoints(capsys):
    assert main(["bench", "--task", "solvers", "--adjoints", "jfb"]) == 2
    assert "drop --adjoints" in capsys.readouterr().out
