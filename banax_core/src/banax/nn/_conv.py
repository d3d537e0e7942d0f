"""Channels-last 1-, 2- and 3-D convolutions whose every derivative stays fast inside
XLA loops.

XLA's CPU backend runs a convolution fast only in its canonical form: input
channels-last (`NWC`, `NHWC`, `NDHWC`), kernel spatial-then-`IO` (`WIO`, `HWIO`,
`DHWIO`), output channels-last (it then becomes a YNNPACK/Eigen kernel). Outside loops
it rewrites other forms into that one with transposes; inside a `while` body, which is
where every DEQ solve runs, it does not, and a non-canonical convolution falls back to
a generic loop 15-100x slower. A channels-first convolution is non-canonical, and so is
the input gradient that autodiff derives from a canonical one: it reads the kernel as
`…OI` (`dim_labels=b01f_01oi->b01f` in the compiled HLO of a 2-D one). `conv1d`,
`conv2d` and `conv3d` therefore carry a custom VJP whose two gradients are themselves
canonical convolutions of explicitly transposed operands:

- input: `x̄ = conv(ȳ, flip(W)ᵀ)`, the kernel flipped in space and with `I`/`O` swapped;
- kernel: `W̄[s, c, o] = Σ_{n,p} x_pad[n, p+s, c] ȳ[n, p, o]` (`s`, `p` spatial
  offsets), a "valid" convolution with the roles of batch and channels exchanged
  (`x_pad` read as `(C, *spatial, N)`, `ȳ` as `(*spatial, N, O)`).

A custom VJP rules out forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) of these
convolutions; banax's Jacobian regularizers and `banax.spectral_radius` fall back to
reverse mode for such cells.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_SPATIAL = {1: "W", 2: "HW", 3: "DHW"}
_NAMES = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
_LAYOUTS = {1: "(N, L, C_in)", 2: "(N, H, W, C_in)", 3: "(N, D, H, W, C_in)"}


def _numbers(dims: int) -> tuple[str, str, str]:
    s = _SPATIAL[dims]
    return f"N{s}C", f"{s}IO", f"N{s}C"


def _conv(x: Array, kernel: Array, padding: str | tuple) -> Array:
    dims = kernel.ndim - 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1,) * dims, padding, dimension_numbers=_numbers(dims)
    )


def _pad(kernel: Array) -> tuple[tuple[int, int], ...]:
    return tuple((k // 2, k // 2) for k in kernel.shape[:-2])


def conv(x: Array, kernel: Array) -> Array:
    """`y = x ⋆ W` in `kernel.ndim − 2` spatial dimensions: stride 1, "same" zero
    padding, odd kernel sizes, channels last (see `conv1d`, `conv2d`, `conv3d`)."""
    dims = kernel.ndim - 2
    name = _NAMES.get(dims, "conv")
    if dims not in _NAMES or x.ndim != kernel.ndim or x.shape[-1] != kernel.shape[-2]:
        raise ValueError(
            f"{name}: x must be {_LAYOUTS.get(dims, '(N, *spatial, C_in)')} and kernel "
            f"({'k, ' * max(dims, 1)}C_in, C_out) with the same C_in; got x of shape "
            f"{x.shape} and kernel of shape {kernel.shape}."
        )
    if any(k % 2 == 0 for k in kernel.shape[:-2]):
        raise ValueError(
            f"{name}: the kernel size must be odd for 'same' padding to keep the "
            f"size, got {kernel.shape[:-2]}."
        )
    return _conv_same(x, kernel)


def conv1d(
    x: Float[Array, "batch length c_in"], kernel: Float[Array, "k c_in c_out"]
) -> Float[Array, "batch length c_out"]:
    """`y = x ⋆ W` on sequences: `x` is `(N, L, C_in)`, `kernel` `(k, C_in, C_out)`
    (`WIO`), the result `(N, L, C_out)`; stride 1, "same" zero padding, odd `k`.

    What `jax.lax.conv_general_dilated(x, kernel, (1,), "SAME",
    dimension_numbers=("NWC", "WIO", "NWC"))` computes, with a reverse-mode derivative
    that stays fast inside compiled loops (see the module docstring). No forward mode.
    """
    return _checked(x, kernel, 1)


def conv2d(
    x: Float[Array, "batch height width c_in"],
    kernel: Float[Array, "kh kw c_in c_out"],
) -> Float[Array, "batch height width c_out"]:
    """`y = x ⋆ W`: stride 1, "same" zero padding, odd kernel sizes, channels last.

    `x` is `(N, H, W, C_in)`, `kernel` is `(kh, kw, C_in, C_out)` (`HWIO`), and the
    result is `(N, H, W, C_out)`. It computes what
    `jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"))` does, with a reverse-mode derivative
    that stays fast inside compiled loops (see the module docstring). No forward-mode
    derivative.
    """
    return _checked(x, kernel, 2)


def conv3d(
    x: Float[Array, "batch depth height width c_in"],
    kernel: Float[Array, "kd kh kw c_in c_out"],
) -> Float[Array, "batch depth height width c_out"]:
    """`y = x ⋆ W` on volumes: `x` is `(N, D, H, W, C_in)`, `kernel`
    `(kd, kh, kw, C_in, C_out)` (`DHWIO`), the result `(N, D, H, W, C_out)`; stride 1,
    "same" zero padding, odd kernel sizes.

    What `jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME",
    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))` computes, with a reverse-mode
    derivative that stays fast inside compiled loops. No forward mode.
    """
    return _checked(x, kernel, 3)


def _checked(x: Array, kernel: Array, dims: int) -> Array:
    if kernel.ndim != dims + 2 or x.ndim != dims + 2:
        spatial = ", ".join(["k"] * dims)
        raise ValueError(
            f"{_NAMES[dims]}: x must be {_LAYOUTS[dims]} and kernel ({spatial}, C_in, "
            f"C_out) with the same C_in; got x of shape {x.shape} and kernel of shape "
            f"{kernel.shape}."
        )
    return conv(x, kernel)


@jax.custom_vjp
def _conv_same(x: Array, kernel: Array) -> Array:
    return _conv(x, kernel, _pad(kernel))


def _conv_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _conv_same(x, kernel), (x, kernel)


def _conv_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    dims = kernel.ndim - 2
    pad = _pad(kernel)
    spatial = tuple(range(dims))
    flipped = jnp.swapaxes(jnp.flip(kernel, spatial), -1, -2)
    x_bar = _conv(g, flipped, pad)
    x_pad = jnp.pad(x, ((0, 0), *pad, (0, 0)))
    # Batch and channels swap roles: a canonical "valid" convolution of x_pad, read as
    # (C_in, *spatial, N), with ȳ read as a kernel (*spatial, N, C_out), gives
    # (C_in, *k, C_out).
    last = dims + 1
    k_bar = _conv(jnp.moveaxis(x_pad, (0, last), (last, 0)), jnp.moveaxis(g, 0, dims),
                  "VALID")
    return x_bar, jnp.moveaxis(k_bar, 0, dims)


_conv_same.defvjp(_conv_fwd, _conv_bwd)
