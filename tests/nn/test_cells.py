"""banax.nn: the convolution and the cells against plain Equinox on the same weights,
and every adjoint's gradient through the convolutional cell against dense truths."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from annotation_checker import without_annotation_checks

import banax
from banax import nn
from helpers import dense_jacobian

DN = ("NHWC", "HWIO", "NHWC")
# Relative to the largest entry of the reference (rounding of sums of many terms).
TOL = {jnp.float32: 2e-5, jnp.float64: 1e-11}
DTYPES = [jnp.float32, jnp.float64]
DTYPE_IDS = ["f32", "f64"]


def _normal(seed, shape, dtype):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64).astype(dtype)


def _close(a, b, dtype):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=TOL[dtype],
                                   atol=TOL[dtype] * np.max(np.abs(y)))


# -- the reference: the same block from eqx.nn layers, channels first, per sample --------


def _eqx_conv(kernel, bias=None):
    """An `eqx.nn.Conv2d` holding `kernel` (HWIO) and `bias`."""
    k, _, c_in, c_out = kernel.shape
    layer = eqx.nn.Conv2d(c_in, c_out, k, padding=k // 2, use_bias=bias is not None,
                          key=jax.random.key(0), dtype=kernel.dtype)
    layer = eqx.tree_at(lambda c: c.weight, layer, jnp.transpose(kernel, (3, 2, 0, 1)))
    return layer if bias is None else eqx.tree_at(lambda c: c.bias, layer, bias[:, None, None])


def reference_cell(cell):
    """`cell` rebuilt from eqx.nn.Conv2d and eqx.nn.GroupNorm, on channels-last batches
    (moved to channels first per sample)."""
    norms = []
    for scale, shift in zip(cell.scales, cell.shifts):
        gn = eqx.nn.GroupNorm(cell.groups, scale.shape[0], dtype=scale.dtype)
        norms.append(eqx.tree_at(lambda g: (g.weight, g.bias), gn, (scale, shift)))
    conv1, conv2 = _eqx_conv(cell.conv1), _eqx_conv(cell.conv2)
    inject = _eqx_conv(cell.inject, cell.inject_bias)

    def one(z, x):
        z, x = jnp.moveaxis(z, -1, 0), jnp.moveaxis(x, -1, 0)
        h = jax.nn.relu(norms[0](conv1(z)))
        u = norms[1](conv2(h) + inject(x))
        return jnp.moveaxis(norms[2](jax.nn.relu(z + u)), 0, -1)

    return jax.vmap(one)


# -- conv2d --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv2d_and_its_vjp_match_lax(k, dtype):
    """Values against eqx.nn.Conv2d; the custom VJP (input and kernel cotangents)
    against `jax.vjp` of the plain lax convolution."""
    x, kernel = _normal(0, (2, 5, 6, 3), dtype), _normal(1, (k, k, 3, 4), dtype)
    g = _normal(2, (2, 5, 6, 4), dtype)

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)

    @jax.jit
    def both(x, kernel, g):
        y, vjp = jax.vjp(nn.conv2d, x, kernel)
        eqx_y = jnp.moveaxis(jax.vmap(_eqx_conv(kernel))(jnp.moveaxis(x, -1, 1)), 1, -1)
        return (y, vjp(g)), (eqx_y, jax.vjp(lax_conv, x, kernel)[1](g))

    ours, theirs = both(x, kernel, g)
    _close(ours, theirs, dtype)


def test_conv2d_gradients_compile_to_canonical_convolutions():
    """Inside a loop every convolution, the VJP's two included, reads NHWC/HWIO: the
    form XLA's CPU backend runs fast (the layout autodiff gives reads the kernel as
    HWOI, 'b01f_01oi')."""
    x, kernel = _normal(0, (2, 5, 6, 3), jnp.float32), _normal(1, (3, 3, 3, 3), jnp.float32)

    def unrolled(kernel, x):
        z = jax.lax.fori_loop(0, 3, lambda i, z: jnp.tanh(nn.conv2d(z, kernel)), x)
        return jnp.sum(z)

    hlo = jax.jit(jax.grad(unrolled)).lower(kernel, x).compile().as_text()
    labels = [line.split("dim_labels=")[1].split(",")[0] for line in hlo.splitlines()
              if " convolution(" in line]
    assert len(labels) >= 3
    assert set(labels) == {"b01f_01io->b01f"}


@pytest.mark.parametrize(
    "x_shape, kernel_shape, message",
    [((5, 6, 3), (3, 3, 3, 4), r"x must be \(N, H, W, C_in\)"),
     ((2, 5, 6, 3), (3, 3, 2, 4), "the same C_in"),
     ((2, 5, 6, 3), (2, 2, 3, 4), r"kernel size must be odd.*\(2, 2\)")],
)
@without_annotation_checks()
def test_conv2d_bad_shapes(x_shape, kernel_shape, message):
    with pytest.raises(ValueError, match=f"conv2d: .*{message}"):
        nn.conv2d(jnp.ones(x_shape), jnp.ones(kernel_shape))


# -- the cells against Equinox ---------------------------------------------------------


def _conv_cell(dtype, channels=4, inject=3, groups=2, seed=0):
    return nn.ConvCell(channels, inject, hidden_channels=2 * channels, groups=groups,
                       key=jax.random.key(seed), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_conv_cell_matches_equinox_values_and_gradients(dtype):
    """Same weights: the same values (batched and single sample) and the same
    gradients with respect to every weight, the state and the input."""
    cell = _conv_cell(dtype)
    z, x = _normal(3, (2, 6, 5, 4), dtype), _normal(4, (2, 6, 5, 3), dtype)
    c = _normal(5, (2, 6, 5, 4), dtype)

    def loss(cell_, z, x, via_reference):
        out = reference_cell(cell_)(z, x) if via_reference else cell_(z, x)
        return jnp.sum(c * out)

    @jax.jit
    def both(cell, z, x):
        grads = [jax.grad(loss, argnums=(0, 1, 2))(cell, z, x, r) for r in (False, True)]
        ours = (cell(z, x), cell(z[1], x[1]), grads[0])
        return ours, (reference_cell(cell)(z, x), reference_cell(cell)(z, x)[1], grads[1])

    ours, theirs = both(cell, z, x)
    _close(ours, theirs, dtype)


def test_mlp_cell_matches_equinox_and_starts_contractive():
    """`tanh(W₂ relu(W₁ z + U x + b₁) + b₂)` from eqx.nn.Linear on the same weights;
    at initialisation `‖W₂‖₂ ‖W₁‖₂ = 0.9`."""
    cell = nn.MLPCell(5, 3, hidden_features=7, key=jax.random.key(0), dtype=jnp.float64)
    hidden = eqx.nn.Linear(8, 7, key=jax.random.key(1), dtype=jnp.float64)
    hidden = eqx.tree_at(lambda lin: (lin.weight, lin.bias), hidden,
                         (jnp.concatenate([cell.W1, cell.U], 1), cell.b1))
    out = eqx.nn.Linear(7, 5, key=jax.random.key(1), dtype=jnp.float64)
    out = eqx.tree_at(lambda lin: (lin.weight, lin.bias), out, (cell.W2, cell.b2))
    z, x = _normal(1, (4, 5), jnp.float64), _normal(2, (4, 3), jnp.float64)
    expected = jax.vmap(lambda z, x: jnp.tanh(out(jax.nn.relu(hidden(jnp.concatenate([z, x]))))))
    ours = jax.jit(lambda z, x: (cell(z, x), cell(z[0], x[0])))(z, x)
    theirs = jax.jit(lambda z, x: (expected(z, x), expected(z, x)[0]))(z, x)
    _close(ours, theirs, jnp.float64)
    np.testing.assert_allclose(
        np.linalg.norm(cell.W2, 2) * np.linalg.norm(cell.W1, 2), 0.9, rtol=1e-12)


# -- bad input -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [({"groups": 3}, ValueError, r"groups=3 does not divide channels=4.*groups=2"),
     ({"groups": 4, "hidden_channels": 6}, ValueError,
      r"groups=4 does not divide hidden_channels=6.*groups=3"),
     ({"groups": 2, "kernel_size": 4}, ValueError, "kernel_size must be odd.*got 4"),
     ({"groups": 0}, TypeError, "groups must be an int >= 1, got 0")],
)
@without_annotation_checks()
def test_conv_cell_bad_construction(kwargs, error, message):
    with pytest.raises(error, match=f"ConvCell: {message}"):
        nn.ConvCell(4, 3, key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize(
    "z_shape, x_shape, message",
    [((2, 4, 6, 6), (2, 6, 6, 3), r"z must be \(H, W, 4\) or \(N, H, W, 4\), channels "
      r"last; got z of shape \(2, 4, 6, 6\).*z looks channels-first.*moveaxis\(z, -3, -1\)"),
     ((2, 6, 6, 4), (2, 6, 6, 2), r"x must be \(N, H, W, 3\), channels last, like z"),
     ((2, 6, 6, 4), (2, 5, 6, 3), "x and z must have the same batch and spatial size"),
     ((6, 4), (6, 3), r"z must be \(H, W, 4\)")],
)
def test_conv_cell_image_that_does_not_fit(z_shape, x_shape, message):
    cell = _conv_cell(jnp.float64)
    with pytest.raises(ValueError, match=f"ConvCell: {message}"):
        cell(jnp.ones(z_shape), jnp.ones(x_shape))


@without_annotation_checks()
def test_deq_reports_a_bad_image_in_one_line():
    deq = banax.DEQ(_conv_cell(jnp.float64), solver="picard", state_shape=(6, 6, 4))
    with pytest.raises(ValueError, match=r"DEQ: the cell failed .*ConvCell: x must be"):
        deq(jnp.ones((6, 6, 5)))


@without_annotation_checks()
def test_mlp_cell_bad_shapes():
    cell = nn.MLPCell(5, 3, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"MLPCell: z must be \(5,\) or \(N, 5\).*got z of "
                                         r"shape \(4, 6\)"):
        cell(jnp.ones((4, 6)), jnp.ones((4, 3)))
    with pytest.raises(TypeError, match="MLPCell: features must be an int >= 1, got 0"):
        nn.MLPCell(0, 3, key=jax.random.key(0))


# -- every adjoint through the convolutional cell ------------------------------------------
# A batch of 2 images of 6×6 with 4 channels, solved to 1e-12 in float64; the loss is
# Σ c·z*. Truths by dense linear algebra on the 288 × 288 Jacobian J = ∂f/∂z at z*, with
# the parameter VJP (∂f/∂θ)ᵀ λ taken through the cell (checked against Equinox above):
# implicit λ = (I − Jᵀ)⁻¹ c; JFB λ = c; the phantoms (K terms of relaxation β, at an exact
# fixed point the unrolled and the Neumann phantom agree) λ = β Σ_{k<K} (J_βᵀ)^k c with
# J_β = (1 − β) I + β J. BPTT and the reversible adjoint differentiate converged solves
# and match the implicit gradient.
K, BETA = 3, 0.7
SHAPE = (6, 6, 4)


def _solver(name, dtype=jnp.float64, **options):
    tol = 1e-12 if dtype == jnp.float64 else 1e-6
    return banax.get_solver(name, rtol=tol, atol=tol, max_steps=300, **options)


ADJOINTS = {
    "implicit": lambda axis: banax.get_adjoint(
        "implicit", solver=_solver("anderson", batch_axis=axis),
        b_solver=_solver("anderson", batch_axis=axis)),
    "jfb": lambda axis: banax.get_adjoint("jfb", solver=_solver("anderson", batch_axis=axis)),
    "unroll_phantom": lambda axis: banax.get_adjoint(
        "unroll_phantom", solver=_solver("anderson", batch_axis=axis),
        b_solver=banax.get_solver("relaxed", damp=BETA, max_steps=K)),
    "neumann_phantom": lambda axis: banax.get_adjoint(
        "neumann_phantom", solver=_solver("anderson", batch_axis=axis),
        b_solver=banax.get_solver("relaxed", damp=BETA, max_steps=K)),
    "bptt": lambda axis: banax.get_adjoint(
        "bptt", solver=_solver("picard", batch_axis=axis, loop_kind="checkpointed")),
    # The flat mode: the exact mode's rewind needs f's backward evaluation within a few grid
    # units of the forward's, and XLA's older CPU fusion emitter (the suite's compile flags)
    # evaluates this float64 cell hundreds of units apart in the two loops; the exact mode
    # reports that, and passes here under XLA's default code generator.
    "reversible": lambda axis: banax.get_adjoint(
        "reversible", solver=_solver("reversible", batch_axis=axis, damp=0.8), mode="flat"),
}
LAMBDA = {"implicit": "implicit", "jfb": "jfb", "unroll_phantom": "phantom",
          "neumann_phantom": "phantom", "bptt": "implicit", "reversible": "implicit"}
# Tolerances against the truth, relative to its largest entry: exact rules to rounding
# and the solves' tolerance; the reversible walk has an error floor near 1e-6 in float64.
RTOL = {"bptt": 1e-7, "reversible": 1e-5}


@pytest.fixture(scope="module")
def conv_problem():
    cell = _conv_cell(jnp.float64)
    x = _normal(6, (2, 6, 6, 3), jnp.float64)
    c = _normal(7, (2, *SHAPE), jnp.float64)
    implicit = _grads(ADJOINTS["implicit"](0), cell, x, c, 0)
    z = implicit[1]
    J = np.asarray(dense_jacobian(cell, z, x))
    eye = np.eye(J.shape[0])
    cf = np.asarray(c).ravel()
    Jb = (1 - BETA) * eye + BETA * J
    lambdas = {"implicit": np.linalg.solve(eye - J.T, cf), "jfb": cf,
               "phantom": BETA * sum(np.linalg.matrix_power(Jb.T, k) @ cf for k in range(K))}
    _, vjp = jax.vjp(lambda cell, x: cell(z, x), cell, x)
    truths = {k: vjp(jnp.asarray(lam).reshape(z.shape)) for k, lam in lambdas.items()}
    return cell, x, c, z, truths, implicit


def _grads(adjoint, cell, x, c, batch_axis):
    @eqx.filter_jit
    def run(cell, x):
        def loss(cell, x):
            deq = banax.DEQ(cell, adjoint=adjoint, state_shape=SHAPE)
            z = deq(x) if batch_axis == 0 else jax.vmap(deq)(x)
            return jnp.sum(c.astype(z.dtype) * z), z

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(cell, x)

    return run(cell, x)


def _assert_grads(got, truth, rtol):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(truth), strict=True):
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol,
                                   atol=rtol * np.max(np.abs(b)))


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_every_adjoint_through_the_conv_cell_in_batch_mode(conv_problem, name):
    cell, x, c, z, truths, implicit = conv_problem
    grads, z_out = implicit if name == "implicit" else _grads(ADJOINTS[name](0), cell, x, c, 0)
    np.testing.assert_allclose(z_out, z, rtol=1e-9, atol=1e-10)
    _assert_grads(grads, truths[LAMBDA[name]], RTOL.get(name, 1e-9))


def test_implicit_in_float32_under_vmap_matches_batch_mode(conv_problem):
    """`jax.vmap` of a per-sample DEQ (the cell sees single (6, 6, 4) images) in float32
    gives the float64 batch-mode gradient within the float32 solve's accuracy."""
    dtype = jnp.float32
    cell, x, c, z, truths, _ = conv_problem

    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)

    adjoint = banax.get_adjoint("implicit", solver=_solver("anderson", dtype),
                                b_solver=_solver("anderson", dtype))
    grads, z_out = _grads(adjoint, cast(cell), x.astype(dtype), c, None)
    assert z_out.dtype == dtype
    rtol = 2e-3
    np.testing.assert_allclose(z_out, z, rtol=rtol, atol=rtol)
    _assert_grads(grads, truths["implicit"], rtol)


# -- sequences and volumes -----------------------------------------------------------------

LAX_DN = {1: ("NWC", "WIO", "NWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


@pytest.mark.parametrize("dims, conv", [(1, nn.conv1d), (3, nn.conv3d)], ids=["1d", "3d"])
@pytest.mark.parametrize("k", [1, 3])
def test_conv1d_and_conv3d_and_their_vjps_match_lax(dims, conv, k):
    spatial = (7,) if dims == 1 else (3, 4, 5)
    x = _normal(0, (2, *spatial, 3), jnp.float64)
    kernel = _normal(1, (k,) * dims + (3, 4), jnp.float64)
    g = _normal(2, (2, *spatial, 4), jnp.float64)

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1,) * dims, "SAME",
                                            dimension_numbers=LAX_DN[dims])

    @jax.jit
    def both(x, kernel, g):
        y, vjp = jax.vjp(conv, x, kernel)
        y_lax, vjp_lax = jax.vjp(lax_conv, x, kernel)
        return (y, vjp(g)), (y_lax, vjp_lax(g))

    ours, theirs = both(x, kernel, g)
    _close(ours, theirs, jnp.float64)


@without_annotation_checks()
def test_conv_bad_rank():
    with pytest.raises(ValueError, match=r"conv1d: x must be \(N, L, C_in\)"):
        nn.conv1d(jnp.ones((2, 5, 6, 3)), jnp.ones((3, 3, 4)))
    with pytest.raises(ValueError, match=r"conv3d: x must be \(N, D, H, W, C_in\)"):
        nn.conv3d(jnp.ones((2, 5, 6, 3)), jnp.ones((3, 3, 3, 3, 4)))


@pytest.mark.parametrize("dims, spatial", [(1, (7,)), (3, (3, 4, 3))], ids=["1d", "3d"])
def test_conv_cell_on_sequences_and_volumes(dims, spatial):
    """The block written with lax convolutions and group norms (channels last, per
    sample) on the same weights; one sample alone equals it inside a batch."""
    cell = nn.ConvCell(4, 3, hidden_channels=8, groups=2, dims=dims,
                       key=jax.random.key(0), dtype=jnp.float64)
    z, x = _normal(3, (2, *spatial, 4), jnp.float64), _normal(4, (2, *spatial, 3), jnp.float64)

    def lax_conv(a, w):
        return jax.lax.conv_general_dilated(a, w, (1,) * dims, "SAME",
                                            dimension_numbers=LAX_DN[dims])

    def gn(i, a):
        grouped = a.reshape(a.shape[0], -1, 2, a.shape[-1] // 2)
        mean = grouped.mean(axis=(1, 3), keepdims=True)
        var = grouped.var(axis=(1, 3), keepdims=True)
        normed = ((grouped - mean) / jnp.sqrt(var + 1e-5)).reshape(a.shape)
        lead = (None,) * (a.ndim - 1)
        return normed * cell.scales[i][lead] + cell.shifts[i][lead]

    h = jax.nn.relu(gn(0, lax_conv(z, cell.conv1)))
    bias = cell.inject_bias[(None,) * (dims + 1)]
    u = gn(1, lax_conv(h, cell.conv2) + lax_conv(x, cell.inject) + bias)
    expected = gn(2, jax.nn.relu(z + u))
    _close((cell(z, x), cell(z[1], x[1])), (expected, expected[1]), jnp.float64)
    assert cell.zero_state(x).shape == z.shape


# -- wrong rank ----------------------------------------------------------------------------


@without_annotation_checks()
def test_batch_of_sequences_to_the_image_cell_is_refused():
    """(N, L, C) read as one image would mix the samples in the convolutions and group
    norms; in batch mode the 2-D cell refuses it, naming the layout and the 1-D cell."""
    cell = nn.ConvCell(4, 3, groups=2, key=jax.random.key(0))
    deq = banax.DEQ(cell, solver=banax.get_solver("picard", batch_axis=0))
    with pytest.raises(ValueError, match=r"ConvCell: in batch mode \(batch_axis=0\) x must "
                       r"be \(N, H, W, C=3\); got x of shape \(4, 9, 3\).*"
                       r"dims=1\) takes sequences"):
        deq(jnp.ones((4, 9, 3)))
    single = banax.DEQ(cell, solver="picard")
    with pytest.raises(ValueError, match=r"ConvCell: without a batch axis x must be "
                       r"\(H, W, C=3\) or \(N, H, W, C=3\); got x of shape \(9, 3\)"):
        single(jnp.ones((9, 3)))


@without_annotation_checks()
def test_mlp_cell_refuses_the_wrong_rank():
    deq = banax.DEQ(nn.MLPCell(5, 3, key=jax.random.key(0)),
                    solver=banax.get_solver("picard", batch_axis=0))
    with pytest.raises(ValueError, match=r"MLPCell: in batch mode \(batch_axis=0\) x must be "
                       r"\(N, F=3\); got x of shape \(3,\)"):
        deq(jnp.ones((3,)))


def test_spectral_radius_on_the_conv_cell_falls_back_to_reverse_mode():
    """conv2d's custom VJP has no forward mode; the estimate comes from transposed VJPs
    and matches the dense Jacobian's largest eigenvalue modulus, per sample."""
    cell = _conv_cell(jnp.float64)
    x = _normal(6, (2, 4, 4, 3), jnp.float64)
    deq = banax.DEQ(cell, solver=_solver("anderson", batch_axis=0))
    z = deq(x)
    rho = banax.spectral_radius(deq.f_spec(x), z, key=jax.random.key(0), batch_axis=0,
                                n_steps=400)
    truth = [np.max(np.abs(np.linalg.eigvals(np.asarray(dense_jacobian(cell, z[i], x[i])))))
             for i in range(2)]
    np.testing.assert_allclose(rho, truth, rtol=3e-2)
