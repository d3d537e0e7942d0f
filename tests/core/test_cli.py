"""`banax --help`, `banax plugins` and `banax bench`: each command once as a user runs it, in
a subprocess; the bench's options and bad input in process (`banax.cli.main`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from banax.cli import main

BANAX = str(Path(sys.executable).parent / "banax")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BANAX, *args], capture_output=True, text=True, env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_help_lists_every_command():
    out = run("--help")
    assert out.returncode == 0
    for command in ("plugins", "demo", "bench"):
        assert command in out.stdout


def test_plugins_lists_names_with_distribution_and_version_and_failures(tmp_path):
    info = tmp_path / "broken_cli_plugin-3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-cli-plugin\nVersion: 3.1\n")
    (info / "entry_points.txt").write_text("[banax]\nbroken = broken_cli_mod\n")
    (tmp_path / "broken_cli_mod.py").write_text("import no_such_dependency_xyz\n")
    out = run("plugins", env={"PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    halpern = next(line for line in lines if line.strip().startswith("halpern "))
    assert "banax_example_plugin.Halpern" in halpern and "banax-example-plugin 0.1.0" in halpern
    assert "failed plugins:" in out.stdout
    failure = next(line for line in lines if "broken-cli-plugin" in line)
    assert "3.1" in failure and "No module named 'no_such_dependency_xyz'" in failure


def test_plugins_with_autoload_off_hides_third_party_plugins():
    out = run("plugins", env={"BANAX_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.returncode == 0
    assert "halpern" not in out.stdout
    assert "autoloading is disabled" in out.stdout


# --- banax bench ------------------------------------------------------------------
# A tiny configuration of the benchmark problem keeps each run to a few compilations.
TINY = ("--batch", "3", "--size", "16", "--repeats", "1", "--max-steps", "100")


def _bench_problem(batch: int, features: int) -> tuple[dict, np.ndarray]:
    """The benchmark problem of `banax bench --batch B --size N`, in float64 NumPy."""
    from banax.benchmark import problem

    params, x = problem(batch, features, seed=0)
    return {k: np.asarray(v, np.float64) for k, v in params.items()}, np.asarray(x, np.float64)


def _picard_steps(params: dict, x: np.ndarray, tol: float) -> np.ndarray:
    """Per-sample Picard steps from z = 0 until ‖f(z) − z‖ ≤ tol, in float64 NumPy."""
    injection = x @ params["U"].T + params["b"]
    z = np.zeros_like(injection)
    steps = np.full(len(z), -1)
    for k in range(10_000):
        fz = np.tanh(z @ params["W"].T + injection)
        done = (np.linalg.norm(fz - z, axis=-1) <= tol) & (steps < 0)
        steps[done] = k
        if np.all(steps >= 0):
            return steps
        z = fz
    raise AssertionError("Picard did not converge on the benchmark problem")


@pytest.mark.slow
def test_bench_solvers_table_json_and_plot(tmp_path):
    report, plot = tmp_path / "bench.json", tmp_path / "residuals.png"
    out = run("bench", *TINY, "--solvers", "picard,reversible", "--no-train",
              "--json", str(report), "--plot", str(plot))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["solver"]: r for r in json.loads(report.read_text())["solvers"]}
    assert set(rows) == {"picard", "reversible"}
    params, x = _bench_problem(3, 16)
    expected = _picard_steps(params, x, 1e-4)
    picard, reversible = rows["picard"], rows["reversible"]
    assert abs(picard["steps"] - expected.max()) <= 1
    assert abs(picard["mean_steps"] - expected.mean()) <= 1
    # f evaluations: the initial one, then one per Picard step, two per reversible step.
    assert picard["evals"] == picard["steps"] + 1
    assert reversible["evals"] == 2 * reversible["steps"] + 1
    for row in rows.values():
        assert row["converged"]
        for key in ("forward_ms", "forward_f", "overhead", "compile_s", "t_f_ms"):
            assert np.isfinite(row[key]) and row[key] > 0, key
        assert f"| {row['solver']} | {row['steps']} / " in out.stdout
    assert "picard overhead" in out.stdout
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_bench_cells_times_each_cell_against_its_equinox_twin(tmp_path):
    report = tmp_path / "cells.json"
    out = run("bench", "--task", "cells", "--cells", "conv,mlp", "--adjoints", "implicit,jfb",
              "--batch", "2", "--image", "4", "--channels", "4", "--cell-steps", "2",
              "--repeats", "1", "--json", str(report))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(report.read_text())["rows"]
    pairs = {(r["cell"], r["adjoint"]): [] for r in rows}
    for r in rows:
        pairs[(r["cell"], r["adjoint"])].append(r)
    assert set(pairs) == {(c, a) for c in ("conv", "mlp") for a in ("implicit", "jfb")}
    for (cell, _), (ours, theirs) in pairs.items():
        assert (ours["impl"], theirs["impl"]) == ("banax.nn", "equinox")
        assert 0 < ours["ms_min"] <= ours["ms_median"] <= ours["ms_max"]
        assert theirs["speedup"] == 1.0
        assert ours["speedup"] == pytest.approx(theirs["ms_median"] / ours["ms_median"])
        # Same weights, same solver steps: the gradients agree up to float32 rounding.
        assert ours["max_abs_grad_diff"] < 1e-4, cell
    assert "banax.nn" in out.stdout and "equinox" in out.stdout


def test_bench_cells_bad_options(capsys):
    # In process, like the other bad input: refused before anything is compiled.
    assert main(["bench", "--task", "cells", "--cells", "resnet"]) == 2
    assert "--cells must list conv and/or mlp" in capsys.readouterr().out
    assert main(["bench", "--task", "cells", "--adjoints", "gdeq"]) == 2
    assert "--task cells times the adjoints" in capsys.readouterr().out


def test_bench_adjoints_gradient_error_and_memory(tmp_path, capsys):
    # In process: the command itself runs from the shell in the tests above.
    report = tmp_path / "adjoints.json"
    code = main(["bench", *TINY, "--adjoints", "implicit,jfb,bptt", "--forward", "picard",
                 "--json", str(report)])
    assert code == 0, capsys.readouterr()
    rows = {r["adjoint"]: r for r in json.loads(report.read_text())["adjoints"]}
    # Implicit and a converged BPTT are exact up to the solver tolerance; JFB is biased.
    assert rows["implicit"]["grad_error"] < 1e-2
    assert rows["bptt"]["grad_error"] < 5e-2
    assert rows["jfb"]["grad_error"] > 10 * rows["implicit"]["grad_error"]
    # Implicit's memory does not depend on max_steps; checkpointed BPTT's grows.
    assert rows["implicit"]["memory_wide_mb"] == rows["implicit"]["memory_mb"]
    assert rows["bptt"]["memory_wide_mb"] > rows["bptt"]["memory_mb"]


def test_bench_bad_input_gets_one_clear_line(capsys, monkeypatch, tmp_path):
    # In process: these fail before any computation, so a subprocess would only add
    # the start-up time.
    assert main(["bench", "--solvers", "picard,no_such_solver"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no_such_solver" in out and "anderson" in out
    assert main(["bench", "--adjoints", "implicit,nope"]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "nope" in out and "unroll_phantom" in out
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert main(["bench", *TINY, "--plot", str(tmp_path / "r.png")]) == 2
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "pip install matplotlib" in out
    assert not (tmp_path / "r.png").exists()


# --- banax bench --solvers NAME:KEY=VALUE ----------------------------------------


def test_bench_solver_items_label_rows_and_reach_the_solver(tmp_path, capsys):
    # In process: the command itself runs from the shell in the tests above.
    report = tmp_path / "bench.json"
    items = ["picard", "relaxed:damp=1.0", "relaxed", "anderson", "anderson:depth=1"]
    code = main(["bench", *TINY, "--no-train", "--solvers", ",".join(items),
                 "--json", str(report)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    rows = {r["solver"]: r for r in json.loads(report.read_text())["solvers"]}
    assert list(rows) == items
    assert rows["relaxed:damp=1.0"]["name"] == "relaxed"
    assert rows["relaxed:damp=1.0"]["options"] == {"damp": 1.0}
    assert rows["relaxed"]["options"] == {}
    # Relaxed iteration with damp=1 is Picard: the steps of the closed-form iteration.
    params, x = _bench_problem(3, 16)
    expected = _picard_steps(params, x, 1e-4)
    for label in ("picard", "relaxed:damp=1.0"):
        assert abs(rows[label]["steps"] - expected.max()) <= 1, label
    # The defaults (damp=0.8, depth=5) take other paths to the same tolerance.
    assert rows["relaxed"]["steps"] > rows["relaxed:damp=1.0"]["steps"]
    assert rows["anderson:depth=1"]["evals"] != rows["anderson"]["evals"]
    for row in rows.values():
        assert row["converged"]
        assert f"| {row['solver']} | {row['steps']} / " in out.out


@pytest.mark.parametrize(("items", "words"), [
    ("anderson:depth", ["'depth' is not KEY=VALUE", "anderson:depth=10:damp=1.0"]),
    ("anderson:=3", ["'=3' is not KEY=VALUE"]),
    ("anderson:depth=", ["'depth=' is not KEY=VALUE"]),
    (":depth=3", ["':depth=3' names no solver"]),
    ("anderson:depth=1:depth=2", ["sets depth twice"]),
    ("anderson:damp=[1", ["'[1' is neither a Python literal nor a bare word"]),
    ("anderson:damp=1j", ["'1j' is a complex", "a number, True, False, None or a string"]),
    ("picard,anderson,picard", ["lists 'picard' more than once"]),
    ("anderson:nope=1", ["has no option(s) nope", "depth"]),
    ("anderson:depth=0", ["depth must be an int >= 1, got 0"]),
    ("no_such_solver:depth=1", ["no_such_solver", "anderson"]),
    ("anderson:atol=1", ["sets atol", "--tol or --max-steps"]),
    ("anderson:rtol=1e-3", ["sets rtol", "--tol or --max-steps"]),
    ("anderson:max_steps=5", ["sets max_steps", "--tol or --max-steps"]),
    ("anderson:batch_axis=None", ["sets batch_axis", "batch_axis=0"]),
])
def test_bench_bad_solver_items_are_refused_before_anything_runs(capsys, items, words):
    assert main(["bench", "--solvers", f"picard,{items}"]) == 2
    out = capsys.readouterr().out
    # One line: the error, no benchmark header.
    assert out.count("\n") == 1 and out.startswith("banax bench: error: ")
    for word in words:
        assert word in out, out


def test_bench_forward_items_are_refused_like_solver_items(capsys):
    for forward, word in (("anderson:max_steps=3", "sets max_steps"),
                          ("anderson:depth", "'depth' is not KEY=VALUE"),
                          ("anderson:nope=1", "has no option(s) nope")):
        assert main(["bench", "--adjoints", "implicit", "--forward", forward]) == 2
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and word in out and "banax bench: error:" in out
