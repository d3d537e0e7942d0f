"""banax-solvers: the built-in fixed-point solvers of banax, shipped as a plugin.

`Picard`, `Relaxed`, `Reversible`, `Broyden`, `Anderson` and `Fallback` (a pair of
them: the second solves what the first failed on) are registered under the names
`picard relaxed reversible broyden anderson fallback` (see `plugin.py`), so they are
reachable as `banax.get_solver("anderson")` and `banax.solver.Anderson`.
"""

from .anderson import Anderson, AndersonState
from .broyden import Broyden, BroydenState
from .fallback import Fallback, FallbackState
from .picard import Picard
from .relaxed import Relaxed
from .reversible import Reversible, ReversibleState

__all__ = [
    "Anderson", "AndersonState", "Broyden", "BroydenState", "Fallback", "FallbackState",
    "Picard", "Relaxed",
    "Reversible", "ReversibleState",
]
