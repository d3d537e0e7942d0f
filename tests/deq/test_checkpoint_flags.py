"""What a `banax.DEQ` checkpoint holds besides parameters: its `inference` flag (and an
int `pretrain_steps`), restored from the file whatever the model loaded into says, as
docs/compatibility.md states."""

import io

import equinox as eqx
import jax.numpy as jnp

import banax


def _round_trip(saved, like):
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, saved)
    buffer.seek(0)
    return eqx.tree_deserialise_leaves(buffer, like)


def _deq(pretrain_steps=None):
    return banax.DEQ(lambda z, x: 0.5 * jnp.tanh(z + x), solver="picard",
                     state_shape=(8,), pretrain_steps=pretrain_steps)


def test_the_inference_flag_comes_from_the_checkpoint():
    deq = _deq()
    loaded = _round_trip(eqx.nn.inference_mode(deq), deq)
    assert loaded.inference is True          # written in inference mode, loads so
    assert eqx.nn.inference_mode(loaded, False).inference is False  # the documented fix
    assert _round_trip(deq, eqx.nn.inference_mode(deq)).inference is False


def test_an_int_pretrain_steps_comes_from_the_checkpoint():
    assert _round_trip(_deq(5), _deq(3)).pretrain_steps == 5
    # None holds no leaf: a model built without pre-training loads without it.
    assert _round_trip(_deq(5), _deq()).pretrain_steps is None
