"""Warm starts: better initial states than zeros, so that solves take fewer steps.

Two kinds: a per-example cache of last fixed points (`FixedPointCache`), and a learned
initial guess (SkipDEQ) trained with `initial_guess_loss`.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Bool, Int


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
    The state may be any pytree (a `banax.nn.MultiscaleCell`'s tuple of maps): each
    leaf is stored on its own. With the batch sharded over devices, keep the cache
    replicated: the gather and the scatter then run on each device's shard.

    The cost is memory: `n_examples × state size` (a 50 000-example CIFAR MDEQ with a
    2 × 10⁴-float state needs 4 GB in float32), which is why it suits small and
    medium data sets; a learned initial guess (`banax.DEQ(init=...)`) does not.

    **Construction:** `FixedPointCache.empty(n_examples, state_shape, dtype,
    batch_axis=0)` for an array state of per-sample shape `state_shape`, or
    `FixedPointCache.like(n_examples, state, batch_axis=0)` for any state, given one
    batch of it (e.g. `deq.initial_state(x)`).
    """

    values: Any
    filled: Bool[Array, " examples"]
    batch_axis: int = eqx.field(static=True)

    @classmethod
    def empty(cls, n_examples: int, state_shape: tuple[int, ...], dtype: Any = jnp.float32,
              *, batch_axis: int = 0) -> "FixedPointCache":
        _check_n_examples(n_examples)
        return cls(jnp.zeros((n_examples, *tuple(state_shape)), dtype),
                   jnp.zeros((n_examples,), bool), batch_axis)

    @classmethod
    def like(cls, n_examples: int, state: Any, *, batch_axis: int = 0
             ) -> "FixedPointCache":
        """An empty cache for states shaped like `state`, a batch of them with the
        batch on `batch_axis` in every leaf."""
        _check_n_examples(n_examples)

        def slot(a: Any) -> Array:
            a = jnp.asarray(a)
            if a.ndim <= batch_axis:
                raise ValueError(
                    f"FixedPointCache.like: a leaf of state has shape {a.shape}, with no "
                    f"batch axis {batch_axis}; pass one batch of states, e.g. "
                    "deq.initial_state(x)."
                )
            sample = tuple(s for i, s in enumerate(a.shape) if i != batch_axis)
            return jnp.zeros((n_examples, *sample), a.dtype)

        return cls(jax.tree.map(slot, state), jnp.zeros((n_examples,), bool), batch_axis)

    def _check(self, index: Any, z: Any, what: str) -> Int[Array, " batch"]:
        index = jnp.asarray(index)
        if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
            raise TypeError(
                "FixedPointCache: index must be a 1-D integer array of example numbers, "
                f"one per sample; got shape {index.shape} and dtype {index.dtype}."
            )

        def per_sample(a: Array) -> tuple:
            moved = jnp.moveaxis(a, self.batch_axis, 0).shape \
                if a.ndim > self.batch_axis else None
            return moved, jnp.dtype(a.dtype)

        expected = jax.tree.map(lambda v: ((index.shape[0], *v.shape[1:]), v.dtype),
                                self.values)
        same_structure = (jax.tree.structure(z) == jax.tree.structure(self.values))
        if not same_structure or jax.tree.map(per_sample, z) != expected:
            stored = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype),
                                  self.values)
            raise ValueError(
                f"FixedPointCache: the {what} has {_describe(z)}, but the cache holds "
                f"per-sample states of {_describe(stored)} and index has "
                f"{index.shape[0]} samples (batch axis {self.batch_axis}); build the "
                "cache with the layer's state_shape and dtype, or with "
                "FixedPointCache.like(n_examples, deq.initial_state(x))."
            )
        n = self.filled.shape[0]
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

    def read(self, index: Int[Array, " batch"], default: Any) -> Any:
        """The stored fixed points of examples `index`, or `default` where none is
        stored yet; shaped like `default` (the batch on `batch_axis`)."""
        index = self._check(index, default, "default")
        filled = self.filled[index]

        def one(values: Array, d: Array) -> Array:
            stored = jnp.moveaxis(values[index], 0, self.batch_axis)
            mask = filled.reshape(
                tuple(-1 if a == self.batch_axis else 1 for a in range(d.ndim)))
            return jnp.where(mask, stored, d)

        return jax.tree.map(one, self.values, default)

    def write(self, index: Int[Array, " batch"], z: Any) -> "FixedPointCache":
        """A cache with the fixed points `z` (batch on `batch_axis`) stored for examples
        `index`. No gradient flows into the cache."""
        index = self._check(index, z, "state")
        values = jax.tree.map(
            lambda v, a: v.at[index].set(
                jnp.moveaxis(jax.lax.stop_gradient(a), self.batch_axis, 0)),
            self.values, z)
        return FixedPointCache(values, self.filled.at[index].set(True), self.batch_axis)


def _describe(tree: Any) -> str:
    """`shape … and dtype …` of an array, or the shapes and dtypes of a pytree's leaves."""
    if isinstance(tree, (jax.Array, jax.ShapeDtypeStruct)):
        return f"shape {tuple(tree.shape)} and dtype {jnp.dtype(tree.dtype)}"
    shapes = jax.tree.map(lambda a: tuple(a.shape), tree)
    dtypes = jax.tree.map(lambda a: str(jnp.dtype(a.dtype)), tree)
    return f"shapes {shapes} and dtypes {dtypes}"


def _check_n_examples(n_examples: Any) -> None:
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise ValueError(
            f"FixedPointCache: n_examples must be an int >= 1, got {n_examples!r}."
        )


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
