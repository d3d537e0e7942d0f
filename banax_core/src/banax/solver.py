"""Fixed-point solvers.

`Solver` is the base class (the seed's name of `banax.extend.AbstractIterativeSolver`).
The concrete solvers (`Picard`, `Relaxed`, `Reversible`, `Broyden`, `Anderson`,
`Fallback`, a `banax.extend.AbstractSolveCombinator`, and any a plugin adds) are
resolved from the registry on attribute access, so `from banax.solver import Anderson`
works for every installed plugin without this module importing one.
"""

from typing import TYPE_CHECKING, Any

from ._registry import REGISTRY, registrations
from ._solver import LOOP_KINDS, InvertibleStep, LowRankInverseJacobian, Solver

if TYPE_CHECKING:
    from banax_solvers import Anderson, Broyden, Fallback, Picard, Relaxed, Reversible

__all__ = [
    "LOOP_KINDS", "InvertibleStep", "LowRankInverseJacobian", "Solver",
    "Anderson", "Broyden", "Fallback", "Picard", "Relaxed", "Reversible",
]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return REGISTRY.resolve_attribute("solver", __name__, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | {r.obj.__name__ for r in registrations("solver")})
