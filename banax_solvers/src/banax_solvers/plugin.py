"""Registers the built-in solvers with banax, through the same hook a third-party
plugin uses (entry point `solvers = "banax_solvers.plugin"` in the group `banax`)."""

import banax

from . import Anderson, Broyden, Fallback, Picard, Relaxed, Reversible


@banax.hookimpl
def banax_solvers() -> dict[str, type]:
    return {
        "picard": Picard,
        "relaxed": Relaxed,
        "reversible": Reversible,
        "broyden": Broyden,
        "anderson": Anderson,
        "fallback": Fallback,
    }
