"""`ConvCell`: the residual block of multiscale DEQs (Bai et al., 2020), channels last,
on sequences, images or volumes."""

import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import AbstractCell
from ._conv import conv
from ._group_norm import check_groups, group_norm

STATE_KERNEL_SCALE = 0.1
"""The state's kernels `W₁`, `W₂` start at this fraction of `eqx.nn.Conv2d`'s scale."""

SPATIAL = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}
"""The spatial axes of a sample, by number of dimensions."""


def kernel(key: PRNGKeyArray, k: int, c_in: int, c_out: int, dtype, dims: int = 2,
           scale: float = 1.0) -> Array:
    """`eqx.nn.Conv2d`'s initialisation, uniform in ±1/√fan_in, times `scale`, in the
    channels-last layout `(k, …, k, c_in, c_out)`."""
    bound = scale / math.sqrt(c_in * k**dims)
    return jax.random.uniform(key, (k,) * dims + (c_in, c_out), dtype, -bound, bound)


def check_int(owner: str, name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TypeError(f"{owner}: {name} must be an int >= 1, got {value!r}.")
    return value


def residual_block(
    z: Array, injected: Array | None, conv1: Callable[[Array], Array],
    conv2: Callable[[Array], Array], norms: tuple[Callable[[Array], Array], ...],
) -> Array:
    """MDEQ's residual block on a batch: `GN₃(relu(z + GN₂(conv₂(relu(GN₁(conv₁ z)))
    + injected)))`, the injection left out when it is `None`."""
    h = jax.nn.relu(norms[0](conv1(z)))
    pre = conv2(h)
    u = norms[1](pre if injected is None else pre + injected)
    return norms[2](jax.nn.relu(z + u))


class ConvCell(AbstractCell):
    """A convolutional DEQ cell: `z' = cell(z, x)` on channels-last sequences, images
    or volumes.

        h  = relu(GN₁(z ⋆ W₁))
        u  = GN₂(h ⋆ W₂ + x ⋆ U + b)
        z' = GN₃(relu(z + u))

    `⋆` is a `kernel_size`-wide "same" convolution in `dims` spatial dimensions and
    `GNᵢ` group normalisation with a learned per-channel scale and shift: the MDEQ
    residual block with input injection `x ⋆ U + b`. The convolutions are
    `banax.nn.conv1d`/`conv2d`/`conv3d`, whose gradients stay fast inside the solver's
    compiled loop on CPU (a cell built from `eqx.nn.Conv2d` runs its backward passes
    there several times slower).

    **Layout.** Channels last: for `dims=2` (images, the default) `z` is
    `(H, W, channels)` and `x` is `(H, W, inject_channels)` for one sample, or
    `(N, H, W, ·)` for a batch (the DEQ's batch mode, `batch_axis=0`); `dims=1` takes
    sequences `(L, ·)` and `dims=3` volumes `(D, H, W, ·)` the same way. `jax.vmap`
    over samples works as well. A channels-first array from `eqx.nn` code becomes
    channels last with `jnp.moveaxis(a, -dims - 1, -1)`. Every sample is normalised on
    its own, so samples never mix.

    The cell has a custom VJP, hence no forward-mode derivative (`jax.jvp`); banax's
    regularizers and `banax.spectral_radius` use reverse mode for it.

    **Arguments:**

    - `channels`: channels of the state `z`.
    - `inject_channels`: channels of the input `x`.
    - `hidden_channels`: channels after the first convolution (default `channels`).
    - `groups`: groups of the normalisations; must divide `channels` and
        `hidden_channels`.
    - `kernel_size`: odd side of the kernels (default 3).
    - `dims`: spatial dimensions, 1 (sequences), 2 (images, default) or 3 (volumes).
    - `key`: PRNG key for the initial weights: `eqx.nn.Conv2d`'s uniform
        initialisation for `U` and `b`, a tenth of it for `W₁` and `W₂` (small state
        kernels, as in MDEQ, make the cell start as a contraction: at full scale its
        Jacobian's spectral radius is often above 0.99 and solves take hundreds of
        steps); the normalisations' scales start at 1 and their shifts at 0.
    - `dtype`: the parameters' dtype (default: JAX's default float).

    A poor choice for inputs whose spatial structure does not matter (use `MLPCell`).
    """

    conv1: Float[Array, "*k channels hidden"]
    conv2: Float[Array, "*k hidden channels"]
    inject: Float[Array, "*k inject channels"]
    inject_bias: Float[Array, " channels"]
    scales: tuple[Array, ...]
    shifts: tuple[Array, ...]
    groups: int = eqx.field(static=True)
    rank_hint: ClassVar[str] = (" ConvCell(..., dims=1) takes sequences (L, C), dims=2 "
                                "images (H, W, C), dims=3 volumes (D, H, W, C).")

    def __init__(
        self,
        channels: int,
        inject_channels: int,
        *,
        hidden_channels: int | None = None,
        groups: int,
        kernel_size: int = 3,
        dims: int = 2,
        key: PRNGKeyArray,
        dtype=None,
    ):
        channels = check_int("ConvCell", "channels", channels)
        inject_channels = check_int("ConvCell", "inject_channels", inject_channels)
        hidden = check_int("ConvCell", "hidden_channels",
                           channels if hidden_channels is None else hidden_channels)
        k = check_int("ConvCell", "kernel_size", kernel_size)
        if k % 2 == 0:
            raise ValueError(
                f"ConvCell: kernel_size must be odd so that 'same' padding keeps the "
                f"size, got {k}."
            )
        if dims not in SPATIAL:
            raise ValueError(
                f"ConvCell: dims must be 1 (sequences), 2 (images) or 3 (volumes), got "
                f"{dims!r}."
            )
        check_groups("ConvCell", "channels", channels, groups)
        check_groups("ConvCell", "hidden_channels", hidden, groups)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.conv1 = kernel(k1, k, channels, hidden, dtype, dims, STATE_KERNEL_SCALE)
        self.conv2 = kernel(k2, k, hidden, channels, dtype, dims, STATE_KERNEL_SCALE)
        self.inject = kernel(k3, k, inject_channels, channels, dtype, dims)
        bound = 1 / math.sqrt(inject_channels * k**dims)
        self.inject_bias = jax.random.uniform(k4, (channels,), dtype, -bound, bound)
        self.scales = tuple(jnp.ones(c, dtype) for c in (hidden, channels, channels))
        self.shifts = tuple(jnp.zeros(c, dtype) for c in (hidden, channels, channels))
        self.groups = groups

    @property
    def dims(self) -> int:
        return self.conv1.ndim - 2

    @property
    def channels(self) -> int:
        return self.conv1.shape[-2]

    @property
    def inject_channels(self) -> int:
        return self.inject.shape[-2]

    @property
    def input_layout(self) -> tuple[str, ...]:
        return (*SPATIAL[self.dims], f"C={self.inject_channels}")

    def __call__(
        self, z: Float[Array, "..."],
        x: Float[Array, "..."],
    ) -> Float[Array, "..."]:
        _check_maps("ConvCell", z, x, self.channels, self.inject_channels, self.dims)
        single = z.ndim == self.dims + 1
        if single:
            z, x = z[None], x[None]
        x = x.astype(z.dtype)

        def norm(i: int) -> Callable[[Array], Array]:
            return lambda a: group_norm(a, self.groups, self.scales[i], self.shifts[i])

        lead = (None,) * (self.dims + 1)
        injected = conv(x, self.inject) + self.inject_bias[(*lead, slice(None))]
        out = residual_block(z, injected, lambda a: conv(a, self.conv1),
                             lambda a: conv(a, self.conv2), (norm(0), norm(1), norm(2)))
        return out[0] if single else out

    def zero_state(
        self, x: Float[Array, "..."]
    ) -> Float[Array, "..."]:
        """Zeros with `x`'s batch and spatial size and the cell's `channels`."""
        return jnp.zeros((*jnp.shape(x)[:-1], self.channels), self.conv1.dtype)


def _check_maps(owner: str, z: Array, x: Array, channels: int, inject_channels: int,
                dims: int) -> None:
    """One line naming the shapes when `z` or `x` does not fit the cell."""
    z_shape, x_shape = jnp.shape(z), jnp.shape(x)
    axes = ", ".join(SPATIAL[dims])
    problem = None
    if len(z_shape) not in (dims + 1, dims + 2) or z_shape[-1] != channels:
        problem = (f"z must be ({axes}, {channels}) or (N, {axes}, {channels}), "
                   "channels last")
    elif len(x_shape) != len(z_shape) or x_shape[-1] != inject_channels:
        lead = f"(N, {axes}" if len(z_shape) == dims + 2 else f"({axes}"
        problem = f"x must be {lead}, {inject_channels}), channels last, like z"
    elif x_shape[:-1] != z_shape[:-1]:
        problem = "x and z must have the same batch and spatial size"
    if problem is None:
        return
    hint = ""
    for name, shape, c in (("z", z_shape, channels), ("x", x_shape, inject_channels)):
        if len(shape) > dims and shape[-1] != c and shape[-dims - 1] == c:
            hint = (f" {name} looks channels-first: move its channels last with "
                    f"jnp.moveaxis({name}, {-dims - 1}, -1).")
            break
    raise ValueError(f"{owner}: {problem}; got z of shape {z_shape} and x of shape "
                     f"{x_shape}.{hint}")
