"""Checks that a batch-mode DEQ call really is a batch of independent samples.

Batch mode trusts two things it cannot see from shapes alone: that axis `b` of the
input indexes samples (an input without its batch axis has its feature axis taken as
the batch), and that the cell treats samples independently (a cell that mixes them,
e.g. a batch norm, makes each sample's residual and stopping meaningless). The first
is checked for free at trace time, the second on request at the cost of one JVP.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree

from ._layout import common_batch_size
from ._pytrees import describe as _describe


def batch_size(x: PyTree, axis: int) -> int:
    """The common size of axis `axis` of every array of `x`; it must be >= 1."""
    return common_batch_size([a.shape for a in jax.tree.leaves(x)], axis, "x", "DEQ")


def _resized(tree: PyTree, axis: int, size: int) -> PyTree:
    def resize(a: Any) -> jax.ShapeDtypeStruct:
        shape = list(jnp.shape(a))
        shape[axis] = size
        return jax.ShapeDtypeStruct(tuple(shape), jnp.result_type(a))

    return jax.tree.map(resize, tree)


def check_batch_follows(
    cell_on: Callable[[PyTree], Callable[[PyTree], PyTree]], z0: PyTree, x: PyTree,
    axis: int,
) -> None:
    """Trace the cell once more, abstractly, with one more sample in `x` and `z0`.

    A cell that treats axis `axis` as the batch accepts any batch size and returns the
    new size. If `x` lacks its batch axis, axis `axis` of `x` is a feature axis whose
    size the cell's weights fix, so the larger "batch" fails or changes shape: that is
    the mistake this catches. It costs a trace at compile time and nothing at run time.
    `cell_on(x)` is the map `z ↦ cell(z, x)`.
    """
    size = batch_size(x, axis)
    bigger = _resized(z0, axis, size + 1)
    try:
        out = jax.eval_shape(lambda z, x: cell_on(x)(z), bigger, _resized(x, axis, size + 1))
        follows = jax.tree.structure(out) == jax.tree.structure(bigger) and all(
            o.shape == b.shape for o, b in zip(jax.tree.leaves(out), jax.tree.leaves(bigger))
        )
    except (TypeError, ValueError):
        follows = False
    if not follows:
        raise ValueError(
            f"DEQ: in batch mode (batch_axis={axis}) axis {axis} of x must index samples, "
            f"but the cell stops working when that axis grows from {size} to {size + 1}, "
            f"so x {_describe(shapes_of(x))} most likely lacks its batch axis and a feature "
            f"axis was taken as the batch. Give x a batch axis (x[None] for one sample), "
            "or use a solver without batch_axis."
        )


def mixes_samples(fn: Callable[[PyTree], PyTree], z: PyTree, axis: int,
                  key: Array) -> Bool[Array, ""]:
    """Whether `fn` lets sample 0 of `z` influence another sample of its output.

    One JVP with a random tangent on sample 0 only: for a per-sample `fn` the tangent
    of every other sample is exactly zero. Costs about two evaluations of `fn`.
    """

    def tangent(leaf: Array, k: Array) -> Array:
        moved = jnp.moveaxis(jnp.zeros_like(leaf), axis, 0)
        moved = moved.at[0].set(jax.random.normal(k, moved.shape[1:], leaf.dtype))
        return jnp.moveaxis(moved, 0, axis)

    leaves, treedef = jax.tree.flatten(z)
    keys = jax.random.split(key, len(leaves))
    tangents = jax.tree.unflatten(treedef, [tangent(a, k) for a, k in zip(leaves, keys)])
    _, out = jax.jvp(fn, (z,), (tangents,))
    leaked = [jnp.any(jnp.moveaxis(t, axis, 0)[1:] != 0) for t in jax.tree.leaves(out)]
    return jnp.any(jnp.stack(leaked))


def shapes_of(tree: PyTree) -> PyTree:
    """The `ShapeDtypeStruct`s of a pytree of arrays, for error messages."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                        tree)
