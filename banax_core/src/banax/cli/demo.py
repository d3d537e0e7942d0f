"""Train a small DEQ classifier on scikit-learn's bundled 8×8 digits (no download).

The model embeds each image, finds the equilibrium `z* = tanh(W z* + u)` of a
contractive cell with a `banax.DEQ`, and reads the class off `z*` with a linear head.
Each epoch prints the training loss and the solver's mean steps and residual; the
run ends with the accuracy on a held-out 20 % of the data.
"""

import argparse
import ast
import dataclasses
import importlib
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from .._deq import DEQ
from .._registry import REGISTRY, UnknownNameError, get_adjoint
from ..utils import trace_history

_EXTRA = "pip install 'banax[demo]'"
# What the demo imports beyond banax: import name -> distribution name.
_NEEDS = {"optax": "optax", "sklearn": "scikit-learn", "tqdm": "tqdm"}
_PLOT_NEEDS = {"matplotlib": "matplotlib"}


def _option(text: str) -> tuple[str, Any]:
    """`KEY=VALUE`, the value read as a Python literal (a bare word stays a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to `parser`."""
    parser.add_argument("--solver", default="anderson",
                        help="registered solver name (default: anderson)")
    parser.add_argument("--solver-option", type=_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="solver option, value as a Python literal (repeatable), "
                             "e.g. --solver-option depth=4")
    parser.add_argument("--adjoint", default="implicit",
                        help="registered adjoint name (default: implicit)")
    parser.add_argument("--adjoint-option", type=_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="adjoint option (repeatable), e.g. --adjoint-option "
                             "b_solver=\"{'name': 'picard', 'rtol': 1e-6}\"")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default: 20)")
    parser.add_argument("--batch-size", type=int, default=64, help="default: 64")
    parser.add_argument("--width", type=int, default=64, help="state size (default: 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--plot", metavar="FILE",
                        help="write a PNG of the residual against iteration on the test set")


class Cell(eqx.Module):
    """`z ↦ tanh(W̃ z + u)` with `W̃ = W · min(1, γ / ‖W‖_F)`.

    `‖W̃‖₂ ≤ ‖W̃‖_F ≤ γ < 1` and tanh is 1-Lipschitz, so the cell is a contraction in
    `z` for every value of `W`, and the solve converges throughout training.
    """

    weight: Float[Array, "width width"]
    gamma: float = eqx.field(static=True, default=0.9)

    def __call__(self, z: Float[Array, "batch width"], u: Float[Array, "batch width"]):
        norm = jnp.sqrt(jnp.sum(self.weight**2))
        weight = self.weight * jnp.minimum(1.0, self.gamma / norm)
        return jnp.tanh(z @ weight.T + u)


class Classifier(eqx.Module):
    """Embedding, DEQ, linear head."""

    embed: eqx.nn.Linear
    deq: DEQ
    head: eqx.nn.Linear

    def __init__(self, adjoint: Any, width: int, *, key: PRNGKeyArray):
        k_embed, k_cell, k_head = jax.random.split(key, 3)
        # float32 whatever jax_enable_x64 says: the demo reports float32 numbers.
        self.embed = eqx.nn.Linear(64, width, key=k_embed, dtype=jnp.float32)
        weight = jax.random.normal(k_cell, (width, width), jnp.float32) * 0.5 / width**0.5
        self.deq = DEQ(Cell(weight), adjoint=adjoint, state_shape=(width,))
        self.head = eqx.nn.Linear(width, 10, key=k_head, dtype=jnp.float32)

    def __call__(self, images: Float[Array, "batch 64"], **deq_options: Any):
        z, solution = self.deq(jax.vmap(self.embed)(images), return_solution=True,
                               **deq_options)
        return jax.vmap(self.head)(z), solution


def _cross_entropy(logits: Array, labels: Int[Array, " batch"]) -> Array:
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=1))


def _missing(needs: dict[str, str]) -> list[str]:
    missing = []
    for module, distribution in needs.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(distribution)
    return missing


def _fail(message: str) -> int:
    print(f"banax demo: {message}", file=sys.stderr)
    return 2


def _build_adjoint(args: argparse.Namespace) -> Any:
    """The adjoint named on the command line, around the named solver in batch mode.

    An adjoint with a backward solver (`b_solver`, e.g. `implicit`) that is not given
    one with `--adjoint-option b_solver=...` gets the forward solver's settings.
    """
    solver = {"name": args.solver, "batch_axis": 0, **dict(args.solver_option)}
    options = dict(args.adjoint_option)
    takes = {f.name for f in dataclasses.fields(REGISTRY.resolve("adjoint", args.adjoint))}
    if "b_solver" in takes and "b_solver" not in options:
        options["b_solver"] = dict(solver)
    return get_adjoint(args.adjoint, solver=solver, **options)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    missing = _missing(_NEEDS | (_PLOT_NEEDS if args.plot else {}))
    if missing:
        return _fail(f"needs {', '.join(missing)}: {_EXTRA}")
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        adjoint = _build_adjoint(args)
    except UnknownNameError as error:
        return _fail(str(error))
    except (TypeError, ValueError) as error:
        return _fail(f"cannot build --solver {args.solver} / --adjoint {args.adjoint}: {error}")
    return _train(args, adjoint)


def _train(args: argparse.Namespace, adjoint: Any) -> int:
    import numpy as np
    import optax
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm

    started = time.perf_counter()
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=args.seed, stratify=labels
    )
    # Standardise each pixel with the training set's statistics (some are always 0).
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1.0
    x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
    batch = min(args.batch_size, len(x_train))
    steps_per_epoch = len(x_train) // batch  # full batches only: one compilation

    model = Classifier(adjoint, args.width, key=jax.random.key(args.seed))
    optimizer = optax.adam(3e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(model, opt_state, x, y):
        def loss_fn(model):
            logits, solution = model(x)
            return _cross_entropy(logits, y), solution.stats

        (loss, stats), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optimizer.update(grads, opt_state)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, loss, jnp.mean(stats.steps), jnp.mean(stats.abs_err)

    print(f"digits: {len(x_train)} training and {len(x_test)} test images; solver "
          f"{type(adjoint.solver).__name__}, adjoint {type(adjoint).__name__}")
    rng = np.random.default_rng(args.seed)
    bar = tqdm(total=args.epochs * steps_per_epoch, unit="step", desc="training",
               file=sys.stderr)
    for epoch in range(1, args.epochs + 1):
        order = rng.permutation(len(x_train))
        totals = np.zeros(3)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            model, opt_state, *metrics = train_step(
                model, opt_state, jnp.asarray(x_train[idx], jnp.float32), jnp.asarray(y_train[idx])
            )
            totals += np.asarray(metrics, dtype=np.float64)
            bar.update()
        loss, steps, residual = totals / steps_per_epoch
        bar.write(f"epoch {epoch:3d}/{args.epochs}  loss {loss:.4f}  "
                  f"solver steps {steps:5.1f}  residual {residual:.2e}", file=sys.stdout)
    bar.close()

    logits, _ = eqx.filter_jit(lambda m, x: m(x))(model, jnp.asarray(x_test, jnp.float32))
    correct = int(jnp.sum(jnp.argmax(logits, axis=1) == jnp.asarray(y_test)))
    print(f"test accuracy {100 * correct / len(y_test):.1f}% ({correct}/{len(y_test)})"
          f" in {time.perf_counter() - started:.1f} s")
    if args.plot:
        _plot(model, jnp.asarray(x_test, jnp.float32), args.plot)
        print(f"wrote {args.plot}")
    return 0


def _plot(model: Classifier, images: Array, path: str) -> None:
    """Plot the residual against the number of cell evaluations on `images`.

    Each image is solved on its own (the solver without its batch axis, mapped with
    `jax.vmap`), so that its trace holds only its own evaluations: in batch mode the
    cell also runs on samples that have already converged, whose proposals the loop
    discards.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    solver = model.deq.solver
    single = eqx.tree_at(
        lambda deq: deq.adjoint.solver, model.deq, dataclasses.replace(solver, batch_axis=None)
    )
    # Line-search solvers evaluate the cell more than once per step.
    trace = trace_history(
        lambda z, fz, aux: jnp.linalg.norm(fz - z), n_evals=2 * solver.max_steps + 1
    )

    @eqx.filter_jit
    def traces(single, embed, images):
        solve = lambda u: single(u, trace=trace, return_solution=True)[1].trace
        return jax.vmap(solve)(jax.vmap(embed)(images))

    counts, history = (np.asarray(a) for a in traces(single, model.embed, images))
    n = min(int(counts.max()), history.shape[1])
    # After its last evaluation an image keeps its final residual.
    last = np.minimum(counts, n) - 1
    evals = np.arange(n)
    history = history[np.arange(len(counts))[:, None], np.minimum(evals, last[:, None])]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(evals, np.median(history, axis=0), label="median over test images")
    ax.semilogy(evals, np.max(history, axis=0), label="worst test image")
    ax.set_xlabel("evaluations of the cell")
    ax.set_ylabel("residual ‖f(z) − z‖")
    ax.set_title(f"{type(solver).__name__} on the digits DEQ ({len(counts)} test images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
