"""Cells to build deep equilibrium models from.

Each cell is an `eqx.Module` called as `cell(z, x) -> z'`, on one sample or on a batch
(the batch axis first, as the solvers' `batch_axis=0` expects), and drops into
`banax.DEQ(cell, ...)`, which starts from the cell's own zero state
(`AbstractCell.zero_state`). `conv2d` is the convolution the convolutional cell is built
on; use it in your own cells to keep their gradients fast inside the solver's loop.
"""

from ._cell import AbstractCell
from ._conv import conv1d, conv2d, conv3d
from ._conv_cell import ConvCell
from ._graph import Graph, GraphCell
from ._group_norm import group_norm
from ._mlp_cell import MLPCell
from ._multiscale import MultiscaleCell, MultiscaleHead
from ._transformer import TransformerCell

__all__ = [
    "AbstractCell", "ConvCell", "Graph", "GraphCell", "MLPCell", "MultiscaleCell",
    "MultiscaleHead", "TransformerCell", "conv1d", "conv2d", "conv3d", "group_norm",
]
