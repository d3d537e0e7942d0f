"""Adjoints: how gradients flow through a fixed point.

`Adjoint`, `BackwardRuleAdjoint` and `LinearSolveAdjoint` are the base classes (the
seed's names of `banax.extend.AbstractAdjoint`, `AbstractBackwardRuleAdjoint` and
`AbstractLinearSolveAdjoint`). The concrete adjoints
(`BPTT`, `Implicit`, `JFB`, `GDEQ`, `UnrollPhantom`, `NeumannPhantom`, `Reversible`,
and any a plugin adds) are resolved from the registry on attribute access.
"""

from typing import TYPE_CHECKING, Any

from ._adjoint import Adjoint, BackwardRuleAdjoint, LinearSolveAdjoint
from ._loop import solve
from ._problem import Problem
from ._registry import REGISTRY, registrations

if TYPE_CHECKING:
    from banax_adjoints import (
        BPTT,
        GDEQ,
        JFB,
        Implicit,
        NeumannPhantom,
        Reversible,
        UnrollPhantom,
    )

__all__ = [
    "Adjoint", "BackwardRuleAdjoint", "LinearSolveAdjoint", "Problem", "solve",
    "BPTT", "GDEQ", "JFB", "Implicit", "NeumannPhantom", "Reversible", "UnrollPhantom",
]


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return REGISTRY.resolve_attribute("adjoint", __name__, name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | {r.obj.__name__ for r in registrations("adjoint")})
