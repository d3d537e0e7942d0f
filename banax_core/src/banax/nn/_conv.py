"""A channels-last 2-D convolution whose every derivative stays fast inside XLA loops.

XLA's CPU backend runs a convolution fast only in its canonical form: input `NHWC`,
kernel `HWIO`, output `NHWC` (it then becomes a YNNPACK/Eigen kernel). Outside loops it
rewrites other forms into that one with transposes; inside a `while` body, which is
where every DEQ solve runs, it does not, and a non-canonical convolution falls back to a
generic loop 15-100x slower. A channels-first convolution is non-canonical, and so is
the input gradient that autodiff derives from a canonical one: it reads the kernel as
`HWOI` (`dim_labels=b01f_01oi->b01f` in the compiled HLO). `conv2d` therefore carries a
custom VJP whose two gradients are themselves canonical convolutions of explicitly
transposed operands:

- input: `x̄ = conv(ȳ, flip(W)ᵀ)`, the kernel flipped in space and with `I`/`O` swapped;
- kernel: `W̄[i, j, c, o] = Σ_{n,h,w} x_pad[n, h+i, w+j, c] ȳ[n, h, w, o]`, a "valid"
  convolution with the roles of batch and channels exchanged (`x_pad` read as
  `(C, H, W, N)`, `ȳ` as `(H, W, N, O)`).

A custom VJP rules out forward-mode autodiff (`jax.jvp`, `jax.jacfwd`) of `conv2d`;
banax's Jacobian regularizers fall back to reverse mode for such cells.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

_CANONICAL = ("NHWC", "HWIO", "NHWC")


def _conv(x: Array, kernel: Array, padding: str | tuple) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=_CANONICAL
    )


def _pad(kernel: Array) -> tuple[tuple[int, int], tuple[int, int]]:
    kh, kw = kernel.shape[:2]
    return (kh // 2, kh // 2), (kw // 2, kw // 2)


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
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(
            f"conv2d: x must be (N, H, W, C_in) and kernel (kh, kw, C_in, C_out) with "
            f"the same C_in; got x of shape {x.shape} and kernel of shape {kernel.shape}."
        )
    if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
        raise ValueError(
            f"conv2d: the kernel size must be odd for 'same' padding to keep the image "
            f"size, got {kernel.shape[:2]}."
        )
    return _conv2d(x, kernel)


@jax.custom_vjp
def _conv2d(x: Array, kernel: Array) -> Array:
    return _conv(x, kernel, _pad(kernel))


def _conv2d_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _conv2d(x, kernel), (x, kernel)


def _conv2d_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    pad = _pad(kernel)
    flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
    x_bar = _conv(g, flipped, pad)
    x_pad = jnp.pad(x, ((0, 0), *pad, (0, 0)))
    # Batch and channels swap roles: a canonical "valid" convolution of x_pad, read as
    # (C_in, H, W, N), with ȳ read as a kernel (H, W, N, C_out), gives (C_in, kh, kw, C_out).
    k_bar = _conv(jnp.transpose(x_pad, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)), "VALID")
    return x_bar, jnp.transpose(k_bar, (1, 2, 0, 3))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)
