"""`banax demo --task charlm`: the corpus, the three models, a short training run that
lowers the loss, and the command line's errors."""

import collections
import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import banax
from banax.cli import _charlm, main


@pytest.fixture
def optax_promotion():
    """optax's Adam mixes a Python float with an int32 step count, which the suite's
    strict dtype promotion rejects; banax's own code runs strict either way."""
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def corpus():
    return _charlm.load_corpus()


def _adjoint(max_steps=4):
    solver = {"name": "anderson", "batch_axis": 0, "rtol": 1e-2, "max_steps": max_steps}
    return banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                             on_failure="ignore")


def test_corpus_is_the_topics_text_split_90_10(corpus):
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    decoded = "".join(corpus.alphabet[i] for i in np.concatenate([corpus.train,
                                                                  corpus.valid]))
    assert decoded == text
    assert len(corpus.train) == int(0.9 * len(text))
    counts = collections.Counter(text[:len(corpus.train)])
    p = np.array(list(counts.values())) / len(corpus.train)
    assert corpus.unigram_bits() == pytest.approx(-np.sum(p * np.log2(p)), rel=1e-12)
    tokens, targets = _charlm.windows(corpus.train, np.array([0, 100]))
    assert tokens.shape == (2, _charlm.LENGTH)
    np.testing.assert_array_equal(targets.reshape(2, -1)[:, :-1], tokens[:, 1:])


def test_the_baselines_have_the_deq_s_width_and_cell_applications():
    adjoint = _adjoint(max_steps=3)
    key = jax.random.key(0)
    deq = _charlm.build("deq", adjoint, 10, 8, key=key)
    unrolled = _charlm.build("unrolled", adjoint, 10, 8, key=key)
    explicit = _charlm.build("explicit", adjoint, 10, 8, key=key)
    assert deq.deq.pretrain_steps is None and unrolled.deq.pretrain_steps == 3
    # Weight-tied: the unrolled model is the DEQ's very parameters.
    assert eqx.tree_equal(eqx.filter(deq, eqx.is_array), eqx.filter(unrolled, eqx.is_array))
    assert len(explicit.layers) == 3
    count = lambda t: sum(a.size for a in jax.tree.leaves(eqx.filter(t, eqx.is_array)))  # noqa: E731
    assert count(explicit) - count(explicit.layers) == count(deq) - count(deq.deq.cell)
    assert count(explicit.layers) == 3 * count(deq.deq.cell)
    tokens = jnp.zeros((2, 6), jnp.int32)  # windows shorter than LENGTH work too
    for model in (deq, unrolled, explicit):
        logits, solution = eqx.filter_jit(lambda m, t: m(t))(model, tokens)
        assert logits.shape == (2 * 6, 10)
        assert solution.stats.steps.shape == (2,)


def test_short_training_lowers_the_validation_bits(corpus, optax_promotion):
    small = dataclasses.replace(corpus, valid=corpus.valid[:1000])
    model = _charlm.build("deq", _adjoint(), len(corpus.alphabet), 8, key=jax.random.key(0))
    before = _charlm.validation_bits(model, small.valid)
    model, run = _charlm.train(model, small, epochs=2, batch=4, steps_per_epoch=15,
                               peak_lr=1e-2)
    assert [e.epoch for e in run.history] == [1, 2]
    assert run.history[-1].valid_bits < before - 0.3, (before, run.history)
    for e in run.history:
        assert 1 <= e.f_steps <= 4 and 0 <= e.b_steps <= 4 and 0 <= e.b_failed <= 1
        assert e.step_s > 0
    assert run.first_step_s > run.history[-1].step_s  # the first one compiles


@pytest.mark.slow
def test_the_demo_trains_every_model_and_reports(capsys, tmp_path, monkeypatch,
                                                  optax_promotion):
    monkeypatch.setattr(_charlm, "STEPS_PER_EPOCH", 3)
    plot = tmp_path / "charlm.png"
    assert main(["demo", "--task", "charlm", "--model", "all", "--epochs", "1",
                 "--width", "8", "--batch-size", "2", "--solver-option", "max_steps=2",
                 "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for name in _charlm.MODELS:
        assert f"{name}: validation bits per character" in out
    assert "max_steps 2" in out and "vs unrolled" in out
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, words", [
    (("--model", "lstm"), "--model for --task charlm must be one of deq, unrolled, "
                          "explicit or all, got 'lstm'"),
    (("--width", "6"), "multiple of 4; got 6"),
    (("--epochs", "0"), "--epochs must be >= 1, got 0"),
    (("--solver", "nonesuch"), "nonesuch"),
    (("--plot", "no_such_dir/x.png"), "--plot no_such_dir/x.png: the directory"),
])
def test_bad_input_is_one_line_before_any_work(capsys, args, words):
    assert main(["demo", "--task", "charlm", *args]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_the_default_adjoint_is_jfb_for_charlm_and_implicit_elsewhere():
    from banax.adjoint import JFB, Implicit
    from banax.cli import build_parser, demo
    from banax.cli._common import build_adjoint

    parser = build_parser()
    charlm = _charlm.resolve_defaults(parser.parse_args(["demo", "--task", "charlm"]))
    assert isinstance(build_adjoint(charlm), JFB)
    chosen = _charlm.resolve_defaults(parser.parse_args(
        ["demo", "--task", "charlm", "--adjoint", "implicit"]))
    adjoint = build_adjoint(chosen)
    assert isinstance(adjoint, Implicit)
    assert type(adjoint.b_solver).__name__ == "Picard"  # charlm's backward default
    classify = demo.resolve_defaults(parser.parse_args(["demo"]))
    assert isinstance(build_adjoint(classify), Implicit)
