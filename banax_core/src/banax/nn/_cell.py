"""`AbstractCell`: the base of banax's cells, which know their own zero state."""

import abc

import equinox as eqx
from jaxtyping import PyTree


class AbstractCell(eqx.Module):
    """A DEQ cell `z' = cell(z, x)` that knows the shape of its own state.

    Subclasses implement `__call__(z, x)` and `zero_state(x)`. `banax.DEQ(cell, ...)`
    starts the solve from `cell.zero_state(x)` when it is given neither `state_shape`
    nor `init`, so a model built from these cells needs nothing else to say what its
    state looks like, whatever its structure (an array, or a tuple of feature maps).
    """

    @abc.abstractmethod
    def __call__(self, z: PyTree, x: PyTree) -> PyTree:
        """One application of the cell: the next state from `z` and the input `x`."""

    @abc.abstractmethod
    def zero_state(self, x: PyTree) -> PyTree:
        """The all-zeros state matching the input `x`: with `x`'s batch axis (first)
        when `x` has one, in the dtype the cell computes in."""
