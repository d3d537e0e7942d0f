"""`AbstractCell`: the base of banax's cells, which know their own zero state and the
layout of their input."""

import abc
from typing import ClassVar

import equinox as eqx
import jax
from jaxtyping import PyTree


class AbstractCell(eqx.Module):
    """A DEQ cell `z' = cell(z, x)` that knows the shape of its own state.

    Subclasses implement `__call__(z, x)` and `zero_state(x)`, and say the layout of
    one sample's input in `input_layout`.
    `banax.DEQ(cell, ...)` starts the solve from `cell.zero_state(x)` when it is given
    neither `state_shape` nor `init`, so a model built from these cells needs nothing
    else to say what its state looks like, whatever its structure (an array, or a
    tuple of feature maps). It also calls `check_input(x, batched=...)` before a solve,
    so that an input of the wrong rank (a batch of sequences given to an image cell in
    batch mode, read as one image) is refused instead of mixing the samples.
    """

    rank_hint: ClassVar[str] = ""
    """Appended to the wrong-rank message: which cell takes the other ranks."""

    @abc.abstractmethod
    def __call__(self, z: PyTree, x: PyTree) -> PyTree:
        """One application of the cell: the next state from `z` and the input `x`."""

    @abc.abstractmethod
    def zero_state(self, x: PyTree) -> PyTree:
        """The all-zeros state matching the input `x`: with `x`'s batch axis (first)
        when `x` has one, in the dtype the cell computes in."""

    @property
    def input_layout(self) -> tuple[str, ...] | None:
        """The axes of one sample's input, e.g. `("H", "W", "C=3")`; `None` (the
        default) leaves the input's rank unchecked."""
        return None

    def check_input(self, x: PyTree, *, batched: bool) -> None:
        """Refuse an input whose rank is not a batch's, `(N, *input_layout)`, in batch
        mode (`batched=True`), or neither one sample's nor a batch's otherwise (a batch
        may be solved as one state), naming the expected layout."""
        if self.input_layout is None:
            return
        sample = ", ".join(self.input_layout)
        ranks = (len(self.input_layout) + 1,) if batched else (
            len(self.input_layout), len(self.input_layout) + 1)
        for leaf in jax.tree.leaves(x):
            if leaf.ndim not in ranks:
                expected = f"(N, {sample})" if batched else f"({sample}) or (N, {sample})"
                mode = "in batch mode (batch_axis=0)" if batched else "without a batch axis"
                raise ValueError(
                    f"{type(self).__name__}: {mode} x must be {expected}; got x of shape "
                    f"{tuple(leaf.shape)}. Reshape the input to that layout.{self.rank_hint}"
                )
