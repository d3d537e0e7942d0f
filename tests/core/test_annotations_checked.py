"""With jaxtyping's import hook on banax and its first-party plugins (README's annotation run:
`--jaxtyping-packages=...,annotation_checker.check`, beartype as the checker), a call that
contradicts an annotation raises at the call. Skipped in a run without the hook; they fail if
the hook was installed after banax was imported."""

import jax.numpy as jnp
import jaxtyping
import pytest
from annotation_checker import HOOK_OPTION, without_annotation_checks

from banax.nn import group_norm


@pytest.fixture(autouse=True)
def _only_with_the_hook(request):
    if not request.config.getoption("jaxtyping_packages", None):
        pytest.skip(f"an annotation run: uv run pytest {HOOK_OPTION}")


def test_a_shape_that_contradicts_the_annotation_raises():
    x = jnp.ones((2, 5, 4))
    # `scale: Float[Array, " channels"]` with channels = 4 from `x`; 3 contradicts it.
    with pytest.raises(jaxtyping.TypeCheckError, match="scale"):
        group_norm(x, 2, jnp.ones(3), jnp.zeros(4))


def test_a_dtype_that_contradicts_the_annotation_raises():
    # `x: Float[...]`: an integer array is refused before any arithmetic runs.
    with pytest.raises(jaxtyping.TypeCheckError, match="x"):
        group_norm(jnp.ones((2, 5, 4), dtype=jnp.int32), 2, jnp.ones(4), jnp.zeros(4))


def test_a_matching_call_passes():
    out = group_norm(jnp.ones((2, 5, 4)), 2, jnp.ones(4), jnp.zeros(4))
    assert out.shape == (2, 5, 4)


def test_the_checks_can_be_turned_off_for_a_block_and_come_back():
    x, wrong = jnp.ones((2, 5, 4)), jnp.ones(3)
    with without_annotation_checks():
        # The wrong shape now reaches banax's own arithmetic, whose error JAX raises.
        with pytest.raises(TypeError, match="incompatible shapes for broadcasting") as info:
            group_norm(x, 2, wrong, jnp.zeros(4))
    assert not isinstance(info.value, jaxtyping.TypeCheckError)
    with pytest.raises(jaxtyping.TypeCheckError):
        group_norm(x, 2, wrong, jnp.zeros(4))
