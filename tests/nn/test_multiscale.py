"""banax.nn.MultiscaleCell against a plainly written MDEQ on the same weights, its
fusion shapes, its implicit gradient against the dense implicit-function theorem,
batch mode against per-sample and vmapped solves, dropout, weight norm and bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from annotation_checker import without_annotation_checks
from jax.flatten_util import ravel_pytree

import banax
from banax import nn
from helpers import dense_jacobian

F64 = jnp.float64


def _normal(seed, shape, dtype=F64):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float64).astype(dtype)


def _cell(channels=(4, 8), seed=0, **kwargs):
    return nn.MultiscaleCell(channels, 3, groups=2, key=jax.random.key(seed), dtype=F64,
                             **kwargs)


def _close(a, b, rtol=1e-10):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        y = np.asarray(y)
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=rtol * np.max(np.abs(y)))


# -- the reference: one sample, channels first, strided lax convolutions, eqx.nn.GroupNorm --


def _conv(a, weight, stride=1):
    k = weight.shape[0]
    return jax.lax.conv_general_dilated(a[None], weight, (stride, stride), [(k // 2, k // 2)] * 2,
                                        dimension_numbers=("NCHW", "HWIO", "NCHW"))[0]


def _gn(norm, a):
    layer = eqx.nn.GroupNorm(norm.groups, norm.scale.shape[0], dtype=a.dtype)
    return eqx.tree_at(lambda g: (g.weight, g.bias), layer, (norm.scale, norm.shift))(a)


def reference(cell, z, x):
    """MDEQ's layer written out per sample, channels first."""
    relu = jax.nn.relu
    z = [jnp.moveaxis(a, -1, 0) for a in z]
    x = jnp.moveaxis(x, -1, 0)
    blocks = []
    for i, (b, zi) in enumerate(zip(cell.blocks, z)):
        h = relu(_gn(b.norms[0], _conv(zi, b.conv1.weight)))
        u = _conv(h, b.conv2.weight)
        if i == 0:
            u = u + _conv(x, cell.inject.weight) + cell.inject_bias[:, None, None]
        blocks.append(_gn(b.norms[2], relu(zi + _gn(b.norms[1], u))))
    out = []
    for i in range(len(blocks)):
        total = blocks[i]
        for j in range(len(blocks)):
            f = cell.fuse[i][j]
            if j < i:  # strided 3×3 convolutions, each with a group norm, ReLU between
                a = blocks[j]
                for k, (c, n) in enumerate(zip(f.convs, f.norms)):
                    a = _gn(n, _conv(a, c.weight, stride=2))
                    a = relu(a) if k < len(f.convs) - 1 else a
                total = total + a
            elif j > i:  # 1×1 convolution, group norm, nearest upsampling
                a = _gn(f.norm, _conv(blocks[j], f.conv.weight))
                size = (a.shape[0], *blocks[i].shape[1:])
                total = total + jax.image.resize(a, size, "nearest")
        post = _gn(cell.post_norms[i], _conv(relu(total), cell.post_convs[i].weight))
        out.append(jnp.moveaxis(post, 0, -1))
    return tuple(out)


def test_cell_matches_the_reference_values_and_gradients():
    """Three branches (a two-level downsampling chain included), random shifts so that
    every group norm's affine part matters."""
    cell = _cell((4, 4, 8))
    leaves, treedef = jax.tree.flatten(cell)
    cell = jax.tree.unflatten(treedef, [
        a + 0.1 * _normal(i, a.shape) if eqx.is_inexact_array(a) else a
        for i, a in enumerate(leaves)])
    x = _normal(50, (2, 8, 8, 3))
    z = tuple(_normal(60 + i, s) for i, s in enumerate(
        [(2, 8, 8, 4), (2, 4, 4, 4), (2, 2, 2, 8)]))
    c = tuple(_normal(70 + i, a.shape) for i, a in enumerate(z))

    def loss(args, ours):
        cell, z, x = args
        out = cell(z, x) if ours else jax.vmap(lambda zi, xi: reference(cell, zi, xi))(z, x)
        return sum(jnp.sum(ci * o) for ci, o in zip(c, out))

    @eqx.filter_jit
    def both(cell, z, x):
        one = tuple(a[1] for a in z)
        ours = (cell(z, x), cell(one, x[1]), eqx.filter_grad(loss)((cell, z, x), True))
        theirs = (jax.vmap(lambda zi, xi: reference(cell, zi, xi))(z, x),
                  reference(cell, one, x[1]), eqx.filter_grad(loss)((cell, z, x), False))
        return ours, theirs

    ours, theirs = both(cell, z, x)
    _close(ours, theirs)


@pytest.mark.parametrize("channels", [(4, 8), (4, 4, 8), (2, 2, 4, 4)],
                         ids=["2", "3", "4"])
def test_fusion_shapes(channels):
    """Branch i at 1/2^i of the image with channels[i]; each fusion path's output shape
    is its target branch's."""
    cell = nn.MultiscaleCell(channels, 1, groups=2, key=jax.random.key(0))
    x = jnp.ones((3, 16, 8, 1), jnp.float32)
    expected = tuple((3, 16 >> i, 8 >> i, c) for i, c in enumerate(channels))
    z = cell.zero_state(x)
    assert tuple(a.shape for a in z) == expected
    out = jax.eval_shape(cell, z, x)
    assert tuple(a.shape for a in out) == expected
    for i, row in enumerate(cell.fuse):
        for j, f in enumerate(row):
            assert (f is None) == (i == j)
            if f is not None:
                assert jax.eval_shape(f, z[j]).shape == expected[i]
    head = nn.MultiscaleHead(channels, 10, expected[-1][1:3], key=jax.random.key(1))
    assert jax.eval_shape(head, out).shape == (3, 10)
    assert jax.eval_shape(head, tuple(a[0] for a in z)).shape == (10,)


def _solver(batch_axis=0, name="anderson", **kw):
    return banax.get_solver(name, rtol=1e-12, atol=1e-12, max_steps=200,
                            batch_axis=batch_axis, **kw)


@eqx.filter_jit  # as `dense_jacobian`: eagerly, several times slower
def _pullback(cell, z, x, lam):
    """(∂cell/∂(θ, x))ᵀ λ at (z, x), for a flattened λ."""
    _, vjp = eqx.filter_vjp(lambda args: args[0](z, args[1]), (cell, x))
    return vjp(ravel_pytree(z)[1](lam))[0]


@pytest.fixture(scope="module")
def solved():
    """The cell, the input, the float64 fixed point, its solution and the dense J there."""
    cell, x = _cell(), _normal(1, (2, 8, 8, 3))
    deq = banax.DEQ(cell, adjoint=banax.get_adjoint(
        "implicit", solver=_solver(), b_solver=_solver()))
    z, sol = eqx.filter_jit(lambda x: deq(x, return_solution=True))(x)
    return cell, x, z, sol, np.asarray(dense_jacobian(cell, z, x))


def test_default_init_is_a_contraction_that_converges(solved):
    cell, x, z, sol, J = solved
    assert bool(jnp.all(sol.result == banax.Result.CONVERGED))
    residual = jax.tree.map(lambda a, b: a - b, cell(z, x), z)
    assert float(jnp.max(jnp.abs(ravel_pytree(residual)[0]))) < 1e-10
    # The samples' Jacobians are blocks of J: its spectrum is both samples'.
    assert np.max(np.abs(np.linalg.eigvals(J))) < 0.9


@eqx.filter_jit
def _layer_grads(adjoint, cell, x, c):
    """The gradient of Σ c·z* with respect to the cell and the input, through the layer."""
    def loss(args):
        out = banax.DEQ(args[0], adjoint=adjoint)(args[1])
        return sum(jnp.sum(ci * o) for ci, o in zip(c, out))
    return eqx.filter_grad(loss)((cell, x))


@pytest.mark.parametrize("name", ["implicit", "jfb", "bptt"])
def test_gradients_against_the_dense_implicit_function_theorem(solved, name):
    """Loss Σ c·z*: implicit (and BPTT through a converged solve) λ = (I − Jᵀ)⁻¹ c,
    JFB λ = c, with J the dense Jacobian at the float64 fixed point; the parameter
    and input gradients are (∂f/∂(θ, x))ᵀ λ."""
    cell, x, z, _, J = solved
    c = tuple(_normal(10 + i, a.shape) for i, a in enumerate(z))
    cf = np.asarray(ravel_pytree(c)[0])
    lam = cf if name == "jfb" else np.linalg.solve(np.eye(len(cf)) - J.T, cf)
    truth = _pullback(cell, z, x, jnp.asarray(lam))
    solver = _solver(name="picard", loop_kind="checkpointed") if name == "bptt" else _solver()
    adjoint = banax.get_adjoint(name, solver=solver, **(
        {"b_solver": _solver()} if name == "implicit" else {}))

    _close(_layer_grads(adjoint, cell, x, c), truth, rtol=1e-7)


@pytest.mark.parametrize("name", ["neumann_phantom", "unroll_phantom", "reversible", "gdeq"])
def test_the_other_adjoints_against_their_closed_forms(solved, name):
    """At the float64 fixed point: both phantoms give λ = Σ_{k<K} (Jᵀ)^k c with K = 4
    Picard steps; the reversible adjoint (exact BPTT through a converged reversible
    iteration) gives the implicit gradient; GDEQ's low-rank inverse from Broyden's
    forward solve moves the gradient from JFB's λ = c towards the implicit one."""
    cell, x, z, _, J = solved
    c = tuple(_normal(20 + i, a.shape) for i, a in enumerate(z))
    cf = np.asarray(ravel_pytree(c)[0])

    def through(lam):
        return _pullback(cell, z, x, jnp.asarray(lam))

    if name in ("neumann_phantom", "unroll_phantom"):
        lam, term = np.zeros_like(cf), cf
        for _ in range(4):
            lam, term = lam + term, J.T @ term
        adjoint = banax.get_adjoint(name, solver=_solver(),
                                    b_solver=banax.get_solver("picard", max_steps=4))
    elif name == "reversible":
        lam = np.linalg.solve(np.eye(len(cf)) - J.T, cf)
        adjoint = banax.get_adjoint(name, solver=_solver(name="reversible", damp=0.5))
    else:
        adjoint = banax.get_adjoint(name, solver=_solver(name="broyden"))

    ours = _layer_grads(adjoint, cell, x, c)
    if name != "gdeq":
        _close(ours, through(lam), rtol=1e-6)
        return
    truth = ravel_pytree(through(np.linalg.solve(np.eye(len(cf)) - J.T, cf)))[0]
    jfb = ravel_pytree(through(cf))[0]
    gdeq = ravel_pytree(ours)[0]
    # The estimate has the rank of Broyden's history, far below the state's 768
    # dimensions, so it corrects little; but it must correct, and towards the truth.
    assert np.linalg.norm(gdeq - jfb) > 1e-3 * np.linalg.norm(jfb)
    assert np.linalg.norm(gdeq - truth) < np.linalg.norm(jfb - truth)


def test_batch_mode_per_sample_and_vmap_agree(solved):
    cell, x, z, _, _ = solved
    single = banax.DEQ(cell, solver=_solver(batch_axis=None))
    alone = single(x[1])
    vmapped = jax.vmap(single)(x)
    _close(tuple(a[1] for a in z), alone, rtol=1e-9)
    _close(z, vmapped, rtol=1e-9)


def test_variational_dropout_one_mask_per_key():
    cell = _cell(dropout=0.5)
    x = _normal(1, (2, 8, 8, 3))
    z = cell(cell.zero_state(x), x)  # at z = 0 the masked convolution reads zeros
    k1, k2 = jax.random.key(1), jax.random.key(2)
    first, again, other, plain = (cell(z, x, key=k1), cell(z, x, key=k1),
                                  cell(z, x, key=k2), cell(z, x))
    _close(first, again, rtol=0)
    assert not np.allclose(first[0], other[0]) and not np.allclose(first[0], plain[0])
    _close(eqx.nn.inference_mode(cell)(z, x, key=k1), plain, rtol=0)
    deq = banax.DEQ(cell, solver=_solver())
    out = deq(x, key=k1)
    _close(out, cell(out, x, key=k1), rtol=1e-9)  # one mask for the whole solve


def test_weight_norm_wraps_the_convolutions():
    """eqx.nn.WeightNorm(conv, axis=-1) per output channel: the same cell at
    initialisation, and gradients reach the direction and the magnitude."""
    cell = _cell()
    normed = eqx.tree_at(lambda c: c.post_convs, cell, replace_fn=lambda convs: tuple(
        eqx.nn.WeightNorm(conv, axis=-1) for conv in convs))
    x = _normal(1, (2, 8, 8, 3))
    z = cell(cell.zero_state(x), x)
    _close(normed(z, x), cell(z, x), rtol=1e-12)
    c = _normal(2, z[1].shape)  # a plain sum of a group norm's output is constant
    grads = eqx.filter_grad(
        lambda m: jnp.sum(c * banax.DEQ(m, solver=_solver())(x)[1]))(normed)
    g = grads.post_convs[0]
    assert g.g.shape == (1, 1, 1, 4) and float(jnp.max(jnp.abs(g.g))) > 0
    assert float(jnp.max(jnp.abs(g.layer.weight))) > 0


def test_training_lowers_the_loss():
    """A few Adam steps of cell + head on a tiny two-class problem (bright left or
    right half)."""
    key = jax.random.key(0)
    cell = nn.MultiscaleCell((4, 8), 1, groups=2, key=key)
    head = nn.MultiscaleHead((4, 8), 2, (4, 4), key=jax.random.key(1))
    y = jnp.arange(8) % 2
    x = 0.3 * jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
    x = x + jnp.where((jnp.arange(8)[None, None, :] < 4) == (y[:, None, None] == 1),
                      1.0, 0.0)[..., None]
    model = (cell, head)
    solver = banax.get_solver("anderson", rtol=1e-4, max_steps=30, batch_axis=0)

    def loss(model):
        cell, head = model
        logits = head(banax.DEQ(cell, solver=solver)(x))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    opt = optax.adam(1e-2)
    state = opt.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = opt.update(grads, state)
        return eqx.apply_updates(model, updates), state, value

    first = None
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction promotes
        for _ in range(15):
            model, state, value = step(model, state)
            first = value if first is None else first
    assert float(eqx.filter_jit(loss)(model)) < 0.5 * float(first)


# -- bad input -------------------------------------------------------------------------


def test_an_image_that_cannot_be_halved():
    cell = _cell((4, 4, 8))
    with pytest.raises(ValueError, match=r"MultiscaleCell: x is 6×8, but 3 branches halve "
                       r"its height and width 2 time\(s\), so both must be multiples of 4; "
                       r"pad or crop it to multiples of 4 \(e.g. 8×8\), or use fewer"):
        cell.zero_state(jnp.ones((2, 6, 8, 3)))
    with pytest.raises(ValueError, match=r"MultiscaleCell: x is 6×8"):
        banax.DEQ(cell, solver=_solver())(jnp.ones((2, 6, 8, 3)))


@without_annotation_checks()
def test_a_channel_count_the_group_norms_cannot_divide():
    with pytest.raises(ValueError, match=r"MultiscaleCell: groups=4 does not divide "
                       r"channels\[1\]=6.*groups=3"):
        nn.MultiscaleCell((8, 6), 3, groups=4, key=jax.random.key(0))
    with pytest.raises(TypeError, match="MultiscaleCell: channels must be a tuple of ints"):
        nn.MultiscaleCell(8, 3, groups=4, key=jax.random.key(0))


def test_a_state_or_input_that_does_not_fit():
    cell = _cell()
    x = jnp.ones((2, 8, 8, 3), F64)
    with pytest.raises(ValueError, match=r"z must be a tuple of 2 maps of shapes "
                       r"\(\(2, 8, 8, 4\), \(2, 4, 4, 8\)\).*zero_state"):
        cell((jnp.ones((2, 8, 8, 4)),), x)
    with pytest.raises(ValueError, match=r"x must be \(H, W, 3\) or \(N, H, W, 3\)"):
        cell(cell.zero_state(x), jnp.ones((2, 8, 8, 5)))


@without_annotation_checks()
def test_wrong_rank_in_batch_mode_is_refused():
    """A single image given to a batch-mode layer would be solved as a batch of rows."""
    deq = banax.DEQ(_cell(), solver=_solver())
    with pytest.raises(ValueError, match=r"MultiscaleCell: in batch mode \(batch_axis=0\) "
                       r"x must be \(N, H, W, C=3\); got x of shape "
                       r"\(8, 8, 3\)"):
        deq(jnp.ones((8, 8, 3), F64))
