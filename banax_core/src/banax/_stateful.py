"""Cells that hold Equinox state (`eqx.nn.State`), such as `eqx.nn.SpectralNorm`.

Equinox's convention is `layer(x, state) -> (y, state)`; a stateful DEQ cell is
`cell(z, x, state) -> (z', state')` and the layer follows suit: `deq(x, state) ->
(z*, state')`. Within one solve the state is read, never written: every iteration
(and the backward pass) sees the same state, so the solve has one fixed-point map.
The state is then updated once per call, by one more evaluation of the cell at `z*`.
Updating it per iteration would change the map under the solver's feet.
"""

import inspect
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax


class FrozenState(eqx.Module):
    """`z ↦ cell(z, x, state)[0]`: the fixed-point map of a stateful cell with its
    state held fixed. An `eqx.Module`, so the cell's arrays stay visible to adjoints
    as parameters."""

    cell: Callable[..., Any]

    def __call__(self, z: Any, x: Any, state: eqx.nn.State, **kwargs: Any) -> Any:
        return self.cell(z, x, jax.lax.stop_gradient(state), **kwargs)[0]


def check_stateful(cell: Any, state: Any) -> None:
    """A state must be an `eqx.nn.State`, and the cell must take it."""
    if not isinstance(state, eqx.nn.State):
        raise TypeError(
            f"DEQ: the state must be an eqx.nn.State (from eqx.nn.make_with_state), got "
            f"{type(state).__name__}."
        )
    try:
        inspect.signature(cell).bind(None, None, state)
    except TypeError:
        raise TypeError(
            f"DEQ: a state was given, but the cell {type(cell).__name__} takes no state "
            "(it is called as cell(z, x)). Call deq(x) without a state, or write the "
            "cell as cell(z, x, state) -> (z', state) around its stateful layers."
        ) from None
    except ValueError:  # no readable signature: the cell's own call will tell
        pass
