"""`ConvCell`: the residual block of multiscale DEQs (Bai et al., 2020), channels last."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import AbstractCell

from ._conv import conv2d
from ._group_norm import check_groups, group_norm


STATE_KERNEL_SCALE = 0.1
"""The state's kernels `W₁`, `W₂` start at this fraction of `eqx.nn.Conv2d`'s scale."""


def _kernel(key: PRNGKeyArray, k: int, c_in: int, c_out: int, dtype,
            scale: float = 1.0) -> Array:
    # eqx.nn.Conv2d's initialisation, uniform in ±1/√fan_in, times `scale`.
    bound = scale / math.sqrt(c_in * k * k)
    return jax.random.uniform(key, (k, k, c_in, c_out), dtype, -bound, bound)


def _check_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(f"{owner}: {name} must be an int >= 1, got {value!r}.")
    return value


class ConvCell(AbstractCell):
    """A convolutional DEQ cell: `z' = cell(z, x)` on channels-last images.

        h  = relu(GN₁(z ⋆ W₁))
        u  = GN₂(h ⋆ W₂ + x ⋆ U + b)
        z' = GN₃(relu(z + u))

    `⋆` is a 3×3 (`kernel_size`) "same" convolution and `GNᵢ` group normalisation with
    a learned per-channel scale and shift: the MDEQ residual block with input
    injection `x ⋆ U + b`. The convolutions are `banax.nn.conv2d`, whose gradients stay
    fast inside the solver's compiled loop on CPU (a cell built from `eqx.nn.Conv2d`
    runs its backward passes there several times slower).

    **Layout.** Channels last, as images usually come: `z` is `(H, W, channels)` and
    `x` is `(H, W, inject_channels)` for one sample, or `(N, H, W, ·)` for a batch (the
    DEQ's batch mode, `batch_axis=0`); `jax.vmap` over samples works as well. A
    channels-first array from `eqx.nn` code becomes channels last with
    `jnp.moveaxis(a, -3, -1)`. Every sample is normalised on its own, so samples never
    mix.

    The cell has a custom VJP, hence no forward-mode derivative (`jax.jvp`); banax's
    regularizers use reverse mode for it.

    **Arguments:**

    - `channels`: channels of the state `z`.
    - `inject_channels`: channels of the input `x`.
    - `hidden_channels`: channels after the first convolution (default `channels`).
    - `groups`: groups of the normalisations; must divide `channels` and
        `hidden_channels`.
    - `kernel_size`: odd side of the square kernels (default 3).
    - `key`: PRNG key for the initial weights: `eqx.nn.Conv2d`'s uniform
        initialisation for `U` and `b`, a tenth of it for `W₁` and `W₂` (small state
        kernels, as in MDEQ, make the cell start as a contraction: at full scale its
        Jacobian's spectral radius is often above 0.99 and solves take hundreds of
        steps); the normalisations' scales start at 1 and their shifts at 0.
    - `dtype`: the parameters' dtype (default: JAX's default float).

    A poor choice for inputs whose spatial structure does not matter (use `MLPCell`).
    """

    conv1: Float[Array, "k k channels hidden"]
    conv2: Float[Array, "k k hidden channels"]
    inject: Float[Array, "k k inject channels"]
    inject_bias: Float[Array, " channels"]
    scales: tuple[Array, Array, Array]
    shifts: tuple[Array, Array, Array]
    groups: int = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        inject_channels: int,
        *,
        hidden_channels: int | None = None,
        groups: int,
        kernel_size: int = 3,
        key: PRNGKeyArray,
        dtype=None,
    ):
        channels = _check_int("ConvCell", "channels", channels)
        inject_channels = _check_int("ConvCell", "inject_channels", inject_channels)
        hidden = _check_int("ConvCell", "hidden_channels",
                            channels if hidden_channels is None else hidden_channels)
        k = _check_int("ConvCell", "kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(
                f"ConvCell: kernel_size must be odd so that 'same' padding keeps the "
                f"image size, got {k}."
            )
        check_groups("ConvCell", "channels", channels, groups)
        check_groups("ConvCell", "hidden_channels", hidden, groups)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = _kernel(k1, k, channels, hidden, dtype, STATE_KERNEL_SCALE)
        self.conv2 = _kernel(k2, k, hidden, channels, dtype, STATE_KERNEL_SCALE)
        self.inject = _kernel(k3, k, inject_channels, channels, dtype)
        bound = 1 / math.sqrt(inject_channels * k * k)
        self.inject_bias = jax.random.uniform(k4, (channels,), dtype, -bound, bound)
        self.scales = tuple(jnp.ones(c, dtype) for c in (hidden, channels, channels))
        self.shifts = tuple(jnp.zeros(c, dtype) for c in (hidden, channels, channels))
        self.groups = groups

    @property
    def channels(self) -> int:
        return self.conv1.shape[2]

    @property
    def inject_channels(self) -> int:
        return self.inject.shape[2]

    def __call__(
        self, z: Float[Array, "*batch height width channels"],
        x: Float[Array, "*batch height width inject"],
    ) -> Float[Array, "*batch height width channels"]:
        _check_images(z, x, self.channels, self.inject_channels)
        single = z.ndim == 3
        if single:
            z, x = z[None], x[None]
        x = x.astype(z.dtype)

        def norm(i: int, a: Array) -> Array:
            return group_norm(a, self.groups, self.scales[i], self.shifts[i])

        h = jax.nn.relu(norm(0, conv2d(z, self.conv1)))
        injected = conv2d(x, self.inject) + self.inject_bias[None, None, None, :]
        u = norm(1, conv2d(h, self.conv2) + injected)
        out = norm(2, jax.nn.relu(z + u))
        return out[0] if single else out

    def zero_state(
        self, x: Float[Array, "*batch height width inject"]
    ) -> Float[Array, "*batch height width channels"]:
        """Zeros with `x`'s batch and image size and the cell's `channels`."""
        return jnp.zeros((*jnp.shape(x)[:-1], self.channels), self.conv1.dtype)


def _check_images(z: Array, x: Array, channels: int, inject_channels: int) -> None:
    """One line naming the shapes when `z` or `x` does not fit the cell."""
    z_shape, x_shape = jnp.shape(z), jnp.shape(x)
    problem = None
    if len(z_shape) not in (3, 4) or z_shape[-1] != channels:
        problem = f"z must be (H, W, {channels}) or (N, H, W, {channels}), channels last"
    elif len(x_shape) != len(z_shape) or x_shape[-1] != inject_channels:
        lead = "(N, H, W" if len(z_shape) == 4 else "(H, W"
        problem = f"x must be {lead}, {inject_channels}), channels last, like z"
    elif x_shape[:-1] != z_shape[:-1]:
        problem = "x and z must have the same batch and image size"
    if problem is None:
        return
    hint = ""
    for name, shape, c in (("z", z_shape, channels), ("x", x_shape, inject_channels)):
        if len(shape) >= 3 and shape[-1] != c and shape[-3] == c:
            hint = (f" {name} looks channels-first: move its channels last with "
                    f"jnp.moveaxis({name}, -3, -1).")
            break
    raise ValueError(
        f"ConvCell: {problem}; got z of shape {z_shape} and x of shape {x_shape}.{hint}"
    )
