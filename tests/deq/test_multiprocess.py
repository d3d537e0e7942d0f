"""The data-parallel training step of docs/multi_device.md on two real processes.

Two interpreters, each with 4 simulated CPU devices, join through
`jax.distributed.initialize` on 127.0.0.1 and exchange data through gloo; one training
step on the 8 devices of both must give the loss, gradients and updated parameters of
the same step on one device in this process; so must a step of an `MLPCell` DEQ
split over a (data=2, model=4) mesh spanning both processes (FSDP and tensor
parallelism together).
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
import pytest

from deq import sharded_layouts as layouts
from deq.multiprocess_worker import SEED, STEPS, arrays, layout_batch, page_program

HERE = Path(__file__).parent
# Both processes import JAX and compile one step; a join that has not finished by then
# is a hang (a process waits for a peer that died), not a slow machine.
DEADLINE_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(out: Path) -> None:
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    address = f"127.0.0.1:{free_port()}"
    # The coordinator listens on the loopback only (JAX's default is every interface).
    env["JAX_COORDINATOR_BIND_ADDRESS"] = address
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "multiprocess_worker.py"), address, "2", str(i),
             str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    end = time.monotonic() + DEADLINE_S
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=max(1.0, end - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        logs = [proc.communicate()[0] for proc in procs]
        raise AssertionError(
            f"the two processes did not finish within {DEADLINE_S} s:\n"
            + "\n".join(log[-3000:] for log in logs)
        ) from None
    for i, (proc, log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"process {i} failed:\n{log[-6000:]}"


@pytest.mark.slow
def test_two_processes_train_like_one_device(tmp_path):
    run_two_processes(tmp_path)

    program = page_program()
    # The page is user code, written for JAX's default promotion rules.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        model = program["make_model"](jax.random.key(0))
        opt_state = program["optimizer"].init(eqx.filter(model, eqx.is_inexact_array))
        (x, y), = program["global_batches"](SEED, STEPS)
        new_model, _, loss, grads = program["train_step"](model, opt_state, x, y)
    expected = arrays(new_model, loss, grads)

    for i in range(2):
        with np.load(tmp_path / f"process{i}.npz") as got:
            assert sorted(got.files) == sorted(expected)
            for name, value in expected.items():
                assert got[name].dtype == np.float64, name
                np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-12,
                                           err_msg=f"process {i}: {name}")
    assert np.linalg.norm(np.asarray(grads[0].cell.W)) > 1e-3  # not trivially zero

    # The FSDP × tensor-parallel step (run in the same processes, to start JAX once).
    model = layouts.make_model(np.float64, 1e-11)
    opt_state = layouts.optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    with jax.numpy_dtype_promotion("standard"):  # optax's update mixes Python scalars
        new_model, _, loss, grads = eqx.filter_jit(layouts.step)(model, opt_state,
                                                                 *layout_batch())
    expected = arrays(new_model, loss, grads)
    for i in range(2):
        with np.load(tmp_path / f"process{i}_2d.npz") as got:
            assert sorted(got.files) == sorted(expected)
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-9, atol=1e-12,
                                           err_msg=f"process {i}, 2-D layout: {name}")
    assert np.linalg.norm(np.asarray(grads.deq.cell.W1)) > 1e-3
