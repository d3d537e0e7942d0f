"""Training-step time and compile time of the charlm DEQ-Transformer against the
weight-tied unrolled network with the same cell applications (and the explicit one),
and, with `--weights`, the Jacobian penalty's weight against solver steps and accuracy.

    uv run python benchmarks/zoo_transformer.py [--rounds 20] [--batch 16] [--width 64]
        [--demo "--adjoint jfb"]
    uv run python benchmarks/zoo_transformer.py --weights 0,0.5,2 [--epochs 10]

The models are `banax demo --task charlm`'s (`banax.cli._charlm.build`), with its
default solver settings (Anderson, `rtol=1e-2`, `max_steps=8`; the implicit adjoint's
backward solve Picard with the same budget), or those of the `banax demo` options given
in `--demo`. Each model's training step (`banax.cli._training`'s, the one the demo
runs) is compiled by its first call, timed as "first step"; then the steps are
timed interleaved, one call of each model per round on the same batch, and the table
shows the median and range over the rounds and the ratio to the unrolled model's
median. Timings on a shared machine vary with its load: report the load beside them.

`--weights w1,w2,...` trains the demo's `deq` model once per weight, from the same
initial weights and windows (`banax.cli._charlm.train`'s: `--epochs` of 100 steps,
AdamW on a one-cycle schedule over all of them), with the loss

    cross-entropy + weight · mean over the batch of ‖J‖²_F / d

(`banax.regularization.hutchinson_jacobian_frobenius` at `z*`, one Rademacher probe
per step, batch mode). After every epoch it prints that epoch's means: forward steps,
the share of forward solves stopped at `max_steps`, the forward residual `‖f(z) − z‖`,
backward steps and the share of backward solves that did not converge, the estimate of
`‖J‖²_F / d`, the median ms per step and the validation bits per character; then one
table row per weight. Every weight evaluates the penalty (weight 0 multiplies it by
zero), so the times compare like with like.
"""

import argparse
import os
import shlex
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import banax
from banax.cli import _charlm, _training, demo
from banax.cli._common import build_adjoint
from banax.regularization import hutchinson_jacobian_frobenius


def _penalised_step(optimizer, weight: float):
    """The demo's training step (`banax.cli._training.make_train_step`) with the
    Jacobian penalty added to the loss, returning the forward and backward solves'
    statistics and the penalty's value."""

    @eqx.filter_jit
    def step(model, opt_state, tokens, targets, key):
        def loss_fn(model_and_probe):
            model, probe = model_and_probe
            inject = model.inject(tokens)
            z, sol = model.deq(inject, backward_probe=probe, return_solution=True)
            loss = _training.cross_entropy(_charlm._flat_logits(model.head, z), targets)
            penalty = jnp.mean(hutchinson_jacobian_frobenius(
                model.deq.f_spec(inject), z, key=key, batch_axis=0))
            return loss + weight * penalty, (loss, sol, penalty)

        probe = banax.BackwardStats.probe(batch_size=tokens.shape[0])
        (_, (loss, sol, penalty)), (grads, backward) = eqx.filter_value_and_grad(
            loss_fn, has_aux=True)((model, probe))
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        failed = banax.step_failed(sol, loss, grads)
        model, opt_state = banax.skip_if(
            failed, (eqx.apply_updates(model, updates), new_opt_state), (model, opt_state))
        unconverged = (sol.result != banax.Result.CONVERGED).astype(jnp.float32)
        b_unconverged = (backward.result_codes() != banax.Result.CONVERGED)
        metrics = jnp.stack([
            loss.astype(jnp.float32) / jnp.log(2.0).astype(jnp.float32),
            jnp.mean(sol.stats.steps.astype(jnp.float32)), jnp.mean(unconverged),
            jnp.mean(sol.stats.abs_err.astype(jnp.float32)),
            jnp.mean(backward.steps).astype(jnp.float32),
            jnp.mean(b_unconverged.astype(jnp.float32)),
            penalty.astype(jnp.float32), failed.astype(jnp.float32),
        ])
        return model, opt_state, metrics

    return step


_COLUMNS = ("bits", "f_steps", "f_cap", "f_residual", "b_steps", "b_unconv", "penalty",
            "skipped")


def _train_penalised(weight: float, adjoint, corpus, options) -> list[dict[str, float]]:
    """One run of the study; the per-epoch records."""
    model = _charlm.build("deq", adjoint, len(corpus.alphabet), options.width,
                          key=jax.random.key(options.seed))
    optimizer = _training.optimizer(options.epochs * _charlm.STEPS_PER_EPOCH)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = _penalised_step(optimizer, weight)
    rng = np.random.default_rng(options.seed)  # the demo's window order
    key = jax.random.key(options.seed + 1)
    history = []
    for epoch in range(1, options.epochs + 1):
        metrics, times = [], []
        for _ in range(_charlm.STEPS_PER_EPOCH):
            tokens, targets = _charlm.windows(corpus.train, rng.integers(
                0, len(corpus.train) - _charlm.LENGTH - 1, options.batch))
            key, sub = jax.random.split(key)
            start = time.perf_counter()
            model, opt_state, m = step(model, opt_state, jnp.asarray(tokens),
                                       jnp.asarray(targets), sub)
            metrics.append(jax.device_get(m))
            times.append(time.perf_counter() - start)
        record = dict(zip(_COLUMNS, map(float, np.mean(metrics, axis=0)), strict=True))
        record.update(step=epoch * _charlm.STEPS_PER_EPOCH,
                      valid=_charlm.validation_bits(model, corpus.valid),
                      ms=1e3 * float(np.median(times)))
        if epoch == 1:
            record["first_s"] = times[0]
        history.append(record)
        print(f"weight {weight:g} step {record['step']:4d}: loss {record['bits']:.3f} "
              f"forward {record['f_steps']:.1f} steps, {100 * record['f_cap']:.0f} % at "
              f"cap, residual {record['f_residual']:.2f}; backward {record['b_steps']:.1f} "
              f"steps, {100 * record['b_unconv']:.0f} % unconverged; ‖J‖²_F/d "
              f"{record['penalty']:.3f}; {100 * record['skipped']:.0f} % skipped; "
              f"{record['ms']:.0f} ms/step; validation {record['valid']:.3f} bpc",
              flush=True)
    return history


def penalty_study(options, adjoint, corpus) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"penalty study: {options.epochs * _charlm.STEPS_PER_EPOCH} steps, batch "
          f"{options.batch}, width {options.width}, seed {options.seed}; solver "
          f"{adjoint.solver!r}; adjoint {type(adjoint).__name__} {options.demo}; "
          f"{os.cpu_count()} CPUs, load average {load:.1f}", flush=True)
    rows = []
    for weight in (float(w) for w in options.weights.split(",") if w):
        history = _train_penalised(weight, adjoint, corpus, options)
        best = min(history, key=lambda r: r["valid"])
        rows.append(f"| {weight:g} | {history[-1]['valid']:.3f} | {best['valid']:.3f} "
                    f"(step {best['step']}) | {history[-1]['f_steps']:.1f} | "
                    f"{100 * history[-1]['f_cap']:.0f} % | {history[-1]['f_residual']:.1f} "
                    f"| {history[-1]['b_steps']:.1f} | {100 * history[-1]['b_unconv']:.0f} %"
                    f" | {history[-1]['penalty']:.3f} | {history[-1]['ms']:.0f} | "
                    f"{history[0]['first_s']:.1f} |")
    print("| weight | validation bits/char, last | best (step) | forward steps | forward "
          "at cap | forward residual | backward steps | backward unconverged | ‖J‖²_F/d "
          "| ms/step | first step (s) |")
    print("|---" * 11 + "|")
    print("\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--models", default="deq,unrolled,explicit")
    parser.add_argument("--demo", default="", help="banax demo options for the solver "
                        "and adjoint, e.g. \"--adjoint-option b_solver=picard\"")
    parser.add_argument("--weights", default="", help="run the Jacobian-penalty study "
                        "with these weights, e.g. 0,0.5,2, instead of the timing")
    parser.add_argument("--epochs", type=int, default=10,
                        help="the penalty study's epochs of 100 steps")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    args = _charlm.resolve_defaults(demo_parser.parse_args(["--task", "charlm",
                                                            *shlex.split(options.demo)]))
    adjoint = build_adjoint(args)
    corpus = _charlm.load_corpus()
    if options.weights:
        penalty_study(options, adjoint, corpus)
        return
    rng = np.random.default_rng(0)
    tokens, targets = (jnp.asarray(a) for a in _charlm.windows(
        corpus.train, rng.integers(0, len(corpus.train) - _charlm.LENGTH - 1, options.batch)))

    names = options.models.split(",")
    steps, states, first = {}, {}, {}
    for name in names:
        model = _charlm.build(name, adjoint, len(corpus.alphabet), options.width,
                              key=jax.random.key(0))
        optimizer = _training.optimizer(1000)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
        step = _training.make_train_step(optimizer)
        start = time.perf_counter()
        jax.block_until_ready(step(model, opt_state, tokens, targets))
        first[name] = time.perf_counter() - start
        steps[name], states[name] = step, (model, opt_state)

    times = {name: [] for name in names}
    for _ in range(options.rounds):
        for name in names:
            model, opt_state = states[name]
            start = time.perf_counter()
            jax.block_until_ready(steps[name](model, opt_state, tokens, targets))
            times[name].append(time.perf_counter() - start)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"solver {adjoint.solver!r}\nadjoint {type(adjoint).__name__} {options.demo}")
    print(f"batch {options.batch} x {_charlm.LENGTH} characters, width {options.width}, "
          f"{options.rounds} rounds; {os.cpu_count()} CPUs, load average {load:.1f}")
    base = np.median(times["unrolled"]) if "unrolled" in times else float("nan")
    base_first = first.get("unrolled", float("nan"))
    print(f"{'model':10s} {'ms/step median':>14s} {'range':>15s} {'vs unrolled':>11s} "
          f"{'first step s':>12s} {'vs unrolled':>11s}")
    for name in names:
        ms = 1000 * np.asarray(times[name])
        print(f"{name:10s} {np.median(ms):14.0f} {ms.min():7.0f}-{ms.max():<7.0f} "
              f"{np.median(times[name]) / base:10.2f}x {first[name]:12.1f} "
              f"{first[name] / base_first:10.2f}x")


if __name__ == "__main__":
    main()
