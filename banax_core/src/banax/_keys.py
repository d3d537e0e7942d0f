"""What counts as a PRNG key: one rule for every function that takes one."""

from typing import Any

import jax
import jax.numpy as jnp


def key_shape(key: Any) -> tuple[int, ...] | None:
    """The shape of the array of keys `key` holds, `()` for a single key; `None` when
    `key` is not a PRNG key.

    A key is a typed key array (`jax.random.key(0)`, shape `()`) or a raw one
    (`jax.random.PRNGKey(0)`, uint32 of shape `(2,)`), whose last axis holds the two
    words of one key rather than several keys.
    """
    if not isinstance(key, jax.Array):
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return tuple(key.shape)
    if key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2:
        return tuple(key.shape[:-1])
    return None
