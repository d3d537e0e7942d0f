"""A data-parallel DEQ training step on 8 (CPU) devices equals the one-device step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from banax.parallel import data_mesh, shard_batch

HERE = Path(__file__).parent


@pytest.mark.slow
def test_sharded_training_step_matches_one_device():
    # The device count is fixed when JAX starts, hence a fresh interpreter.
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, str(HERE / "sharded_step.py")], capture_output=True, text=True,
        env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    # Nothing sharded is gathered onto one device for a host check (the backward
    # solve's warning, the cache's index check): XLA's partitioner would say so.
    assert "Involuntary full rematerialization" not in run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert report["input_sharded"] and report["output_sharded"]
    assert report["output_devices"] == 8
    one, many = report["loss"]
    assert abs(one - many) <= 1e-12 * abs(one)
    assert report["same_grads"] and report["same_update"] and report["same_output"]
    assert report["grad_norm"] > 1e-3  # the compared gradients are not trivially zero
    assert "divisible by the 8 device(s)" in report["uneven_batch"]
    assert "got shape (30, 6)" in report["uneven_batch"]
    # The fixed-point cache: the same entries whether the batch is sharded or not, kept
    # replicated, and the warm solve (from the cache) far shorter than the cold one.
    assert report["same_caches"] and report["cache_replicated"]
    assert report["cache_filled"] == 32
    cold, warm = report["cold_steps"], report["warm_steps"]
    assert cold[0] == cold[1] and warm[0] == warm[1]
    assert cold[0] > 20 and warm[0] <= 2


def test_shard_batch_rejects_what_it_cannot_split():
    mesh = data_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.size == jax.device_count()
    with pytest.raises(ValueError, match="axis_name='batch' is not an axis of the mesh"):
        shard_batch(mesh, np.ones((4, 2)), axis_name="batch")
    with pytest.raises(ValueError, match="leading batch axis divisible"):
        shard_batch(mesh, {"scalar": np.ones(())})
