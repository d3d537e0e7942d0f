"""Registers this distribution's adjoints with banax, through the same hook a
third-party plugin uses."""

import banax

from . import BPTT, GDEQ, JFB, Implicit, NeumannPhantom, Reversible, UnrollPhantom


@banax.hookimpl
def banax_adjoints() -> dict[str, type]:
    return {
        "bptt": BPTT,
        "implicit": Implicit,
        "jfb": JFB,
        "gdeq": GDEQ,
        "unroll_phantom": UnrollPhantom,
        "neumann_phantom": NeumannPhantom,
        "reversible": Reversible,
    }
