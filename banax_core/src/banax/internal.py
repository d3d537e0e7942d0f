"""banax's plumbing, for its own tests and tools: not a stable interface.

Plugins use `banax.extend`; models use `banax`.
"""

from ._layout import Layout
from ._loop import iterate

__all__ = ["Layout", "iterate"]
