"""Checks that a batch-mode DEQ call really is a batch of independent samples.

Batch mode trusts two things it cannot see from shapes alone: that axis `b` of the
input indexes samples (an input without its batch axis has its feature axis taken as
the batch), and that the cell treats samples independently (a cell that mixes them,
e.g. a batch norm, makes each sample's residual and stopping meaningless). The first
is checked for free at trace time, the second on request at the cost of one JVP.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, PyTree

from ._batch_flow import mixing_primitive
from ._layout import common_batch_size
from ._linearize import calls_custom_vjp
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
    the mistake this catches. The same trace is then read for a reduction, a matrix
    product or a convolution over the batch axis (see `mixing_primitive`): a cell
    given a layout it reads differently (sequences `(N, L, C)` to a cell of images)
    runs but mixes samples. It costs a trace at compile time and nothing at run time.
    `cell_on(x)` is the map `z ↦ cell(z, x)`.
    """
    size = batch_size(x, axis)
    bigger = _resized(z0, axis, size + 1)
    mixing = None
    try:
        closed, out = jax.make_jaxpr(lambda z, x: cell_on(x)(z), return_shape=True)(
            bigger, _resized(x, axis, size + 1))
        mixing = mixing_primitive(closed, axis)
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
    if mixing is not None:
        raise ValueError(
            f"DEQ: in batch mode (batch_axis={axis}) the cell mixes samples: {mixing} "
            f"on x {_describe(shapes_of(x))} and state {_describe(shapes_of(z0))}, so "
            "each sample's residual and stopping would depend on the others. Give x "
            "and the state the layout the cell expects with the batch on axis "
            f"{axis} (e.g. images (N, H, W, C) for a convolutional cell, not "
            "sequences (N, L, C)), remove the coupling (a batch norm: use a layer "
            "norm), or use a solver without batch_axis."
        )


def mixes_samples(fn: Callable[[PyTree], PyTree], z: PyTree, axis: int,
                  key: Array) -> Bool[Array, ""]:
    """Whether `fn` couples sample 0 of `z` with another sample of its output.

    For a per-sample `fn` the Jacobian is block diagonal. One JVP with a random
    tangent on sample 0 only must leave every other output sample's tangent exactly
    zero; where `fn` forbids forward mode (a `jax.custom_vjp` inside, as in the
    `banax.nn` cells), one VJP with a random cotangent on output sample 0 only must
    leave every other input sample's cotangent zero. Costs about two evaluations of
    `fn`.
    """
    if calls_custom_vjp(jax.make_jaxpr(fn)(z).jaxpr):
        out, vjp = jax.vjp(fn, z)
        (spread,) = vjp(_on_sample_0(out, key, axis))
    else:
        _, spread = jax.jvp(fn, (z,), (_on_sample_0(z, key, axis),))
    leaked = [jnp.any(jnp.moveaxis(t, axis, 0)[1:] != 0) for t in jax.tree.leaves(spread)]
    return jnp.any(jnp.stack(leaked))


def check_independence(fn: Callable[[PyTree], PyTree], z: PyTree, axis: int, owner: str
                       ) -> PyTree:
    """`z`, with an error at run time (`eqx.error_if`) if `fn` mixes samples (see
    `mixes_samples`); `owner` names the caller in the message."""
    mixed = mixes_samples(fn, z, axis, jax.random.key(0))
    return eqx.error_if(z, mixed, (
        f"{owner}: the cell mixes samples: sample 0 of the state and the other samples "
        f"of its output depend on each other (batch_axis={axis}), so batch mode's "
        "per-sample residuals and stopping are wrong. Remove the coupling (e.g. a batch "
        "norm over the batch axis: use a layer norm; an input whose batch axis a "
        "convolution reads as a spatial one: give it the layout the cell expects), or "
        "drop batch_axis and solve the whole batch as one state."
    ))


def _on_sample_0(tree: PyTree, key: Array, axis: int) -> PyTree:
    """Zeros like `tree` but for standard normal entries in sample 0."""

    def leaf(a: Array, k: Array) -> Array:
        moved = jnp.moveaxis(jnp.zeros_like(a), axis, 0)
        moved = moved.at[0].set(jax.random.normal(k, moved.shape[1:], a.dtype))
        return jnp.moveaxis(moved, 0, axis)

    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [leaf(a, k) for a, k in zip(leaves, keys)])


def shapes_of(tree: PyTree) -> PyTree:
    """The `ShapeDtypeStruct`s of a pytree of arrays, for error messages."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                        tree)
