"""The Jacobian penalty's weight on an MNIST DEQ: its effect on solver steps and accuracy.

Trains a model of `banax demo --data mnist` (`--model conv`: strided stem,
`banax.nn.ConvCell` at 7×7, linear head; `--model multiscale`: `banax.nn.MultiscaleCell`
at 14×14 and 7×7, `banax.nn.MultiscaleHead`; Anderson in batch mode, rtol 1e-3, at most
20 steps, the implicit adjoint with the same Anderson settings backwards) with the loss

    cross-entropy + weight · mean over the batch of ‖J‖²_F / d

(`banax.regularization.hutchinson_jacobian_frobenius`, one Rademacher probe per step,
at `z*`), once per `--weights`, from the same initial weights and data order, and
prints one row per weight (and one for the same cell unrolled `--unrolled` times,
backpropagated, without penalty): forward steps and the share of forward solves that stopped
at `max_steps` (training, last epoch), backward steps and the share of backward solves
that did not converge, the same forward figures on the test set, test accuracy, the
last epoch's median ms per training step and the first step's time (compilation).
Every row evaluates the penalty, at weight 0 (and unrolled) multiplied by zero, so the
times compare like with like.

    uv run python benchmarks/jacobian_weight.py                       # weights 0, 0.1, 0.5
    uv run python benchmarks/jacobian_weight.py --n-train 4000 --epochs 5   # the demo's size
    uv run python benchmarks/jacobian_weight.py --model multiscale --n-train 4000 \
        --epochs 5 --weights 0,0.5,2 --unrolled 12
"""

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import banax
from banax.cli import _mnist, _training
from banax.regularization import hutchinson_jacobian_frobenius


def _make_step(optimizer, weight: float):
    @eqx.filter_jit
    def step(model, opt_state, x, y, key):
        def loss_fn(model_and_probe):
            model, probe = model_and_probe
            inject = model.inject(x)
            z, sol = model.deq(inject, backward_probe=probe, return_solution=True)
            logits = model.logits(z)
            loss = _training.cross_entropy(logits, y)
            penalty = hutchinson_jacobian_frobenius(model.deq.f_spec(inject), z, key=key,
                                                    batch_axis=0)
            return loss + weight * jnp.mean(penalty), (sol, jnp.mean(penalty))

        probe = banax.BackwardStats.probe(batch_size=x.shape[0])
        (_, (sol, penalty)), (grads, backward) = eqx.filter_value_and_grad(
            loss_fn, has_aux=True)((model, probe))
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = jnp.stack([
            jnp.mean(sol.stats.steps.astype(jnp.float32)),
            jnp.mean((sol.result != banax.Result.CONVERGED).astype(jnp.float32)),
            jnp.mean(backward.steps),
            jnp.mean((backward.result_codes() != banax.Result.CONVERGED).astype(jnp.float32)),
            penalty.astype(jnp.float32),
        ])
        return eqx.apply_updates(model, updates), opt_state, metrics

    return step


@eqx.filter_jit
def _test_solve(model, images):
    logits, sol = model(images)
    return (jnp.argmax(logits, axis=-1), sol.stats.steps.astype(jnp.float32),
            (sol.result != banax.Result.CONVERGED).astype(jnp.float32))


def run(weight: float, data, args, unrolled: int = 0) -> dict[str, float]:
    solver = banax.get_solver("anderson", batch_axis=0, rtol=1e-3, max_steps=20)
    adjoint = banax.get_adjoint("implicit", solver=solver, b_solver=solver,
                                on_failure="ignore")
    if args.model == "conv":
        model = _mnist.MnistDEQ(adjoint, args.channels, key=jax.random.key(args.seed))
    else:
        model = _mnist.MnistMDEQ(adjoint, key=jax.random.key(args.seed))
    if unrolled:
        # The same model and parameters, the cell applied `unrolled` times from zero
        # and backpropagated: the weight-tied explicit baseline.
        model = eqx.tree_at(lambda m: m.deq.pretrain_steps, model, unrolled,
                            is_leaf=lambda v: v is None)
    per_epoch = len(data.y_train) // args.batch
    optimizer = _training.optimizer(args.epochs * per_epoch)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = _make_step(optimizer, weight)
    rng = np.random.default_rng(args.seed)
    key = jax.random.key(args.seed + 1)
    first_step_s = 0.0
    for epoch in range(args.epochs):
        metrics, times = [], []
        for x, y in _training._batches(data, args.batch, rng, _mnist.shifted):
            key, sub = jax.random.split(key)
            start = time.perf_counter()
            model, opt_state, m = step(model, opt_state, x, y, sub)
            m = jax.block_until_ready(m)
            times.append(time.perf_counter() - start)
            metrics.append(np.asarray(m))
        if epoch == 0:
            first_step_s = times[0]
    last = np.mean(metrics, axis=0)
    classes, steps, unconverged = [], [], []
    for i in range(0, len(data.y_test), 500):
        c, s, u = jax.device_get(_test_solve(model, jnp.asarray(data.x_test[i:i + 500])))
        classes.append(c), steps.append(s), unconverged.append(u)
    return {
        "f_steps": last[0], "f_unconv": last[1], "b_steps": last[2], "b_unconv": last[3],
        "penalty": last[4],
        "test_steps": float(np.mean(np.concatenate(steps))),
        "test_unconv": float(np.mean(np.concatenate(unconverged))),
        "accuracy": float(np.mean(np.concatenate(classes) == data.y_test)),
        "ms_step": 1e3 * float(np.median(times)), "first_s": first_step_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=tuple(_mnist.MODELS), default="conv")
    parser.add_argument("--weights", default="0,0.1,0.5")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--channels", type=int, default=32, help="the conv model's")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unrolled", type=int, default=8,
                        help="also train the cell unrolled this many times (0: not)")
    args = parser.parse_args()
    data = _mnist.load(args.n_train, args.n_test, seed=args.seed)
    size = f"{args.channels} channels" if args.model == "conv" else "channels (16, 20)"
    print(f"--model {args.model}: {args.n_train} training / {args.n_test} test images, {size}, "
          f"{args.epochs} epochs, batch {args.batch}, seed {args.seed}")
    print("| weight | forward steps | forward at max_steps | backward steps | backward "
          "unconverged | ‖J‖²_F/d | test-set steps | test at max_steps | test accuracy "
          "| ms / step | first step (s) |")
    print("|---" * 11 + "|")
    for weight in (float(w) for w in args.weights.split(",") if w):
        r = run(weight, data, args)
        print(f"| {weight:g} | {r['f_steps']:.1f} | {100 * r['f_unconv']:.0f} % | "
              f"{r['b_steps']:.1f} | {100 * r['b_unconv']:.0f} % | {r['penalty']:.3f} | "
              f"{r['test_steps']:.1f} | {100 * r['test_unconv']:.0f} % | "
              f"{100 * r['accuracy']:.1f} % | {r['ms_step']:.0f} | {r['first_s']:.1f} |",
              flush=True)
    if args.unrolled:
        r = run(0.0, data, args, unrolled=args.unrolled)
        print(f"| unrolled ×{args.unrolled}, no penalty | {args.unrolled} applications "
              "| – | – | – | "
              f"– | – | – | {100 * r['accuracy']:.1f} % | {r['ms_step']:.0f} | "
              f"{r['first_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
