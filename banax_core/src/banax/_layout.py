"""How a pytree state is seen by a solver: one `(batch, features)` array.

Solvers never see the user's pytree. The loop flattens the state into a 2D array
`z` of shape `(B, N)`: `B` is the batch size in batch mode (the length of the batch
axis) and `1` otherwise; `N` is the number of entries of one sample. Reductions over
the last axis are therefore per-sample, which is what gives per-sample residuals,
stopping and mixing while `f` is still called once on the whole batch.
"""

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact

FlatState = Inexact[Array, "batch features"]


class Layout(eqx.Module):
    """The map between a pytree state and its flat `(B, N)` form."""

    treedef: Any = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    dtypes: tuple[Any, ...] = eqx.field(static=True)
    batch_axis: int | None = eqx.field(static=True)
    batch_size: int = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)

    @property
    def batched(self) -> bool:
        return self.batch_axis is not None

    @property
    def features(self) -> int:
        return sum(self._sample_sizes())

    def _sample_sizes(self) -> list[int]:
        return [math.prod(s) // self.batch_size for s in self.shapes]

    def flatten(self, tree: Any) -> FlatState:
        leaves = jax.tree_util.tree_leaves(tree)
        parts = []
        for leaf in leaves:
            leaf = jnp.asarray(leaf)
            if self.batch_axis is not None:
                leaf = jnp.moveaxis(leaf, self.batch_axis, 0)
            parts.append(leaf.reshape(self.batch_size, -1).astype(self.dtype))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)

    def unflatten(self, flat: FlatState) -> Any:
        sizes = self._sample_sizes()
        splits = np.cumsum(sizes)[:-1].tolist()
        parts = jnp.split(flat, splits, axis=1) if len(sizes) > 1 else [flat]
        leaves = []
        for part, shape, dtype in zip(parts, self.shapes, self.dtypes):
            if self.batch_axis is None:
                leaf = part.reshape(shape)
            else:
                moved = (shape[self.batch_axis],) + tuple(
                    s for i, s in enumerate(shape) if i != self.batch_axis
                )
                leaf = jnp.moveaxis(part.reshape(moved), 0, self.batch_axis)
            leaves.append(leaf.astype(dtype))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _check_leaf(name: str, path: Any, leaf: Any) -> None:
    where = f"{name}{jax.tree_util.keystr(path)}"
    if isinstance(leaf, (bool, int, float, complex)):
        raise TypeError(
            f"Every leaf of {name} must be an array, but {where} is a Python "
            f"{type(leaf).__name__} ({leaf!r}). A list or tuple of numbers is a pytree of "
            "scalars, not a vector: pass jnp.asarray([...], dtype=jnp.float32) for a "
            "vector state, or jnp.asarray(value, dtype=jnp.float32) for a scalar one."
        )
    if not (isinstance(leaf, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))
            or hasattr(leaf, "dtype")):
        raise TypeError(
            f"Every leaf of {name} must be a floating-point array, but {where} is a "
            f"{type(leaf).__name__} ({leaf!r}). Move non-array data into f's arguments "
            "(f_spec = (f, args)) and keep only arrays in the state."
        )
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
        raise TypeError(
            f"{where} has dtype {leaf.dtype}; fixed-point states must be floating point "
            "(or complex). Cast it, e.g. x0.astype(jnp.float32)."
        )


def as_state(x0: Any, name: str = "x0") -> Any:
    """`x0` with NumPy leaves turned into JAX arrays, after checking that every leaf is
    a floating-point array (Python numbers, strings and lists are refused, naming the
    leaf as `name[...]`)."""
    def check(path: Any, leaf: Any) -> None:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(
                f"{name}{jax.tree_util.keystr(path)} is a jax.ShapeDtypeStruct, a shape "
                "without values; pass an array, e.g. jnp.zeros(shape, dtype)."
            )
        _check_leaf(name, path, leaf)

    jax.tree_util.tree_map_with_path(check, x0)
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), x0)


def common_batch_size(shapes: Sequence[tuple[int, ...]], axis: int, name: str,
                      owner: str | None = None) -> int:
    """The size of axis `axis` that every one of `shapes` (the arrays of the argument
    `name`) must share: the batch size of batch mode, at least 1. `owner` prefixes the
    messages."""
    prefix = f"{owner}: " if owner else ""
    short = [s for s in shapes if len(s) <= axis]
    sizes = {s[axis] for s in shapes if len(s) > axis}
    if not shapes or short or len(sizes) != 1:
        why = f" (batch_axis={axis} is out of range for shape {short[0]})" if short else ""
        raise ValueError(
            f"{prefix}in batch mode (batch_axis={axis}) every array of {name} must carry "
            f"the batch on axis {axis}, all with the same size along batch_axis; got "
            f"{name} of shapes {list(shapes)}{why}."
        )
    size = sizes.pop()
    if size == 0:
        raise ValueError(
            f"{prefix}the batch is empty ({name} has size 0 on batch_axis={axis}, shapes "
            f"{list(shapes)}): an empty batch has nothing to solve, as a solve needs at "
            "least one sample. Skip the call for an empty batch."
        )
    return size


def layout_of(x0: Any, batch_axis: int | None) -> Layout:
    """Build the layout of `x0`, checking that it is a valid fixed-point state."""
    leaves, treedef = jax.tree_util.tree_flatten(x0)
    if not leaves:
        raise ValueError("x0 must contain at least one array; got an empty pytree.")
    jax.tree_util.tree_map_with_path(lambda p, leaf: _check_leaf("x0", p, leaf), x0)
    shapes = [tuple(leaf.shape) for leaf in leaves]
    dtypes = [jnp.dtype(leaf.dtype) for leaf in leaves]
    if batch_axis is None:
        batch_size = 1
    else:
        if batch_axis < 0:
            raise ValueError(
                f"batch_axis must be a non-negative axis index, got {batch_axis}."
            )
        batch_size = common_batch_size(shapes, batch_axis, "x0")
    dtype = jnp.result_type(*dtypes)
    return Layout(treedef, tuple(shapes), tuple(dtypes), batch_axis, batch_size, dtype)
