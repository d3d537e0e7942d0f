"""Ready-made traces and pytree helpers."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

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
    project: Projection, n_evals: int, init_value: Any = 0.0
) -> tuple[Callable[..., Any], Any]:
    """Record `project(x, fx, f_aux)` at every evaluation into a buffer.

    The trace is `(count, buffer)` with `buffer.shape == (n_evals, *value_shape)`;
    entries at indices `>= count` keep `init_value` (zero by default). Evaluations past
    `n_evals` are counted but not stored, so budget `max_steps + 1` slots (more with a
    line search).
    """
    if isinstance(n_evals, bool) or not isinstance(n_evals, int) or n_evals < 1:
        raise ValueError(f"n_evals must be an int >= 1, got {n_evals!r}.")
    init_value = jnp.asarray(init_value)
    buffer = jnp.broadcast_to(init_value, (n_evals,) + init_value.shape)

    def fold(acc: Any, x: Any, fx: Any, f_aux: Any, **tags: Any) -> Any:
        del tags
        count, buf = acc
        value = jnp.asarray(project(x, fx, f_aux)).astype(buf.dtype)
        return count + 1, buf.at[count].set(value, mode="drop")

    return fold, (jnp.array(0, dtype=jnp.int32), buffer)


def trace_count() -> tuple[Callable[..., Any], Any]:
    """Count evaluations of f, including the initial one and line-search trials."""

    def fold(acc: Any, x: Any, fx: Any, f_aux: Any, **tags: Any) -> Any:
        del x, fx, f_aux, tags
        return acc + 1

    return fold, jnp.array(0, dtype=jnp.int32)


def zeros_like(tree: Any) -> Any:
    """A pytree of zeros with the structure, shapes and dtypes of `tree`."""
    return jax.tree.map(jnp.zeros_like, tree)


def half_normal_like(key: PRNGKeyArray, tree: Any) -> Any:
    """A random pytree like `tree`: each entry is 0 with probability 1/2, otherwise
    i.i.d. standard normal. A common DEQ initial state that breaks symmetry."""
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
