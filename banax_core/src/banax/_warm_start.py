"""Warm starts: better initial states than zeros, so that solves take fewer steps.

Two kinds: a per-example cache of last fixed points (`FixedPointCache`), and a learned
initial guess (SkipDEQ) trained with `initial_guess_loss`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Inexact, Int


class FixedPointCache(eqx.Module):
    """The last fixed point found for each training example, as a functional store.

    Over an epoch the parameters move little, so the fixed point of an example at the
    previous epoch is a much better start than zeros: the solve then needs fewer steps
    (the speed-up of warm starts in DEQ-Flow and of the "fixed-point reuse" of Bai et
    al.). Read it for `z0` and write the new fixed points back, both inside the jitted
    training step; the cache is an `eqx.Module`, carried like an optimiser state:

        z0 = cache.read(index, deq.initial_state(x))
        z = deq(x, z0=z0)
        cache = cache.write(index, z)

    `index` holds each sample's example number (an integer array, one per sample). Rows
    never written read as the given default (a cold start). Entries are stored with
    the sample axis first; `batch_axis` says where the batch sits in the layer's state.
    With the batch sharded over devices, keep the cache replicated: the gather and the
    scatter then run on each device's shard.

    The cost is memory: `n_examples × state size` (a 50 000-example CIFAR MDEQ with a
    2 × 10⁴-float state needs 4 GB in float32), which is why it suits small and
    medium data sets; a learned initial guess (`banax.DEQ(init=...)`) does not.

    **Arguments** (of `FixedPointCache.empty`): `n_examples`, `state_shape` (one
    sample's), `dtype`, and `batch_axis` (default 0).
    """

    values: Inexact[Array, "examples ..."]
    filled: Bool[Array, " examples"]
    batch_axis: int = eqx.field(static=True)

    @classmethod
    def empty(cls, n_examples: int, state_shape: tuple[int, ...], dtype: Any = jnp.float32,
              *, batch_axis: int = 0) -> "FixedPointCache":
        if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
            raise ValueError(
                f"FixedPointCache: n_examples must be an int >= 1, got {n_examples!r}."
            )
        return cls(jnp.zeros((n_examples, *tuple(state_shape)), dtype),
                   jnp.zeros((n_examples,), bool), batch_axis)

    def _check(self, index: Any, z: Any, what: str) -> Int[Array, " batch"]:
        index = jnp.asarray(index)
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise TypeError(
                "FixedPointCache: index must be a 1-D integer array of example numbers, "
                f"one per sample; got shape {index.shape} and dtype {index.dtype}."
            )
        sample = jnp.moveaxis(z, self.batch_axis, 0).shape if z.ndim > self.batch_axis \
            else None
        expected = (index.shape[0], *self.values.shape[1:])
        if sample != expected or z.dtype != self.values.dtype:
            raise ValueError(
                f"FixedPointCache: the {what} has shape {z.shape} and dtype {z.dtype}, but "
                f"the cache holds {self.values.dtype} states of shape "
                f"{self.values.shape[1:]} and index has {index.shape[0]} samples (batch "
                f"axis {self.batch_axis}); build the cache with the layer's state_shape "
                "and dtype."
            )
        n = self.values.shape[0]
        # The check runs on one replicated flag, not on `index` itself: an index sharded
        # over devices would otherwise be gathered onto one device for the check (and
        # XLA's partitioner warns about it at every compile).
        bad = jnp.any((index < 0) | (index >= n))
        checked = eqx.error_if(
            jnp.zeros((), index.dtype), bad,
            f"FixedPointCache: an index is out of range [0, {n}); index the cache by "
            "example number, 0 <= i < n_examples.",
        )
        return index + checked

    def read(self, index: Int[Array, " batch"], default: Inexact[Array, "..."]
             ) -> Inexact[Array, "..."]:
        """The stored fixed points of examples `index`, or `default` where none is
        stored yet; shaped like `default` (the batch on `batch_axis`)."""
        index = self._check(index, default, "default")
        stored = jnp.moveaxis(self.values[index], 0, self.batch_axis)
        filled = self.filled[index].reshape(
            tuple(-1 if a == self.batch_axis else 1 for a in range(default.ndim)))
        return jnp.where(filled, stored, default)

    def write(self, index: Int[Array, " batch"], z: Inexact[Array, "..."]
              ) -> "FixedPointCache":
        """A cache with the fixed points `z` (batch on `batch_axis`) stored for examples
        `index`. No gradient flows into the cache."""
        index = self._check(index, z, "state")
        z = jnp.moveaxis(jax.lax.stop_gradient(z), self.batch_axis, 0)
        return FixedPointCache(self.values.at[index].set(z),
                               self.filled.at[index].set(True), self.batch_axis)


def initial_guess_loss(z0: Any, z_star: Any) -> Array:
    """`mean((z0 − stop_gradient(z*))²)` over every entry: the auxiliary loss that trains
    a learned initial guess (SkipDEQ, Pal, Edelman and Rackauckas, 2022).

    Give the layer a small explicit network as its init rule, `DEQ(cell, ...,
    init=guess)` with `guess(x) -> z0`; compute `z0 = deq.initial_state(x)` (which does
    carry gradients to the guess), solve from it with `deq(x, z0=z0)`, and add this
    loss to the task loss. The fixed point is a target only: no gradient reaches the
    cell through it.
    """
    diff, _ = ravel_pytree(jax.tree.map(lambda a, b: a - jax.lax.stop_gradient(b),
                                        z0, z_star))
    return jnp.mean(diff**2)
