"""banax: deep equilibrium models in JAX/Equinox.

`banax` holds what a model builder uses: the layer, the seed's solvers, adjoints and
regularizers (`banax.solver`, `banax.adjoint`, `banax.regularization`), the toolkit,
the results and the errors. Plugin authors build on `banax.extend`.

`import banax` loads no plugin: solvers, adjoints and regularizers are discovered
through the `banax` entry-point group the first time a name is looked up.
"""

import warnings as _warnings
from importlib import metadata as _metadata
from typing import Any as _Any

# `banax.hookspecs` (the plugin hook specifications) is public, though outside `__all__`.
from . import adjoint, extend, hookspecs, internal, nn, regularization, solver, utils  # noqa: F401
from ._adjoint import Adjoint, PairingError
from ._deq import DEQ
from ._failures import (
    BackwardSolveWarning,
    ForwardSolveWarning,
    SolveSummary,
    skip_if,
    solve_summary,
    step_failed,
)
from ._fspec import FSpec
from ._numerics import BanaxPrecisionWarning, reachable_tolerances
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
from ._solver import Solver
from ._spectral_radius import spectral_radius
from ._trajectory import evenly_spaced, trajectory, trajectory_loss
from ._warm_start import FixedPointCache, initial_guess_loss
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
    # The layer, and the seed's bases, components and results.
    "DEQ", "Adjoint", "Solver", "FSpec", "Solution", "Stats", "Result", "BackwardStats",
    "result_summary", "adjoint", "solver", "regularization", "nn",
    # The registry.
    "get_solver", "get_adjoint", "get_regularizer", "registrations", "Registration",
    "plugin_failures", "PluginFailure", "register_plugin", "unregister_plugin",
    "hookimpl",
    # Errors and warnings.
    "PairingError", "BackwardSolveWarning", "BanaxPrecisionWarning", "BanaxPluginWarning",
    "PluginError", "PluginConflictError", "UnknownNameError", "reachable_tolerances",
    "ForwardSolveWarning",
    # Failed solves in training.
    "step_failed", "skip_if", "solve_summary", "SolveSummary",
    # The toolkit.
    "utils", "trace_count", "trace_history", "trace_last", "trace_last_aux", "zeros_like",
    "half_normal_like", "spectral_radius", "trajectory", "trajectory_loss",
    "evenly_spaced", "FixedPointCache", "initial_guess_loss",
    # The other audiences.
    "extend", "internal",
]

# Names the root held before `banax.extend` and `banax.internal`: each still resolves
# (with a DeprecationWarning naming its new home) so that code written against the
# earlier surface keeps working.
_MOVED = {
    "BackwardRuleAdjoint": ("extend", "AbstractBackwardRuleAdjoint"),
    "LinearSolveAdjoint": ("extend", "AbstractLinearSolveAdjoint"),
    "InvertibleStep": ("extend", "InvertibleStep"),
    "LowRankInverseJacobian": ("extend", "LowRankInverseJacobian"),
    "BoundFunction": ("extend", "BoundFunction"),
    "FlatSolution": ("extend", "FlatSolution"),
    "Problem": ("extend", "Problem"),
    "TracedFunction": ("extend", "TracedFunction"),
    "bind": ("extend", "bind"),
    "make_problem": ("extend", "make_problem"),
    "solve": ("extend", "solve"),
    "solve_flat": ("extend", "solve_flat"),
    "check_choice": ("extend", "check_choice"),
    "check_flag": ("extend", "check_flag"),
    "check_integer": ("extend", "check_integer"),
    "check_options": ("extend", "check_options"),
    "check_real": ("extend", "check_real"),
    "normalise_options": ("extend", "normalise_options"),
    "residual_norms": ("extend", "residual_norms"),
    "squared_norms": ("extend", "squared_norms"),
    "working_dtype": ("extend", "working_dtype"),
    "stats_dtype": ("extend", "stats_dtype"),
    "iterate": ("internal", "iterate"),
    "Layout": ("internal", "Layout"),
}


def __getattr__(name: str) -> _Any:
    if name in _MOVED:
        module, new = _MOVED[name]
        _warnings.warn(
            f"banax.{name} has moved: use banax.{module}.{new} (the same object). "
            f"banax itself holds what model builders use; banax.{module} holds "
            + ("what plugin authors build on." if module == "extend"
               else "banax's plumbing."),
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(globals()[module], new)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) - set(_MOVED) | set(__all__))
