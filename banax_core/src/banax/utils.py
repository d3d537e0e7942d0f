"""Ready-made traces and pytree helpers."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from ._keys import key_shape
from ._options import IntOption, check_integer

Projection = Callable[[Any, Any, Any], Any]
"""`(x, fx, f_aux) -> value`."""


def trace_last(project: Projection, init: Any) -> tuple[Callable[..., Any], Any]:
    """Keep `project(x, fx, f_aux)` of the most recent evaluation of f.

    `init` fixes the structure, shapes and dtypes of the projection.
    """

    def fold(acc: Any, x: Any, fx: Any, f_aux: Any, **tags: Any) -> Any:
        del acc, tags
        return project(x, fx, f_aux)

    return fold, init


def trace_last_aux(init: Any) -> tuple[Callable[..., Any], Any]:
    """Keep the `f_aux` of the most recent evaluation (use with `has_aux=True`)."""
    return trace_last(lambda x, fx, f_aux: f_aux, init)


def trace_history(
    project: Projection, n_evals: IntOption, init_value: Any = 0.0
) -> tuple[Callable[..., Any], Any]:
    """Record `project(x, fx, f_aux)` at every evaluation into a buffer.

    The trace is `(count, buffer)` with `buffer.shape == (n_evals, *value_shape)`;
    entries at indices `>= count` keep `init_value` (zero by default), whose shape is
    that of one recorded value. A Python-number `init_value` takes the dtype of the
    projection; an array keeps its own, and a projection that does not cast into it
    without loss is a `TypeError`. Evaluations past `n_evals` are counted but not
    stored, so budget `max_steps + 1` slots (more with a line search).
    """
    n_evals = check_integer("trace_history", "n_evals", n_evals, minimum=1)
    python_number = isinstance(init_value, (bool, int, float, complex))
    init_value = jnp.asarray(init_value)
    buffer = jnp.broadcast_to(init_value, (n_evals,) + init_value.shape)

    def fold(acc: Any, x: Any, fx: Any, f_aux: Any, **tags: Any) -> Any:
        del tags
        count, buf = acc
        value = jnp.asarray(project(x, fx, f_aux))
        if value.shape != buf.shape[1:]:
            raise ValueError(
                f"trace_history: project returned a value of shape {value.shape}, but "
                f"init_value has shape {buf.shape[1:]}; pass init_value="
                f"jnp.zeros({value.shape}, jnp.{value.dtype}), the shape of one value."
            )
        if python_number:
            buf = buf.astype(value.dtype)
        elif not np.can_cast(value.dtype, buf.dtype, casting="safe"):
            raise TypeError(
                f"trace_history: project returned {value.dtype} values, which do not fit "
                f"an init_value of dtype {buf.dtype} without loss; pass init_value in "
                f"the projection's dtype (e.g. jnp.zeros({value.shape}, jnp.{value.dtype})) "
                "or as a Python number."
            )
        return count + 1, buf.at[count].set(value.astype(buf.dtype), mode="drop")

    return fold, (jnp.array(0, dtype=jnp.int32), buffer)


def trace_count() -> tuple[Callable[..., Any], Any]:
    """Count evaluations of f, including the initial one and line-search trials."""

    def fold(acc: Any, x: Any, fx: Any, f_aux: Any, **tags: Any) -> Any:
        del x, fx, f_aux, tags
        return acc + 1

    return fold, jnp.array(0, dtype=jnp.int32)


def _check_leaves(name: str, tree: Any) -> None:
    def check(path: Any, leaf: Any) -> None:
        if not (isinstance(leaf, (bool, int, float, complex, np.generic, np.ndarray))
                or eqx.is_array(leaf)):
            raise TypeError(
                f"{name} needs a pytree of arrays, but tree{jax.tree_util.keystr(path)} "
                f"is a {type(leaf).__name__}: {leaf!r}."
            )

    jax.tree_util.tree_map_with_path(check, tree)


def zeros_like(tree: Any) -> Any:
    """A pytree of zeros with the structure, shapes and dtypes of `tree`."""
    _check_leaves("zeros_like", tree)
    return jax.tree.map(jnp.zeros_like, tree)


def half_normal_like(key: PRNGKeyArray, tree: Any) -> Any:
    """A random pytree like `tree`: each entry is 0 with probability 1/2, otherwise
    i.i.d. standard normal. A common DEQ initial state that breaks symmetry."""
    if key_shape(key) != ():
        raise TypeError(
            "half_normal_like: key must be a single PRNG key such as jax.random.key(0), "
            f"got {type(key).__name__}{f' of shape {key.shape}' if hasattr(key, 'shape') else ''}"
            ". Split keys with jax.random.split and map "
            "over them with jax.vmap for several states."
        )
    _check_leaves("half_normal_like", tree)
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, 2 * max(len(leaves), 1))
    out: list[Array] = []
    for i, leaf in enumerate(leaves):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                f"half_normal_like needs floating-point leaves, got dtype {leaf.dtype}."
            )
        keep = jax.random.bernoulli(keys[2 * i], 0.5, leaf.shape)
        noise = jax.random.normal(keys[2 * i + 1], leaf.shape, dtype=leaf.dtype)
        out.append(jnp.where(keep, noise, jnp.zeros_like(noise)))
    return jax.tree.unflatten(treedef, out)
