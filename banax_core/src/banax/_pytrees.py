"""Comparing and describing pytrees of arrays, for the checks that validate a call
and the messages they raise."""

from typing import Any

import jax


def describe(tree: Any) -> str:
    """`tree` with each array written as its dtype and shape, e.g. `float32[3, 4]`."""
    return str(jax.tree.map(lambda x: f"{x.dtype}{list(x.shape)}", tree))


def same_structure(a: Any, b: Any) -> bool:
    """Whether `a` and `b` have the same pytree structure, shapes and dtypes."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.shape == y.shape and x.dtype == y.dtype
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def same_shapes(a: Any, b: Any) -> bool:
    """Whether `a` and `b` have the same pytree structure and shapes (any dtypes)."""
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )
