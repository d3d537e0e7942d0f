"""`banax.extend.calls_custom_vjp`: whether a jaxpr calls a `jax.custom_vjp`, however
deeply nested, read before any derivative is lowered."""

import jax
import jax.numpy as jnp
import pytest

from banax.extend import calls_custom_vjp


@jax.custom_vjp
def _double(x):
    return 2 * x


_double.defvjp(lambda x: (2 * x, None), lambda _, g: (2 * g,))


def _in_scan(x):
    return jax.lax.scan(lambda c, _: (_double(c), None), x, None, length=2)[0]


def _in_cond(x):
    return jax.lax.cond(x.sum() > 0, _double, jnp.sin, x)


@pytest.mark.parametrize("f, expected", [
    (_double, True),
    (jax.jit(lambda x: jnp.tanh(_double(x))), True),
    (_in_scan, True),
    (_in_cond, True),
    (jnp.sin, False),
    (jax.jit(lambda x: jax.lax.scan(lambda c, _: (jnp.tanh(c), None), x, None,
                                    length=2)[0]), False),
])
def test_detects_a_custom_vjp_at_any_depth(f, expected):
    z = jnp.ones(3)
    closed = jax.make_jaxpr(f)(z)
    assert calls_custom_vjp(closed.jaxpr) is expected
    assert calls_custom_vjp(closed) is expected
    # The truth it stands for: forward mode fails exactly when a custom_vjp is called.
    if expected:
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(f, (z,), (z,))
    else:
        jax.jvp(f, (z,), (z,))
