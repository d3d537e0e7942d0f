"""Group normalisation of channels-last sequences, images and volumes."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def check_groups(owner: str, what: str, channels: int, groups: int) -> None:
    """Reject a group count that does not split `channels` into equal groups."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise TypeError(f"{owner}: groups must be an int >= 1, got {groups!r}.")
    if channels % groups:
        raise ValueError(
            f"{owner}: groups={groups} does not divide {what}={channels}; group "
            "normalisation splits the channels into equal groups, so pick a divisor "
            f"of {channels} (e.g. groups={_largest_divisor(channels, groups)})."
        )


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def group_norm(
    x: Float[Array, "batch *spatial channels"],
    groups: int,
    scale: Float[Array, " channels"],
    shift: Float[Array, " channels"],
    eps: float = 1e-5,
) -> Float[Array, "batch *spatial channels"]:
    """`(x − μ) / √(σ² + ε) · γ + β`, with `μ`, `σ²` the mean and variance of each
    sample over its spatial positions and the channels of one group (Wu & He, 2018).

    `x` is channels last, `(N, *spatial, C)` with any number of spatial axes. Each
    sample is normalised on its own, so batch mode and `jax.vmap` agree. It is what
    `eqx.nn.GroupNorm(groups, channels)` computes on a channels-first sample.
    """
    n, c = x.shape[0], x.shape[-1]
    grouped = x.reshape(n, -1, groups, c // groups)
    mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
    var = jnp.var(grouped, axis=(1, 3), keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    lead = (None,) * (x.ndim - 1)
    return normed * scale[(*lead, slice(None))] + shift[(*lead, slice(None))]
