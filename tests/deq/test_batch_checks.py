"""Batch mode's preconditions: x carries the batch axis, the batch is not empty, and
(on request) the cell keeps samples apart."""

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import DEQ
from deq.deq_cells import TanhCell, tanh_cell
from helpers import tree_allclose

N, D, BATCH = 6, 3, 4
SOLVER = {"name": "anderson", "batch_axis": 0, "rtol": 1e-10, "max_steps": 100}


class Loose(TanhCell):
    """A TanhCell written with NumPy-style implicit broadcasting, as most users write
    cells: an x without its batch axis then runs instead of failing on shapes."""

    def __call__(self, z, x):
        with jax.numpy_rank_promotion("allow"):
            return jnp.tanh(z @ self.W.T + x @ self.U.T + self.b)


class MeanCentred(TanhCell):
    """Subtracts the batch mean: sample b's output depends on every other sample."""

    def __call__(self, z, x):
        out = super().__call__(z, x)
        return out - jnp.broadcast_to(jnp.mean(out, axis=0, keepdims=True), out.shape)


@pytest.fixture(scope="module")
def cell() -> TanhCell:
    return tanh_cell(jax.random.key(0), N, D)


def test_input_without_batch_axis(cell):
    loose = Loose(cell.W, cell.U, cell.b)
    deq = DEQ(loose, SOLVER, "jfb", state_shape=(N,))
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    assert tree_allclose(deq(x), DEQ(cell, SOLVER, "jfb", state_shape=(N,))(x))
    # One sample given without its batch axis: its D = 3 features would be 3 samples.
    with pytest.raises(ValueError, match=r"axis 0 of x must index samples, but the cell "
                       r"stops working when that axis grows from 3 to 4.*lacks its batch "
                       r"axis.*x\[None\] for one sample"):
        deq(x[0])
    assert deq(x[:1]).shape == (1, N)


def test_empty_batch(cell):
    deq = DEQ(cell, SOLVER, "jfb", state_shape=(N,))
    with pytest.raises(ValueError, match=r"the batch is empty \(x has size 0 on "
                       r"batch_axis=0.*Skip the call"):
        deq(jnp.ones((0, D)))
    with pytest.raises(ValueError, match="the batch is empty"):
        deq(jnp.ones((0, D)), z0=jnp.zeros((0, N)))


class Rolled(TanhCell):
    """Adds a little of the previous sample: a coupling that the trace-time reading
    does not follow (a roll is slices and a concatenation)."""

    def __call__(self, z, x):
        out = super().__call__(z, x)
        return out + 0.1 * jnp.roll(out, 1, axis=0)


def test_cell_that_mixes_samples(cell):
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    checked = DEQ(cell, SOLVER, "jfb", state_shape=(N,), check_independence=True)
    assert tree_allclose(checked(x), DEQ(cell, SOLVER, "jfb", state_shape=(N,))(x))
    mixing = Rolled(cell.W, cell.U, cell.b)
    deq = DEQ(mixing, SOLVER, "jfb", state_shape=(N,), check_independence=True)
    with pytest.raises(Exception, match="DEQ: the cell mixes samples: sample 0 of the state"):
        deq(x)
    with pytest.raises(Exception, match="the cell mixes samples"):
        eqx.filter_jit(deq)(x)
    with without_annotation_checks(), pytest.raises(
            TypeError, match="check_independence must be True or False, got 1"):
        DEQ(cell, SOLVER, "jfb", state_shape=(N,), check_independence=1)


@jax.custom_vjp
def _rolled(h):
    """`h` plus a tenth of the previous sample, with a hand-written VJP: a custom-VJP
    layer that mixes samples."""
    return h + 0.1 * jnp.roll(h, 1, axis=0)


_rolled.defvjp(lambda h: (_rolled(h), None), lambda _, g: (g + 0.1 * jnp.roll(g, -1, axis=0),))


class CustomMixing(TanhCell):
    def __call__(self, z, x):
        return _rolled(super().__call__(z, x))


class SequenceAsImage(eqx.Module):
    """A user's cell that convolves its state `(L, C)` as if the batch were an image
    axis: `conv2d` on `z[None]`."""

    kernel: jax.Array

    def __call__(self, z, x):
        return jnp.tanh(banax.nn.conv2d(z[None], self.kernel)[0] + x)


def test_trace_time_check_catches_a_batch_read_as_a_spatial_axis(cell):
    # Sequences (N, L, C) given to a convolutional cell in batch mode: the cell reads
    # them as one N x L image, so its convolutions run across the batch. banax's own
    # cell refuses the rank; a user's cell is caught by reading its computation.
    conv = banax.nn.ConvCell(2, 1, groups=1, key=jax.random.key(2))
    picard = {"name": "picard", "batch_axis": 0, "max_steps": 5}
    deq = DEQ(conv, picard, "jfb")
    sequences = jax.random.normal(jax.random.key(3), (4, 5, 1))
    with pytest.raises(ValueError, match=r"ConvCell: in batch mode \(batch_axis=0\) x must "
                       r"be \(N, H, W, C=1\); got x of shape \(4, 5, 1\)"):
        deq(sequences)
    users = DEQ(SequenceAsImage(jnp.full((3, 3, 1, 1), 0.1)), picard, "jfb",
                state_shape=(5, 1))
    with pytest.raises(ValueError, match=r"DEQ: in batch mode \(batch_axis=0\) the cell "
                       r"mixes samples: a convolution reads the batch axis as a spatial "
                       r"axis.*images \(N, H, W, C\) for a convolutional cell"):
        users(sequences)
    # A reduction over the batch (a mean over samples) is caught the same way, for free.
    mixing = DEQ(MeanCentred(cell.W, cell.U, cell.b), SOLVER, "jfb", state_shape=(N,))
    with pytest.raises(ValueError, match="reduce_sum reduces over the batch axis"):
        mixing(jax.random.normal(jax.random.key(1), (BATCH, D)))
    # The right layout passes, and so do per-sample cells (MLPCell, the tanh cell).
    assert deq(sequences[..., None, :]).shape == (4, 5, 1, 2)
    mlp = banax.nn.MLPCell(N, D, key=jax.random.key(4))
    assert DEQ(mlp, SOLVER, "jfb")(jnp.ones((BATCH, D))).shape == (BATCH, N)


def test_mixing_detector_on_custom_vjp_cells(cell):
    # Forward mode is unavailable; the detector uses reverse mode.
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    deq = DEQ(CustomMixing(cell.W, cell.U, cell.b), SOLVER, "jfb", state_shape=(N,),
              check_independence=True)
    with pytest.raises(Exception, match="the cell mixes samples"):
        eqx.filter_jit(deq)(x)
    # banax's own custom-VJP cell, given its layout, passes (it crashed with JAX's
    # "can't apply forward-mode autodiff (jvp) to a custom_vjp function").
    conv = banax.nn.ConvCell(2, 1, groups=1, key=jax.random.key(2))
    images = jax.random.normal(jax.random.key(3), (2, 3, 3, 1))
    checked = DEQ(conv, {"name": "picard", "batch_axis": 0, "max_steps": 5}, "jfb",
                  check_independence=True)
    assert checked(images).shape == (2, 3, 3, 2)


def test_check_independence_on_an_adjoint_call(cell):
    x = jax.random.normal(jax.random.key(1), (BATCH, D))
    adjoint = banax.get_adjoint("jfb", solver=SOLVER)
    f = lambda z, x, c: c(z, x)  # noqa: E731
    z0 = jnp.zeros((BATCH, N))
    plain = adjoint((f, (x, cell)), z0, check_independence=True)
    assert tree_allclose(plain.value, adjoint((f, (x, cell)), z0).value)
    for mixing in (MeanCentred(cell.W, cell.U, cell.b), CustomMixing(cell.W, cell.U, cell.b)):
        with pytest.raises(Exception, match="JFB: the cell mixes samples"):
            jax.block_until_ready(adjoint((f, (x, mixing)), z0, check_independence=True))
    with pytest.raises(ValueError, match="JFB: check_independence=True checks the "
                       "samples of a batch, but the solver has no batch_axis"):
        banax.get_adjoint("jfb", solver="picard")((f, (x, cell)), z0,
                                                  check_independence=True)
    with without_annotation_checks(), pytest.raises(
            TypeError, match="check_independence must be True or False, got 1"):
        adjoint((f, (x, cell)), z0, check_independence=1)
