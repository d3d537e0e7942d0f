"""What the tasks of `banax demo` share: their dependency checks, their one-line
complaints (exit code 2), and the adjoint named on the command line."""

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any

from .._adjoint import AbstractAdjoint
from .._registry import REGISTRY, UnknownNameError, get_adjoint

EXTRA = "pip install 'banax[demo]'"
# What every task imports beyond banax: import name -> distribution name.
NEEDS = {"optax": "optax", "tqdm": "tqdm"}
# What `--plot` imports beyond that.
PLOT_NEEDS = {"matplotlib": "matplotlib"}


def missing(needs: dict[str, str]) -> list[str]:
    """The distributions of `needs` (import name -> distribution) that do not import."""
    absent = []
    for module, distribution in needs.items():
        try:
            importlib.import_module(module)
        except ImportError:
            absent.append(distribution)
    return absent


def fail(message: str) -> int:
    """Print `message` as one line on stderr; returns the exit code 2."""
    print(f"banax demo: {message}", file=sys.stderr)
    return 2


def needs_complaint(plot: str | None, needs: dict[str, str] | None = None) -> int | None:
    """The exit code 2, after one line naming what to install, when `NEEDS`, `needs`
    or (given a `--plot` path) `PLOT_NEEDS` do not all import; else None."""
    absent = missing(NEEDS | (needs or {}) | (PLOT_NEEDS if plot else {}))
    return fail(f"needs {', '.join(absent)}: {EXTRA}") if absent else None


def missing_directory(option: str, path: str | None) -> str | None:
    """The one-line complaint when `path`'s directory does not exist, else None.

    Checked before any training, so that a typo does not cost the whole run.
    """
    if path is None:
        return None
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        return None
    return (f"{option} {path}: the directory {directory} does not exist; create it "
            "first or choose another path")


def build_adjoint(args: argparse.Namespace, solver: str = "anderson") -> Any:
    """The adjoint named on the command line, around the named solver in batch mode.

    The solver is `--solver`, else `solver`, with the `--solver-option`s (a task puts
    its own defaults first in `args.solver_option`, so that the command line wins). An
    adjoint with a backward solver (`b_solver`, e.g. `implicit`) that is not given one
    with `--adjoint-option b_solver=...` gets the forward solver's settings; one with
    `on_failure` gets `"ignore"` unless told otherwise, since the demo reports the
    backward solves' outcome in its epoch lines instead of warning at every step.
    """
    spec = {"name": args.solver or solver, "batch_axis": 0, **dict(args.solver_option)}
    options = dict(args.adjoint_option)
    takes = {f.name for f in dataclasses.fields(REGISTRY.resolve("adjoint", args.adjoint))}
    if "b_solver" in takes and "b_solver" not in options:
        options["b_solver"] = dict(spec)
    if "on_failure" in takes:
        options.setdefault("on_failure", "ignore")
    return get_adjoint(args.adjoint, solver=spec, **options)


def adjoint_or_complaint(args: argparse.Namespace,
                         solver: str = "anderson") -> AbstractAdjoint | int:
    """`build_adjoint(args, solver)`, or the exit code 2 after one line on stderr
    when a name is not registered or an option is refused."""
    try:
        return build_adjoint(args, solver)
    except UnknownNameError as error:
        return fail(str(error))
    except (TypeError, ValueError) as error:
        return fail(f"cannot build --solver {args.solver or solver} / "
                    f"--adjoint {args.adjoint}: {error}")
