"""What plugin authors build on: the solver and adjoint bases, the capabilities, the
types a solve is made of, the one function that runs a solve, and the checks and
numerical conventions every solver and adjoint shares.

Model builders need none of this: `banax` itself holds the layer, the registry, the
results and the errors. banax's own plugins (`banax-solvers`, `banax-adjoints`,
`banax-reg`) are written against this module and the root's public names only, as a
third-party plugin is.
"""

from ._adjoint import AbstractAdjoint, AbstractBackwardRuleAdjoint, AbstractLinearSolveAdjoint
from ._fspec import BoundFunction, bind
from ._keys import key_shape
from ._layout import FlatState
from ._linearize import calls_custom_vjp
from ._loop import solve, solve_flat
from ._numerics import (
    residual_norms,
    squared_norms,
    stats_dtype,
    where_per_sample,
    working_dtype,
)
from ._options import (
    FlagOption,
    IntOption,
    RealOption,
    check_choice,
    check_flag,
    check_integer,
    check_options,
    check_real,
    normalise_options,
)
from ._problem import Problem, make_problem
from ._registry import as_solver
from ._solution import FlatSolution
from ._solver import (
    AbstractIterativeSolver,
    AbstractSolveCombinator,
    AbstractSolver,
    InvertibleStep,
    LowRankInverseJacobian,
)
from ._trace import TracedFunction
from .hookspecs import hookimpl

__all__ = [
    "AbstractAdjoint", "AbstractBackwardRuleAdjoint", "AbstractIterativeSolver",
    "AbstractLinearSolveAdjoint", "AbstractSolveCombinator", "AbstractSolver",
    "BoundFunction", "FlagOption", "FlatSolution", "FlatState", "IntOption", "InvertibleStep",
    "LowRankInverseJacobian", "Problem", "RealOption", "TracedFunction",
    "as_solver", "bind", "calls_custom_vjp", "check_choice", "check_flag", "check_integer",
    "check_options", "check_real", "hookimpl", "key_shape", "make_problem",
    "normalise_options", "residual_norms", "solve", "solve_flat", "squared_norms",
    "stats_dtype", "where_per_sample", "working_dtype",
]
