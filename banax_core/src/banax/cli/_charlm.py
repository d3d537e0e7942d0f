"""`banax demo --task charlm`: a character-level DEQ-Transformer language model.

The text is `pydoc_data.topics` (Python's own documentation topics, about 465,000
characters, shipped with every Python; nothing is downloaded); the last 10 % is held
out. Each training step takes random windows of `LENGTH` characters and predicts every
next character. Models (`--model`):

- `deq`: embedding, `banax.DEQ` of one `banax.nn.TransformerCell` (batch mode), linear
  head; the solver's `max_steps` bounds its cell applications. The adjoint is JFB
  unless `--adjoint` names another (an implicit gradient needs a Jacobian penalty to
  stay stable over long runs here); one with a backward solve gets Picard with the
  forward solver's budget unless `--adjoint-option b_solver=...` names one.
- `unrolled`: the same network with the cell applied `max_steps` times from zero and
  backpropagated (`DEQ(pretrain_steps=K)`): weight-tied, the same cell applications.
- `explicit`: `max_steps` untied `TransformerCell` layers of the same width, applied
  once each from zero (a plain transformer with input injection at every layer).
- `all`: the three in turn, then a table.

Each epoch (`STEPS_PER_EPOCH` steps) prints the training loss in bits per character,
the forward solve's mean steps and residual, the backward solve's (from a
`banax.BackwardStats` probe in the compiled step), the time per step and the
validation bits per character; the run ends with `validation bits per character X`.
"""

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int, PRNGKeyArray

from .._deq import DEQ
from .._registry import REGISTRY, UnknownNameError
from .._solution import BackwardStats, Result, Solution, Stats
from ..nn import TransformerCell
from . import _training
from ._common import adjoint_or_complaint, fail, missing_directory, needs_complaint

MODELS = ("deq", "unrolled", "explicit")
LENGTH = 64
"""Characters per training window (and per validation window)."""
STEPS_PER_EPOCH = 100
HEADS = 4
# --epochs, --batch-size and --width when the command line gives none.
_DEFAULTS = {"epochs": 4, "batch_size": 16, "width": 64}
# A loose tolerance and a cap of 8 cell applications: training needs a good z*, not an
# exact one, and the cap is also the baselines' depth.
_SOLVER = {"rtol": 1e-2, "max_steps": 8}
# The backward solve, unless --adjoint-option b_solver=... says otherwise: Picard with
# the same budget compiles in a fraction of Anderson's time (docs/zoo/transformer.md).
_B_SOLVER = {"name": "picard", "batch_axis": 0, **_SOLVER}
# The adjoint, unless --adjoint says otherwise: JFB trained the most accurate DEQ of the
# adjoints measured and never degraded over 1,000 steps (docs/zoo/transformer.md).
_ADJOINT = "jfb"
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The text as int32 character codes, split 90/10, and the alphabet."""

    train: np.ndarray
    valid: np.ndarray
    alphabet: str

    def unigram_bits(self) -> float:
        """The entropy of the training set's character frequencies, in bits: the bits
        per character of a model that ignores context."""
        p = np.bincount(self.train, minlength=len(self.alphabet)) / len(self.train)
        p = p[p > 0]
        return float(-np.sum(p * np.log2(p)))


def load_corpus() -> Corpus:
    """`pydoc_data.topics` in sorted topic order; the last 10 % is the validation set."""
    from pydoc_data.topics import topics

    text = "".join(topics[name] for name in sorted(topics))
    alphabet = "".join(sorted(set(text)))
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    lookup = np.zeros(max(map(ord, alphabet)) + 1, np.int32)
    lookup[[ord(c) for c in alphabet]] = np.arange(len(alphabet), dtype=np.int32)
    codes = lookup[codes]
    split = int(0.9 * len(codes))
    return Corpus(codes[:split], codes[split:], alphabet)


def _flat_logits(head: eqx.nn.Linear, z: Array) -> Array:
    """`(N, length, dim)` states → `(N · length, vocab)` logits, the loss's layout."""
    flat = z.reshape(-1, z.shape[-1])
    logits = flat @ head.weight.T
    if head.bias is None:
        return logits
    return logits + jnp.broadcast_to(head.bias, logits.shape)


class DEQLanguageModel(eqx.Module):
    """Embedding → `DEQ(TransformerCell)` → linear head, on `(N, length)` characters.

    `pretrain_steps=K` on the DEQ makes it the weight-tied unrolled network of `K`
    cell applications, with the same parameters.
    """

    embed: eqx.nn.Embedding
    deq: DEQ
    head: eqx.nn.Linear

    def __init__(self, adjoint: Any, vocab: int, width: int, *,
                 unrolled: int | None = None, key: PRNGKeyArray):
        k_embed, k_cell, k_head = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, width, key=k_embed, dtype=jnp.float32)
        cell = TransformerCell(width, HEADS, 2 * width, LENGTH, key=k_cell,
                               dtype=jnp.float32)
        self.deq = DEQ(cell, adjoint=adjoint, pretrain_steps=unrolled)
        self.head = eqx.nn.Linear(width, vocab, key=k_head, dtype=jnp.float32)

    def inject(self, tokens: Int[Array, "n length"]) -> Array:
        return self.embed.weight[tokens]

    def __call__(self, tokens: Int[Array, "n length"],
                 backward_probe: BackwardStats | None = None) -> tuple[Array, Solution]:
        z, solution = self.deq(self.inject(tokens), backward_probe=backward_probe,
                               return_solution=True)
        return _flat_logits(self.head, z), solution


class ExplicitLanguageModel(eqx.Module):
    """Embedding → `layers` untied `TransformerCell`s from a zero state → linear head.

    Returns a `Solution` whose `steps` are the layers applied (there is no solve: zero
    residuals), so that it trains through the same step as the DEQ.
    """

    embed: eqx.nn.Embedding
    layers: tuple[TransformerCell, ...]
    head: eqx.nn.Linear

    def __init__(self, vocab: int, width: int, layers: int, *, key: PRNGKeyArray):
        k_embed, k_head, *k_layers = jax.random.split(key, 2 + layers)
        self.embed = eqx.nn.Embedding(vocab, width, key=k_embed, dtype=jnp.float32)
        self.layers = tuple(TransformerCell(width, HEADS, 2 * width, LENGTH, key=k,
                                            dtype=jnp.float32) for k in k_layers)
        self.head = eqx.nn.Linear(width, vocab, key=k_head, dtype=jnp.float32)

    def __call__(self, tokens: Int[Array, "n length"],
                 backward_probe: BackwardStats | None = None) -> tuple[Array, Solution]:
        x = self.embed.weight[tokens]
        z = self.layers[0].zero_state(x)
        for layer in self.layers:
            z = layer(z, x)
        n = tokens.shape[0]
        zero = jnp.zeros((n,), jnp.float32)
        stats = Stats(steps=jnp.full((n,), len(self.layers), jnp.int32), abs_err=zero,
                      rel_err=zero)
        solution = Solution(value=z, result=jnp.full((n,), Result.CONVERGED, jnp.int32),
                            stats=stats, trace=None)
        return _flat_logits(self.head, z), solution


def build(name: str, adjoint: Any, vocab: int, width: int, *, key: PRNGKeyArray) -> Any:
    """The model `name` (`deq`, `unrolled` or `explicit`) of `width` features."""
    depth = adjoint.solver.max_steps
    if name == "explicit":
        return ExplicitLanguageModel(vocab, width, depth, key=key)
    return DEQLanguageModel(adjoint, vocab, width,
                            unrolled=depth if name == "unrolled" else None, key=key)


def windows(codes: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs `codes[s : s + LENGTH]` and next-character targets, flattened."""
    idx = starts[:, None] + np.arange(LENGTH)[None, :]
    return codes[idx], codes[idx + 1].reshape(-1)


@eqx.filter_jit
def _window_bits(model: Any, tokens: Array, targets: Array) -> Array:
    logits, _ = model(tokens)
    return _training.cross_entropy(logits, targets) * tokens.size / _LN2


def validation_bits(model: Any, codes: np.ndarray, batch: int = 128) -> float:
    """Bits per character on `codes`, in consecutive windows of `LENGTH` characters
    (dropout off), `batch` windows at a time."""
    model = eqx.nn.inference_mode(model)
    starts = np.arange(0, len(codes) - LENGTH - 1, LENGTH)
    total = 0.0
    for i in range(0, len(starts), batch):
        tokens, targets = windows(codes, starts[i:i + batch])
        total += float(_window_bits(model, jnp.asarray(tokens), jnp.asarray(targets)))
    return total / (len(starts) * LENGTH)


@dataclasses.dataclass(frozen=True)
class Epoch:
    """One epoch's means over its steps (the loss in bits per character), the
    validation bits per character after it, the median seconds per step, and the
    share of steps whose update was skipped because the step failed."""

    epoch: int
    bits: float
    f_steps: float
    f_residual: float
    b_steps: float
    b_residual: float
    b_failed: float
    valid_bits: float
    step_s: float
    skipped: float = 0.0


@dataclasses.dataclass(frozen=True)
class Run:
    """A trained model's record: epochs, the first step's seconds (mostly compile
    time) and the parameter count."""

    name: str
    history: list[Epoch]
    first_step_s: float
    parameters: int


def train(model: Any, corpus: Corpus, *, epochs: int, batch: int, seed: int = 0,
          steps_per_epoch: int | None = None, peak_lr: float = 3e-3,
          on_step: Callable[[], object] = lambda: None,
          on_epoch: Callable[[Epoch], None] = lambda e: None) -> tuple[Any, Run]:
    """Train on random windows of the training text (`STEPS_PER_EPOCH` batches an epoch
    unless told); returns the model and its record."""
    steps_per_epoch = steps_per_epoch or STEPS_PER_EPOCH
    steps = epochs * steps_per_epoch
    optimizer = _training.optimizer(steps, peak_lr)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = _training.make_train_step(optimizer)
    rng = np.random.default_rng(seed)
    history: list[Epoch] = []
    first = math.nan  # the first step's time (with its compilation), set in epoch 1
    for epoch in range(1, epochs + 1):
        totals: dict[str, float] = {}
        times = []
        for _ in range(steps_per_epoch):
            tokens, targets = windows(corpus.train,
                                      rng.integers(0, len(corpus.train) - LENGTH - 1, batch))
            start = time.perf_counter()
            model, opt_state, metrics = step(model, opt_state, jnp.asarray(tokens),
                                             jnp.asarray(targets))
            metrics = jax.device_get(metrics)
            times.append(time.perf_counter() - start)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            on_step()
        if epoch == 1:
            first = times[0]
        means = {k: v / steps_per_epoch for k, v in totals.items()}
        record = Epoch(epoch, bits=means.pop("loss") / _LN2, **means,
                       valid_bits=validation_bits(model, corpus.valid),
                       step_s=float(np.median(times)))
        history.append(record)
        on_epoch(record)
    parameters = sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array)))
    return model, Run(type(model).__name__, history, first, int(parameters))


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """`args` with charlm's defaults filled in where the command line gave none."""
    filled = {k: v if getattr(args, k) is None else getattr(args, k)
              for k, v in _DEFAULTS.items()}
    # charlm's solver defaults come first on the command line so that --solver-option wins.
    options = [*_SOLVER.items(), *args.solver_option]
    adjoint = args.adjoint or _ADJOINT
    try:
        takes = {f.name for f in dataclasses.fields(REGISTRY.resolve("adjoint", adjoint))}
    except UnknownNameError:
        takes = set()  # reported by the adjoint builder
    adjoint_options = list(args.adjoint_option)
    if "b_solver" in takes and "b_solver" not in dict(adjoint_options):
        adjoint_options.insert(0, ("b_solver", _B_SOLVER))
    return argparse.Namespace(**{**vars(args), **filled, "solver_option": options,
                                 "adjoint": adjoint, "adjoint_option": adjoint_options,
                                 "model": args.model or "deq"})


def run(args: argparse.Namespace) -> int:
    """Run `banax demo --task charlm`; returns the process exit code."""
    args = resolve_defaults(args)
    if args.model not in (*MODELS, "all"):
        return fail(f"--model for --task charlm must be one of {', '.join(MODELS)} or "
                    f"all, got {args.model!r}")
    complaint = needs_complaint(args.plot)
    if complaint is not None:
        return complaint
    for name in ("epochs", "batch_size", "width"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.width % HEADS:
        return fail(f"--width for --task charlm is the transformer's width, split over "
                    f"{HEADS} heads, so it must be a multiple of {HEADS}; got {args.width}")
    problem = missing_directory("--plot", args.plot)
    if problem:
        return fail(problem)
    adjoint = adjoint_or_complaint(args)
    if isinstance(adjoint, int):
        return adjoint
    return _train_all(args, adjoint)


def _train_all(args: argparse.Namespace, adjoint: Any) -> int:
    from tqdm import tqdm

    corpus = load_corpus()
    unigram = corpus.unigram_bits()
    depth = adjoint.solver.max_steps
    b_solver = getattr(adjoint, "b_solver", None)
    print(f"charlm: pydoc_data.topics, {len(corpus.train):,} training and "
          f"{len(corpus.valid):,} validation characters, {len(corpus.alphabet)} symbols "
          f"(unigram entropy {unigram:.2f} bits); windows of {LENGTH}, width {args.width}, "
          f"{HEADS} heads; solver {type(adjoint.solver).__name__} (max_steps {depth}), "
          f"adjoint {type(adjoint).__name__}"
          + (f" (backward {type(b_solver).__name__})" if b_solver is not None else ""))
    names = MODELS if args.model == "all" else (args.model,)
    runs = []
    for name in names:
        model = build(name, adjoint, len(corpus.alphabet), args.width,
                      key=jax.random.key(args.seed))
        bar = tqdm(total=args.epochs * STEPS_PER_EPOCH, unit="step", desc=name,
                   file=sys.stderr)

        def report(e: Epoch, name: str = name, bar: Any = bar) -> None:
            solve = (f"forward steps {e.f_steps:4.1f} residual {e.f_residual:.2e}  "
                     f"backward steps {e.b_steps:4.1f} residual {e.b_residual:.2e} "
                     f"unconverged {100 * e.b_failed:3.0f}%" if name == "deq" else
                     f"cell applications {e.f_steps:2.0f}")
            bar.write(f"{name} epoch {e.epoch:2d}/{args.epochs}  loss {e.bits:.3f} bpc  "
                      f"{solve}  {1000 * e.step_s:.0f} ms/step  validation {e.valid_bits:.3f}"
                      " bpc", file=sys.stdout)

        started, started_cpu = time.perf_counter(), time.process_time()
        model, record = train(model, corpus, epochs=args.epochs, batch=args.batch_size,
                              seed=args.seed, on_step=bar.update, on_epoch=report)
        bar.close()
        record = dataclasses.replace(record, name=name)
        runs.append(record)
        print(f"{name}: validation bits per character {record.history[-1].valid_bits:.3f} "
              f"(unigram {unigram:.2f}); {record.parameters:,} parameters; first step "
              f"{record.first_step_s:.1f} s (compilation), then "
              f"{1000 * record.history[-1].step_s:.0f} ms/step; "
              f"{time.perf_counter() - started:.1f} s wall, "
              f"{time.process_time() - started_cpu:.1f} s CPU")
    if len(runs) > 1:
        _table(runs)
    if args.plot:
        _plot(runs, unigram, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _table(runs: list[Run]) -> None:
    base = {r.name: r for r in runs}.get("unrolled")
    print(f"{'model':10s} {'valid bpc':>9s} {'params':>8s} {'ms/step':>8s} "
          f"{'vs unrolled':>11s} {'first step s':>12s}")
    for r in runs:
        ratio = r.history[-1].step_s / base.history[-1].step_s if base else float("nan")
        print(f"{r.name:10s} {r.history[-1].valid_bits:9.3f} {r.parameters:8,d} "
              f"{1000 * r.history[-1].step_s:8.0f} {ratio:10.2f}x {r.first_step_s:12.1f}")


def _plot(runs: list[Run], unigram: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        ax.plot([e.epoch * STEPS_PER_EPOCH for e in r.history],
                [e.valid_bits for e in r.history], marker="o", label=r.name)
    ax.axhline(unigram, color="grey", linestyle="--", label="unigram entropy")
    ax.set_xlabel("training steps")
    ax.set_ylabel("validation bits per character")
    ax.set_title("character-level language model on pydoc_data.topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
