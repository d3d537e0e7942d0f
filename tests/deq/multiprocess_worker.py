"""One process of the multi-process training program of docs/multi_device.md.

The program is not copied here: it is read from the page (the block that defines
`make_model` and the block that defines `train_on_hosts`), so the test runs exactly
what readers are told to run. `python multiprocess_worker.py ADDRESS N ID OUT` runs
one training step as process `ID` of `N` and writes the loss, the gradients and the
updated model's arrays to `OUT/process{ID}.npz`. Run by `test_multiprocess.py` with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and `PYTHONPATH=tests`.

It then runs one step of a second layout on the same 8 devices: an `MLPCell` DEQ split
over a (data=2, model=4) mesh, hidden units over the model axis and every parameter
also over the data axis (FSDP on tensor parallelism, gathered once per solve), and
writes it to `OUT/process{ID}_2d.npz`.
"""

import sys
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from banax.parallel import (
    Gathered,
    device_mesh,
    fsdp_specs,
    mlp_cell_specs,
    replicated_specs,
    shard,
    shard_batch,
)
from deq import sharded_layouts as layouts
from docs.run_page import python_blocks

PAGE = Path(__file__).resolve().parents[2] / "docs" / "multi_device.md"
SEED, STEPS = 0, 1


def page_program() -> dict[str, Any]:
    """The namespace of the page's model definitions and multi-process program."""
    blocks = python_blocks(PAGE.read_text(encoding="utf-8"))
    wanted = [next(code for _, code in blocks if f"def {name}(" in code)
              for name in ("make_model", "train_on_hosts")]
    namespace: dict[str, Any] = {"__name__": "multi_device_page"}
    for code in wanted:
        exec(compile(code, str(PAGE), "exec"), namespace)
    return namespace


def arrays(model: Any, loss: Any, grads: Any) -> dict[str, np.ndarray]:
    """The arrays the test compares, as numpy, under stable names."""
    leaves = {"loss": np.asarray(loss)}
    for label, tree in (("grads", grads), ("model", model)):
        for i, leaf in enumerate(jax.tree.leaves(eqx.filter(tree, eqx.is_array))):
            leaves[f"{label}{i}"] = np.asarray(leaf)
    return leaves


def layout_batch() -> tuple[jax.Array, jax.Array]:
    """The global batch of the 2-D step (the same in every process and the test)."""
    kx, ky = jax.random.split(jax.random.key(1))
    return (jax.random.normal(kx, (layouts.BATCH, layouts.INJECT)),
            jax.random.normal(ky, (layouts.BATCH,)))


def two_d_step(num_processes: int, process_id: int) -> dict[str, np.ndarray]:
    """One FSDP × tensor-parallel training step over the devices of all processes."""
    mesh = device_mesh({"data": 2, "model": 4})
    model = layouts.make_model(np.float64, 1e-11)
    placed = shard(model, mesh, fsdp_specs(model, mesh, "data",
                                           specs=mlp_cell_specs(model, mesh)))
    placed = eqx.tree_at(lambda m: m.deq, placed,
                         Gathered(placed.deq, mesh, specs=mlp_cell_specs(placed.deq, mesh)))
    opt_state = layouts.optimizer.init(eqx.filter(placed, eqx.is_inexact_array))
    x, y = layout_batch()
    share = len(x) // num_processes
    mine = slice(process_id * share, (process_id + 1) * share)
    x, y = shard_batch(mesh, (x[mine], y[mine]))
    new_model, _, loss, grads = eqx.filter_jit(layouts.step)(placed, opt_state, x, y)
    # Parameters split across processes are not readable here: make them whole first.
    whole = eqx.filter_jit(lambda t: shard(t, mesh, replicated_specs(t)))
    return arrays(*whole((new_model, loss, grads)))


def main(address: str, num_processes: int, process_id: int, out: Path) -> None:
    jax.config.update("jax_enable_x64", True)  # compare to float64 rounding
    program = page_program()
    model, loss, grads = program["train_on_hosts"](
        address, num_processes, process_id, program["global_batches"](SEED, STEPS)
    )
    assert jax.process_count() == num_processes and jax.device_count() == 8
    np.savez(out / f"process{process_id}.npz", **arrays(model, loss, grads))
    np.savez(out / f"process{process_id}_2d.npz", **two_d_step(num_processes, process_id))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
