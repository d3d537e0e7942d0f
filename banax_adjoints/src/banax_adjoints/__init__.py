"""banax-adjoints: the gradient rules banax ships, registered as a plugin.

`BPTT` and `Reversible` differentiate the solver's iterations; `Implicit` solves the
implicit-function-theorem system exactly; `JFB`, `GDEQ`, `UnrollPhantom` and
`NeumannPhantom` approximate it cheaply. All are reachable as `banax.adjoint.<Name>`
and `banax.get_adjoint(name)`; see docs/adjoints.md for a guide.
"""

from .bptt import BPTT
from .gdeq import GDEQ
from .implicit import Implicit
from .jfb import JFB
from .phantom import NeumannPhantom, UnrollPhantom
from .reversible import Reversible

__all__ = ["BPTT", "GDEQ", "JFB", "Implicit", "NeumannPhantom", "Reversible", "UnrollPhantom"]
