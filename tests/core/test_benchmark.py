"""`banax.benchmark`, the harness behind `banax bench`: each public function on tiny
problems, against plainly written NumPy or a dense implicit-function-theorem gradient,
and the rule that the command, the study and the scripts use it through public names."""

import ast
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax import benchmark
from banax.benchmark import (
    LEARNING_RATE,
    WIDE_FACTOR,
    SolveOnly,
    adjoint_table,
    build_adjoint,
    compile_timed,
    describe_machine,
    f_loop,
    f_spec,
    gradient_error,
    interleaved_times,
    markdown_table,
    measure_solver,
    parse_solver_item,
    problem,
    reference_gradient,
    residual_curve,
    solver_options,
    solver_table,
    target,
    targets,
    train_step,
)
from helpers import dense_implicit_grad

ROOT = Path(__file__).resolve().parents[2]


def numpy_problem(batch: int, features: int, seed: int = 0) -> tuple[dict, np.ndarray]:
    params, x = problem(batch, features, seed)
    return {k: np.asarray(v, np.float64) for k, v in params.items()}, np.asarray(x, np.float64)


def numpy_fixed_point(params: dict, x: np.ndarray) -> np.ndarray:
    """z* of the benchmark problem by plain Picard iteration in float64 (it contracts)."""
    injection = x @ params["U"].T + params["b"]
    z = np.zeros_like(injection)
    for _ in range(3000):
        z = np.tanh(z @ params["W"].T + injection)
    return z


# --- the problem -------------------------------------------------------------------


def test_problem_matches_its_description():
    params, x = problem(8, 64, seed=1)
    assert all(v.dtype == np.float32 for v in (*params.values(), x))
    w = np.asarray(params["W"], np.float64)
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_allclose(np.linalg.eigvalsh(w), np.linspace(0, 0.98, 64), atol=1e-5)
    assert x.shape == (8, 64) and params["U"].shape == (64, 64)
    assert 0.15 < np.std(np.asarray(x)) < 0.25
    np.testing.assert_array_equal(np.asarray(params["b"]), np.zeros(64))


def test_f_spec_is_tanh_of_the_layer_with_the_injection_computed_once():
    params, x = problem(3, 5, seed=0)
    p64, x64 = numpy_problem(3, 5)
    f, args = f_spec(params, x)
    z = jnp.asarray(np.linspace(-1, 1, 15).reshape(3, 5), jnp.float32)
    expected = np.tanh(np.asarray(z, np.float64) @ p64["W"].T + x64 @ p64["U"].T + p64["b"])
    np.testing.assert_allclose(np.asarray(f(z, *args)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(target(x)), np.roll(np.asarray(x), 1, axis=0))


def test_f_loop_evaluates_f_n_times_from_zero():
    params, x = problem(2, 4, seed=0)
    p64, x64 = numpy_problem(2, 4)
    z = np.zeros_like(x64)
    for _ in range(7):
        z = np.tanh(z @ p64["W"].T + x64 @ p64["U"].T + p64["b"])
    got = f_loop(params, x, jnp.asarray(7))
    np.testing.assert_allclose(np.asarray(got), z, rtol=1e-5, atol=1e-6)


def test_solver_options_are_per_sample_absolute_tolerance_in_batch_mode():
    assert solver_options(1e-3, 40) == {"atol": 1e-3, "rtol": 0.0, "max_steps": 40,
                                        "batch_axis": 0}


def test_solve_only_returns_the_fixed_point_to_the_tolerance():
    params, x = problem(3, 6, seed=0)
    p64, x64 = numpy_problem(3, 6)
    solver = banax.get_solver("picard", **solver_options(1e-5, 500))
    sol = SolveOnly(solver)(f_spec(params, x), jnp.zeros_like(x))
    assert np.all(np.asarray(sol.result) == int(banax.Result.CONVERGED))
    # Picard's error is at most its residual / (1 − 0.98).
    np.testing.assert_allclose(np.asarray(sol.value), numpy_fixed_point(p64, x64),
                               atol=1e-5 / 0.02)


# --- gradients ---------------------------------------------------------------------


def test_reference_gradient_is_the_dense_implicit_gradient():
    params, x64 = numpy_problem(2, 6)
    _, x = problem(2, 6, seed=0)
    z = numpy_fixed_point(params, x64)
    goal = np.roll(x64, 1, axis=0)

    def f(z, theta):
        w, u, b = theta
        return jnp.tanh(z @ w.T + x64 @ u.T + b[None, :])

    theta = tuple(jnp.asarray(params[k]) for k in ("W", "U", "b"))
    expected = dense_implicit_grad(f, jnp.asarray(z), theta, jnp.asarray(z - goal))
    got = reference_gradient({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, x)
    for name, want in zip(("W", "U", "b"), expected, strict=True):
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-9)


def test_reference_gradient_refuses_a_problem_newton_cannot_solve():
    params, x = problem(2, 4, seed=0)
    x = x.at[0, 0].set(jnp.nan)  # no iterate ever passes the convergence test
    with pytest.raises(RuntimeError, match="Newton's method did not converge"):
        reference_gradient(params, x)


def test_gradient_error_is_relative_over_all_arrays():
    reference = {"a": np.asarray([3.0, 0.0]), "b": np.asarray([[4.0]])}
    assert gradient_error(reference, reference) == 0.0
    # ‖(0.3, 0, 0.4)‖ / ‖(3, 0, 4)‖ = 0.5 / 5.
    off = {"a": jnp.asarray([3.3, 0.0], jnp.float32), "b": jnp.asarray([[4.4]], jnp.float32)}
    assert gradient_error(off, reference) == pytest.approx(0.1, rel=1e-6)


def test_train_step_is_an_sgd_step_on_the_exact_gradient():
    params, x = problem(2, 6, seed=0)
    solver = banax.get_solver("picard", **solver_options(1e-6, 2000))
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver)
    loss, grads, new = jax.jit(train_step(adjoint, x))(params)
    p64, x64 = numpy_problem(2, 6)
    z = numpy_fixed_point(p64, x64)
    assert float(loss) == pytest.approx(0.5 * np.sum((z - np.roll(x64, 1, axis=0)) ** 2),
                                        rel=1e-4)
    assert gradient_error(grads, reference_gradient(params, x)) < 1e-3
    for k in params:
        np.testing.assert_allclose(np.asarray(new[k]),
                                   np.asarray(params[k]) - LEARNING_RATE * np.asarray(grads[k]),
                                   rtol=1e-6, atol=1e-9)


# --- compiling and timing ----------------------------------------------------------


def test_compile_timed_returns_the_compiled_function_and_its_compile_time():
    def fn(a, b):
        return a * b + 1.0

    a, b = jnp.arange(3.0), jnp.full((3,), 2.0)
    compiled, seconds = compile_timed(fn, a, b)
    assert seconds > 0
    np.testing.assert_array_equal(np.asarray(compiled(a, b)), [1.0, 3.0, 5.0])
    with pytest.raises(TypeError):  # compiled ahead of time for these shapes only
        compiled(jnp.arange(4.0), jnp.arange(4.0))


@pytest.mark.parametrize(("repeats", "rows"), [(3, 3), (0, 1)])
def test_interleaved_times_warm_up_then_take_turns(repeats, rows):
    calls_made = []

    def call(name):
        def run(value):
            calls_made.append(name)
            return jnp.asarray(value)
        return run

    times = interleaved_times([(call("a"), (1.0,)), (call("b"), (2.0,))], repeats)
    assert times.shape == (rows, 2)
    assert np.all(times > 0)
    # One untimed call each, then one call each per round, in turn.
    assert calls_made == ["a", "b"] * (rows + 1)


def test_describe_machine_names_jax_and_the_device():
    line = describe_machine()
    device = jax.devices()[0]
    assert f"JAX {jax.__version__} on {device.platform}" in line
    assert "cores available" in line and "Python" in line


# --- rows and tables ---------------------------------------------------------------


def test_measure_solver_counts_steps_and_evaluations_exactly():
    params, x = problem(2, 6, seed=0)
    p64, x64 = numpy_problem(2, 6)
    loop, _ = compile_timed(f_loop, params, x, jnp.asarray(1))
    solver = banax.get_solver("picard", **solver_options(1e-4, 500))
    row = measure_solver("picard", solver, params, x, loop, repeats=2, train=False)
    # Per-sample Picard steps from zero until ‖f(z) − z‖ ≤ 1e-4, in float64 NumPy.
    injection = x64 @ p64["U"].T + p64["b"]
    z, steps = np.zeros_like(x64), np.full(2, -1)
    for k in range(500):
        fz = np.tanh(z @ p64["W"].T + injection)
        steps[(np.linalg.norm(fz - z, axis=-1) <= 1e-4) & (steps < 0)] = k
        z = fz
    assert abs(row["steps"] - steps.max()) <= 1
    assert row["evals"] == row["steps"] + 1 and row["converged"]
    assert "train_ms" not in row
    for key in ("forward_ms", "forward_f", "overhead", "compile_s", "t_f_ms"):
        assert np.isfinite(row[key]) and row[key] > 0, key


def test_residual_curve_is_the_largest_residual_per_evaluation():
    params, x = problem(2, 6, seed=0)
    p64, x64 = numpy_problem(2, 6)
    solver = banax.get_solver("picard", **solver_options(1e-4, 500))
    curve = residual_curve(solver, params, x, evals=12)
    assert curve.shape == (12,)
    # The first evaluation is f(0) = tanh(injection), so the residual is its norm.
    first = np.tanh(x64 @ p64["U"].T + p64["b"])
    assert curve[0] == pytest.approx(np.max(np.linalg.norm(first, axis=-1)), rel=1e-5)
    # A contraction with Lipschitz constant 0.98: every residual shrinks by that factor.
    assert np.all(curve[1:] <= 0.98 * curve[:-1] * (1 + 1e-5))


def test_markdown_table():
    assert markdown_table(["a", "b"], [["1", "2"], ["3", "4"]]) == (
        "| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |"
    )


def solver_row(label: str, converged: bool = True, t_f_ms: float = 0.5) -> dict:
    return {"solver": label, "steps": 10, "mean_steps": 8.25, "evals": 11,
            "converged": converged, "forward_ms": 5.04, "forward_f": 10.1, "overhead": 1.234,
            "compile_s": 0.42, "t_f_ms": t_f_ms, "train_ms": 12.0, "train_f": 24.0}


def test_solver_table_columns_marks_and_median_t_f():
    rows = [solver_row("picard"), solver_row("anderson", False, 0.7),
            solver_row("broyden", t_f_ms=0.2)]
    lines = solver_table(rows, train=False).splitlines()
    assert lines[0] == ("| solver | steps (max / mean) | f evals | forward ms | forward / t_f "
                        "| overhead | compile s |")
    assert lines[2] == "| picard | 10 / 8.2 | 11 | 5.0 | 10.1 | 1.23 | 0.4 |"
    assert lines[3].startswith("| anderson | 10 / 8.2 (not converged) |")
    assert lines[-1].endswith("compiled loop): 0.500 ms")
    trained = solver_table(rows, train=True).splitlines()
    assert "| overhead | train ms | train / t_f | compile s |" in trained[0]
    assert trained[2] == "| picard | 10 / 8.2 | 11 | 5.0 | 10.1 | 1.23 | 12.0 | 24.0 | 0.4 |"


def test_adjoint_table_reports_memory_at_both_step_caps():
    row = {"adjoint": "jfb", "solver": "Picard", "train_ms": 3.0, "train_f": 30.0,
           "memory_mb": 1.5, "memory_wide_mb": 1.5, "grad_error": 0.123, "compile_s": 0.5}
    lines = adjoint_table([row], max_steps=50).splitlines()
    assert f"memory MiB (max_steps=50) | memory MiB (max_steps={WIDE_FACTOR * 50})" in lines[0]
    assert lines[2] == "| jfb | Picard | 3.0 | 30.0 | 1.50 | 1.50 | 1.2e-01 | 0.5 |"


def test_targets_read_only_the_default_configurations():
    def row(label: str, overhead: float, steps: int) -> dict:
        name, _, options = label.partition(":")
        return {"solver": label, "name": name, "options": {"o": 1} if options else {},
                "overhead": overhead, "steps": steps, "forward_f": 10 * overhead,
                "train_f": 20 * overhead, "converged": True}

    # The configured rows are faster and come last, so a lookup by name would take them.
    rows = [row("picard", 1.05, 100), row("anderson", 1.2, 40),
            row("picard:o=1", 1.0, 90), row("anderson:o=1", 1.0, 10)]
    checked = {t["what"]: (t["value"], t["limit"], t["ok"]) for t in targets(rows, train=True)}
    assert checked == {
        "picard overhead": (1.05, 1.10, True), "anderson overhead": (1.2, 1.30, True),
        "anderson steps / picard steps": (0.4, 0.5, True),
        "fastest forward (picard), in t_f": (10.5, 30.0, True),
        "fastest training step (picard), in t_f": (21.0, 60.0, True),
    }
    assert targets([row("anderson:o=1", 1.0, 10)], train=False) == []
    assert targets([row("broyden", 1.5, 10)], train=False)[0] == {
        "what": "broyden overhead", "value": 1.5, "limit": 1.40, "ok": False}


# --- solver items and adjoints -----------------------------------------------------


def test_solver_item_values_are_literals_or_bare_words():
    shared = solver_options(1e-4, 10)
    assert parse_solver_item("--solvers", "anderson", shared) == ("anderson", {})
    assert parse_solver_item("--solvers", " anderson : depth = 10 : damp=1.0 ", shared) == (
        "anderson", {"depth": 10, "damp": 1.0}
    )
    _, options = parse_solver_item(
        "--solvers", "anderson:use_linalg=False:ridge=None:loop_kind='bounded'", shared
    )
    assert options == {"use_linalg": False, "ridge": None, "loop_kind": "bounded"}
    assert type(options["use_linalg"]) is bool
    assert parse_solver_item("--solvers", "anderson:loop_kind=lax:damp=-5e-1", shared)[1] == {
        "loop_kind": "lax", "damp": -0.5
    }


@pytest.mark.parametrize(("item", "words"), [
    ("anderson:depth", ["kernels.py item 'anderson:depth'", "'depth' is not KEY=VALUE"]),
    (":depth=3", ["names no solver"]),
    ("anderson:depth=1:depth=2", ["sets depth twice"]),
    ("anderson:damp=[1", ["neither a Python literal nor a bare word"]),
    ("anderson:damp=(1, 2)", ["is a tuple"]),
    ("anderson:atol=1", ["sets atol", "atol=0.0001, rtol=0.0, max_steps=10, batch_axis=0"]),
])
def test_bad_solver_items_name_the_option_and_the_fix(item, words):
    with pytest.raises(ValueError) as error:
        parse_solver_item("kernels.py", item, solver_options(1e-4, 10))
    for word in words:
        assert word in str(error.value)


def test_build_adjoint_completes_solver_specs_with_the_shared_options():
    forward = ("anderson", {"depth": 2, "damp": 1.0})
    implicit = build_adjoint("implicit+picard", forward, 1e-3, 50)
    assert (implicit.solver.depth, implicit.solver.damp, implicit.solver.max_steps) == (
        2, 1.0, 50
    )
    assert (implicit.solver.atol, implicit.solver.rtol, implicit.solver.batch_axis) == (
        1e-3, 0.0, 0
    )
    assert type(implicit.b_solver).__name__ == "Picard"
    assert implicit.b_solver.max_steps == 50
    # A solver the adjoint names itself does not take the forward options.
    assert type(build_adjoint("gdeq", forward, 1e-3, 50).solver).__name__ == "Broyden"
    phantom = build_adjoint("unroll_phantom", forward, 1e-3, 50)
    assert phantom.b_solver.max_steps == 5


# --- used through public names, without a cycle ------------------------------------


def test_public_names_are_documented():
    public = [n for n in dir(benchmark) if not n.startswith("_")
              and getattr(getattr(benchmark, n), "__module__", None) == "banax.benchmark"]
    assert set(public) <= set(benchmark.__all__)
    for name in benchmark.__all__:
        value = getattr(benchmark, name)
        if callable(value) and getattr(value, "__module__", None) == "banax.benchmark":
            assert value.__doc__, name


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """`(module, names)` of every import in a file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = None
    if "src" in path.parts:  # a module of the installed package
        parts = path.relative_to(ROOT / "banax_core" / "src").with_suffix("").parts
        package = parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                assert package is not None, path
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            out.append((module, [alias.name for alias in node.names]))
    return out


USERS = sorted(
    [*(ROOT / "banax_core" / "src" / "banax" / "cli").glob("*.py"),
     *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").rglob("*.py")]
)


def test_nothing_imports_private_names_of_the_harness_or_the_command():
    wrong = []
    for path in USERS:
        for module, names in imports(path):
            if module == "banax.benchmark" or module.startswith("banax.cli.bench"):
                wrong += [(path.name, module, n) for n in names if n.startswith("_")]
            # The command is reached by `banax bench`, or its add_arguments and run.
            if module == "banax.cli.bench":
                wrong += [(path.name, module, n) for n in names
                          if n not in ("add_arguments", "run")]
    assert not wrong


def test_the_harness_depends_on_nothing_of_the_command_line_nor_private_modules():
    for module, _ in imports(ROOT / "banax_core" / "src" / "banax" / "benchmark.py"):
        assert not module.startswith("banax.cli"), module
        assert not module.startswith("banax._"), module
    # The study and the cells benchmark measure with the harness, not with the command
    # that imports them.
    for name in ("bench_mnist.py", "bench_cells.py"):
        for module, names in imports(ROOT / "banax_core" / "src" / "banax" / "cli" / name):
            assert module != "banax.cli.bench" and not (
                module == "banax.cli" and "bench" in names), (name, module)


def test_importing_the_harness_loads_no_command_line_module():
    code = ("import sys, banax.benchmark; "
            "print(sorted(m for m in sys.modules if m.startswith('banax.cli')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"
