"""banax: deep equilibrium models in JAX/Equinox.

`import banax` loads no plugin: solvers, adjoints and regularizers are discovered
through the `banax` entry-point group the first time a name is looked up.
"""

from importlib import metadata as _metadata

from . import adjoint, hookspecs, nn, regularization, solver, utils
from ._adjoint import (
    Adjoint,
    BackwardRuleAdjoint,
    BackwardSolveWarning,
    LinearSolveAdjoint,
    PairingError,
    solve,
)
from ._deq import DEQ
from ._failures import ForwardSolveWarning, SolveSummary, skip_if, solve_summary, step_failed
from ._spectral_radius import spectral_radius
from ._trajectory import evenly_spaced, trajectory, trajectory_loss
from ._warm_start import FixedPointCache, initial_guess_loss
from ._fspec import BoundFunction, FSpec, bind
from ._layout import Layout
from ._loop import (
    BanaxPrecisionWarning,
    FlatSolution,
    iterate,
    reachable_tolerances,
    residual_norms,
    solve_flat,
    squared_norms,
    stats_dtype,
    working_dtype,
)
from ._options import (
    check_choice,
    check_flag,
    check_integer,
    check_options,
    check_real,
    normalise_options,
)
from ._problem import Problem, make_problem
from ._registry import (
    BanaxPluginWarning,
    PluginConflictError,
    PluginError,
    PluginFailure,
    Registration,
    UnknownNameError,
    get_adjoint,
    get_regularizer,
    get_solver,
    plugin_failures,
    register_plugin,
    registrations,
    unregister_plugin,
)
from ._solution import BackwardStats, Result, Solution, Stats, result_summary
from ._solver import InvertibleStep, LowRankInverseJacobian, Solver
from ._trace import TracedFunction
from .hookspecs import hookimpl
from .utils import (
    half_normal_like,
    trace_count,
    trace_history,
    trace_last,
    trace_last_aux,
    zeros_like,
)

try:
    __version__ = _metadata.version("banax-core")
except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout
    __version__ = "0.0.0"

__all__ = [
    "Adjoint", "BackwardRuleAdjoint", "BackwardSolveWarning", "BackwardStats", "PairingError",
    "result_summary", "BanaxPluginWarning", "BoundFunction", "DEQ", "FSpec",
    "FlatSolution", "InvertibleStep", "Layout", "LinearSolveAdjoint", "LowRankInverseJacobian",
    "PluginConflictError", "PluginError", "PluginFailure", "Problem", "Registration",
    "Result", "Solution", "Solver", "Stats", "TracedFunction", "UnknownNameError",
    "adjoint", "bind", "check_choice", "check_flag", "check_integer", "check_options",
    "check_real", "get_adjoint", "get_regularizer", "get_solver", "half_normal_like", "hookimpl",
    "hookspecs", "iterate", "make_problem", "normalise_options", "plugin_failures",
    "register_plugin", "registrations", "regularization", "residual_norms", "solve",
    "solve_flat", "solver", "trace_count", "trace_history", "trace_last",
    "FixedPointCache", "evenly_spaced", "initial_guess_loss", "spectral_radius",
    "trajectory", "trajectory_loss", "trace_last_aux",
    "unregister_plugin", "utils", "working_dtype", "zeros_like",
    "BanaxPrecisionWarning", "reachable_tolerances", "squared_norms", "stats_dtype",
    "ForwardSolveWarning", "SolveSummary", "skip_if", "solve_summary", "step_failed",
]
