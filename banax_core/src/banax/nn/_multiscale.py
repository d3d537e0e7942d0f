"""`MultiscaleCell`: the multiscale DEQ cell (MDEQ, Bai, Koltun & Kolter, 2020), and
`MultiscaleHead`, a classifier reading every branch of its fixed point."""

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ._cell import AbstractCell
from ._conv import conv
from ._conv_cell import STATE_KERNEL_SCALE, check_int, kernel, residual_block
from ._group_norm import check_groups, group_norm

Maps = tuple[Float[Array, "..."], ...]

STATE_GAIN = 0.1
"""The initial scale of the group norms whose output carries the state rather than the
input: the post-fusion ones, the blocks' last on branches `i > 0`, and the fusion's
from branches `j > 0`."""


class Conv(eqx.Module):
    """A channels-last "same" convolution `x ⋆ W` (`banax.nn.conv2d`) holding its kernel
    as `weight` (`(k, k, C_in, C_out)`), so that `eqx.nn.WeightNorm(conv, axis=-1)`
    reparametrises it per output channel."""

    weight: Float[Array, "k k c_in c_out"]

    def __call__(self, x: Float[Array, "n h w c_in"]) -> Float[Array, "n h w c_out"]:
        return conv(x, self.weight)


class GroupNorm(eqx.Module):
    """`banax.nn.group_norm` with a learned per-channel scale (init 1) and shift (0)."""

    scale: Float[Array, " c"]
    shift: Float[Array, " c"]
    groups: int = eqx.field(static=True)

    def __init__(self, channels: int, groups: int, dtype, scale: float = 1.0):
        self.scale = jnp.full(channels, scale, dtype)
        self.shift = jnp.zeros(channels, dtype)
        self.groups = groups

    def __call__(self, x: Float[Array, "n h w c"]) -> Float[Array, "n h w c"]:
        return group_norm(x, self.groups, self.scale, self.shift)


class Block(eqx.Module):
    """One branch's residual block (`banax.nn.ConvCell`'s maths), the second convolution
    followed by a dropout mask."""

    conv1: Conv
    conv2: Conv
    norms: tuple[GroupNorm, GroupNorm, GroupNorm]

    def __call__(self, z: Array, injected: Array | None, mask: Array | None) -> Array:
        def conv2(h: Array) -> Array:
            out = self.conv2(h)
            return out if mask is None else out * mask

        return residual_block(z, injected, self.conv1, conv2, self.norms)


class Downsample(eqx.Module):
    """Finer → coarser by `levels` halvings: each a 3×3 convolution of stride 2 and a
    group norm, with a ReLU between them (MDEQ's fusion)."""

    convs: tuple[Conv, ...]
    norms: tuple[GroupNorm, ...]

    def __call__(self, a: Array) -> Array:
        for i, (c, n) in enumerate(zip(self.convs, self.norms)):
            # A stride-2 "same" convolution is the stride-1 one read at even positions;
            # that form keeps its gradient the fast canonical convolution in the loop.
            a = n(c(a)[:, ::2, ::2])
            if i < len(self.convs) - 1:
                a = jax.nn.relu(a)
        return a


class Upsample(eqx.Module):
    """Coarser → finer: a 1×1 convolution and a group norm, then nearest-neighbour
    upsampling by `2^levels`."""

    conv: Conv
    norm: GroupNorm
    levels: int = eqx.field(static=True)

    def __call__(self, a: Array) -> Array:
        a = self.norm(self.conv(a))
        factor = 2**self.levels
        return jnp.repeat(jnp.repeat(a, factor, axis=1), factor, axis=2)


class MultiscaleCell(AbstractCell):
    """The multiscale DEQ cell (MDEQ): `z' = cell(z, x)` on a tuple of channels-last
    feature maps, branch `i` at `1/2^i` of the input's height and width with
    `channels[i]` channels.

        bᵢ  = GN₃(relu(zᵢ + GN₂(drop(W₂ᵢ ⋆ relu(GN₁(W₁ᵢ ⋆ zᵢ)))) + [i = 0](x ⋆ U + b))))
        sᵢ  = Σⱼ Fᵢⱼ(bⱼ)                   (Fᵢᵢ = identity)
        zᵢ' = GN(Pᵢ ⋆ relu(sᵢ))

    Per branch the residual block of `banax.nn.ConvCell` (its hidden layer `expansion`
    times wider), with the input injection `x ⋆ U + b` on branch 0 only; then every
    branch receives every other: finer → coarser (`j < i`) by `i − j` stride-2 3×3
    convolutions, each followed by a group norm (and a ReLU between them), coarser →
    finer (`j > i`) by a 1×1 convolution and a group norm, then nearest upsampling by
    `2^{j−i}`; then a post-fusion 1×1 convolution `Pᵢ` and a group norm with half the
    groups. Every convolution is `banax.nn.conv2d`, fast inside the solver's loop on
    CPU; a custom VJP, so banax's tools use reverse mode on this cell.

    **Layout.** `x` is `(H, W, inject_channels)` for one sample or
    `(N, H, W, inject_channels)` for a batch (batch mode, `batch_axis=0`; `jax.vmap`
    works too), with `H` and `W` multiples of `2^(branches − 1)`. The state is the tuple
    `(z₀, …, z_{n−1})`, `zᵢ` of shape `([N,] H/2^i, W/2^i, channels[i])`;
    `zero_state(x)` builds it, so `banax.DEQ(cell, ...)` needs no `state_shape`.

    **Dropout.** Called with `key=` (`deq(x, key=key)`), each branch's `W₂ ⋆ ·` is
    multiplied by a per-sample, per-channel mask drawn once from the key (variational
    dropout: the same mask at every iteration of a solve) with rate `dropout`;
    `eqx.nn.inference_mode` switches it off.

    **Arguments:**

    - `channels`: channels of each branch, one int per branch (at least one).
    - `inject_channels`: channels of the input `x`.
    - `groups`: groups of the normalisations (the post-fusion ones use
        `max(groups // 2, 1)`); must divide every branch's channels.
    - `expansion`: the blocks' hidden channels are `expansion × channels[i]`
        (default 2; MDEQ uses up to 5).
    - `dropout`: the variational dropout rate (default 0).
    - `key`: PRNG key for the initial weights: `eqx.nn.Conv2d`'s uniform
        initialisation, a tenth of it for the blocks' `W₁`, `W₂` (as in `ConvCell`),
        norms' scales 1 and shifts 0.
    - `dtype`: the parameters' dtype (default: JAX's default float).

    Each convolution is a `Conv` whose `weight` `eqx.nn.WeightNorm(..., axis=-1)` can
    wrap, e.g. `eqx.tree_at(lambda c: c.post_convs, cell, replace_fn=...)`.
    """

    inject: Conv
    inject_bias: Float[Array, " c0"]
    blocks: tuple[Block, ...]
    fuse: tuple[tuple[Downsample | Upsample | None, ...], ...]
    post_convs: tuple[Conv, ...]
    post_norms: tuple[GroupNorm, ...]
    dropout: eqx.nn.Dropout
    channels: tuple[int, ...] = eqx.field(static=True)
    rank_hint: ClassVar[str] = (" MultiscaleCell takes images; ConvCell(..., dims=1 or 3) "
                                "takes sequences or volumes.")

    def __init__(
        self,
        channels: tuple[int, ...],
        inject_channels: int,
        *,
        groups: int,
        expansion: int = 2,
        dropout: float = 0.0,
        key: PRNGKeyArray,
        dtype=None,
    ):
        if not isinstance(channels, (tuple, list)) or not channels:
            raise TypeError(
                "MultiscaleCell: channels must be a tuple of ints, one per branch "
                f"(e.g. (16, 32)), got {channels!r}."
            )
        channels = tuple(check_int("MultiscaleCell", f"channels[{i}]", c)
                         for i, c in enumerate(channels))
        inject_channels = check_int("MultiscaleCell", "inject_channels", inject_channels)
        expansion = check_int("MultiscaleCell", "expansion", expansion)
        for i, c in enumerate(channels):
            check_groups("MultiscaleCell", f"channels[{i}]", c, groups)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        n = len(channels)
        gain = STATE_GAIN
        # More keys than the convolutions use (a fusion has at most n − 1 of them).
        keys = iter(jax.random.split(key, 2 + 3 * n + n * n * n))

        def conv_(k: int, c_in: int, c_out: int, scale: float = 1.0) -> Conv:
            return Conv(kernel(next(keys), k, c_in, c_out, dtype, 2, scale))

        def norm(c: int, g: int = groups, scale: float = 1.0) -> GroupNorm:
            return GroupNorm(c, g, dtype, scale)

        self.inject = conv_(3, inject_channels, channels[0])
        bound = 1 / math.sqrt(inject_channels * 9)
        self.inject_bias = jax.random.uniform(next(keys), (channels[0],), dtype, -bound,
                                              bound)
        self.blocks = tuple(
            Block(conv_(3, c, expansion * c, STATE_KERNEL_SCALE),
                  conv_(3, expansion * c, c, STATE_KERNEL_SCALE),
                  (norm(expansion * c), norm(c), norm(c, scale=1.0 if i == 0 else gain)))
            for i, c in enumerate(channels)
        )

        def fusion(i: int, j: int) -> Downsample | Upsample | None:
            if i == j:
                return None
            if j > i:  # from the coarser branch j into branch i
                return Upsample(conv_(1, channels[j], channels[i]),
                                norm(channels[i], scale=gain), j - i)
            outs = [channels[j]] * (i - j - 1) + [channels[i]]
            last = 1.0 if j == 0 else gain
            return Downsample(tuple(conv_(3, channels[j], o) for o in outs),
                              tuple(norm(o, scale=1.0 if k < i - j - 1 else last)
                                    for k, o in enumerate(outs)))

        self.fuse = tuple(tuple(fusion(i, j) for j in range(n)) for i in range(n))
        self.post_convs = tuple(conv_(1, c, c) for c in channels)
        self.post_norms = tuple(norm(c, max(groups // 2, 1), gain) for c in channels)
        self.dropout = eqx.nn.Dropout(dropout)
        self.channels = channels

    @property
    def inject_channels(self) -> int:
        return self.inject.weight.shape[2]

    @property
    def input_layout(self) -> tuple[str, ...]:
        return ("H", "W", f"C={self.inject_channels}")

    def shapes(self, height: int, width: int) -> tuple[tuple[int, int, int], ...]:
        """Each branch's `(height, width, channels)` for an input of that size,
        refusing a size that cannot be halved for every branch."""
        levels = len(self.channels) - 1
        m = 2**levels
        if height % m or width % m:
            fix = (f"pad or crop it to multiples of {m} (e.g. "
                   f"{-(-height // m) * m}×{-(-width // m) * m})"
                   + (", or use fewer branches" if levels else ""))
            raise ValueError(
                f"MultiscaleCell: x is {height}×{width}, but {len(self.channels)} "
                f"branches halve its height and width {levels} time(s), so both must be "
                f"multiples of {m}; {fix}."
            )
        return tuple((height >> i, width >> i, c) for i, c in enumerate(self.channels))

    def zero_state(self, x: Float[Array, "*batch h w c"]) -> Maps:
        """The tuple of all-zero maps, with `x`'s batch axis when it has one."""
        *lead, h, w, _ = jnp.shape(x)
        dtype = self.inject.weight.dtype
        return tuple(jnp.zeros((*lead, *s), dtype) for s in self.shapes(h, w))

    def _masks(self, key: PRNGKeyArray | None, batch: int, dtype) -> list[Array | None]:
        if key is None:
            return [None] * len(self.channels)
        keys = jax.random.split(key, len(self.channels))
        # Dropout of ones: 0 or 1/(1 − p), and nothing in inference mode or at p = 0.
        return [self.dropout(jnp.ones((batch, 1, 1, c), dtype), key=k)
                for c, k in zip(self.channels, keys)]

    def __call__(self, z: Maps, x: Float[Array, "*batch h w c"], *,
                 key: PRNGKeyArray | None = None) -> Maps:
        z = self._check_state(z, x)
        single = x.ndim == 3
        if single:
            z, x = tuple(a[None] for a in z), x[None]
        dtype = z[0].dtype
        x = x.astype(dtype)
        injected = self.inject(x) + self.inject_bias[None, None, None, :]
        masks = self._masks(key, x.shape[0], dtype)
        blocks = [block(zi, injected if i == 0 else None, mask)
                  for i, (block, zi, mask) in enumerate(zip(self.blocks, z, masks))]
        out = []
        for i, row in enumerate(self.fuse):
            fused = blocks[i]
            for j, f in enumerate(row):
                if f is not None:
                    fused = fused + f(blocks[j])
            out.append(self.post_norms[i](self.post_convs[i](jax.nn.relu(fused))))
        return tuple(a[0] for a in out) if single else tuple(out)

    def _check_state(self, z: Maps, x: Array) -> Maps:
        x_shape = jnp.shape(x)
        if len(x_shape) not in (3, 4) or x_shape[-1] != self.inject_channels:
            raise ValueError(
                f"MultiscaleCell: x must be (H, W, {self.inject_channels}) or (N, H, W, "
                f"{self.inject_channels}), channels last; got x of shape {x_shape}."
            )
        *lead, h, w, _ = x_shape
        expected = tuple((*lead, *s) for s in self.shapes(h, w))
        got = tuple(jnp.shape(a) for a in z) if isinstance(z, (tuple, list)) else None
        if got != expected:
            raise ValueError(
                f"MultiscaleCell: z must be a tuple of {len(expected)} maps of shapes "
                f"{expected} for x of shape {x_shape}; got "
                f"{got if got is not None else type(z).__name__}. Start from "
                "cell.zero_state(x)."
            )
        return tuple(z)


class MultiscaleHead(eqx.Module):
    """A classifier reading every branch of a `MultiscaleCell`'s fixed point.

        logits = L(flatten([pool_{2^{n−1−i}}(zᵢ)]ᵢ))

    Each branch `zᵢ` is average-pooled by `2^{n−1−i}` down to the coarsest branch's grid,
    the branches are concatenated along the channels, and a linear layer `L` reads the
    flattened result. (Averaging each map over all its positions instead loses most of
    the information: every group-normalised map has a fixed mean over its positions and
    group, and such a head did not learn MNIST.) Takes the state tuple of one sample or
    of a batch (a batch axis first).

    **Arguments:** `channels` (the cell's), `classes`, `coarsest` (the `(height, width)`
    of the coarsest branch, i.e. the input's divided by `2^{n−1}`), `key`, `dtype`.
    """

    linear: eqx.nn.Linear
    channels: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, channels: tuple[int, ...], classes: int,
                 coarsest: tuple[int, int], *, key: PRNGKeyArray, dtype=None):
        classes = check_int("MultiscaleHead", "classes", classes)
        h, w = (check_int("MultiscaleHead", "coarsest", c) for c in coarsest)
        dtype = jnp.zeros(()).dtype if dtype is None else dtype
        self.channels = tuple(channels)
        self.linear = eqx.nn.Linear(h * w * sum(self.channels), classes, key=key,
                                    dtype=dtype)

    def __call__(self, z: Maps) -> Float[Array, "*batch classes"]:
        single = z[0].ndim == 3
        z = tuple(a[None] for a in z) if single else tuple(z)
        n = len(z)
        pooled = []
        for i, a in enumerate(z):
            f = 2 ** (n - 1 - i)
            b, h, w, c = a.shape
            pooled.append(a.reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4)))
        features = jnp.concatenate(pooled, axis=-1).reshape(z[0].shape[0], -1)
        if features.shape[1] != self.linear.in_features:
            raise ValueError(
                f"MultiscaleHead: the state's coarsest branch is "
                f"{pooled[0].shape[1]}×{pooled[0].shape[2]}, but the head was built for "
                f"{int(self.linear.in_features) // sum(self.channels)} positions; pass "
                "coarsest=(height, width) of the coarsest branch."
            )
        logits = jax.vmap(self.linear)(features)
        return logits[0] if single else logits
