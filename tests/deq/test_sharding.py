"""DEQ training steps on 8 (CPU) devices equal the one-device step: data parallelism,
fully-sharded parameters, tensor parallelism over a data × model mesh, and per-shard
solves; the compiled steps run no collective inside the solver's loops beyond those
each layout needs."""

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
BENCHMARKS = HERE.parents[1] / "benchmarks"


def run_on_8_devices(script: str) -> subprocess.CompletedProcess:
    # The device count is fixed when JAX starts, hence a fresh interpreter.
    env = {
        **os.environ,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent), str(BENCHMARKS), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run([sys.executable, str(HERE / script)], capture_output=True,
                         text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr
    return run


@pytest.mark.slow
def test_sharded_training_step_matches_one_device():
    run = run_on_8_devices("sharded_step.py")
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


# Every model-parallel layout runs in one subprocess (one JAX start, shared compiles);
# the tests below read its report.


@pytest.fixture(scope="module")
def layouts():
    run = run_on_8_devices("sharded_layouts.py")
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    return report


def only_flags(sizes: dict) -> bool:
    """Whether every collective inside the loops is a scalar (a stopping flag)."""
    return all(n == 1 for kind in sizes.values() for n in kind)


@pytest.mark.slow
@pytest.mark.parametrize("layout, tolerance", [
    ("data", 1e-10), ("fsdp_float64", 1e-10), ("fsdp_float32", 1e-5), ("tp", 1e-10),
    ("per_shard", 1e-10), ("transformer", 1e-10),
])
def test_layout_trains_like_one_device(layouts, layout, tolerance):
    # Gradients and parameters after one Adam step, relative to their largest entry.
    assert layouts[layout]["grads"] <= tolerance
    assert layouts[layout]["params"] <= tolerance


@pytest.mark.slow
def test_fsdp_gathers_weights_once_not_the_state_per_iteration(layouts):
    gathered, ungathered = layouts["fsdp_float64"], layouts["fsdp_ungathered"]
    # Gathered at the layer's entry: inside the loops only scalar flags are reduced,
    # two per loop (its stopping test, and whether any sample took its step, on which
    # Anderson's shared history counter moves on), no gather or all-to-all.
    assert gathered["inside"] == {"all-reduce": 4}
    assert only_flags(gathered["inside_sizes"])
    assert gathered["outside"].get("all-gather", 0) >= 1
    # Left to the partitioner, the split weights stay split and the state moves.
    assert ungathered["inside"].get("all-gather", 0) >= 1
    assert not only_flags(ungathered["inside_sizes"])
    # Parameters and Adam's moments: 1/8 per device (every array here splits by 8).
    assert gathered["param_share"] == pytest.approx(1 / 8)
    assert gathered["opt_share"] == pytest.approx(1 / 8, rel=0.01)  # plus Adam's count


@pytest.mark.slow
def test_tensor_parallel_reduces_the_state_once_per_cell_evaluation(layouts):
    tp = layouts["tp"]
    # Per iteration: the forward cell's product with W2 and the backward VJP's with W1
    # end in one all-reduce of the (8 / 2 data shards × 8 features) state each, beside
    # the two scalar flags of each loop.
    assert tp["inside"] == {"all-reduce": 6}
    assert tp["inside_sizes"]["all-reduce"] == [1, 1, 1, 1, 64, 64]
    assert layouts["tp_w1_shard"] == [4, 8]  # 16 hidden units over 4 devices
    assert tp["param_share"] < 0.5


@pytest.mark.slow
def test_transformer_split_by_heads_reduces_the_state_twice_per_cell_evaluation(layouts):
    tp = layouts["transformer"]
    # Per iteration, each all-reduce over the model axis carries one data shard's state
    # (2 sequences × 4 positions × 8 features): the forward cell's sum over heads after
    # the output projection and its product with W2; the backward VJP's transposes of
    # the feed-forward and query/key/value input products; beside the two scalar flags
    # of each loop.
    assert tp["inside"] == {"all-reduce": 8}
    assert tp["inside_sizes"]["all-reduce"] == [1, 1, 1, 1, 64, 64, 64, 64]
    shards = layouts["transformer_shards"]
    assert shards["qkv"] == [3, 1, 8, 2]  # one of the 4 heads per device
    assert shards["qkv_bias"] == [3, 1, 2]
    assert shards["out"] == [1, 2, 8]
    assert shards["position_bias"] == [1, 4]
    assert shards["ff_in"] == [8, 4] and shards["ff_out"] == [4, 8]  # 16 hidden / 4
    assert shards["out_bias"] == [8]  # whole: added after the all-reduce
    assert tp["param_share"] < 0.35 and tp["opt_share"] < 0.35


@pytest.mark.slow
def test_per_shard_solve_runs_no_collective_in_its_loops(layouts):
    per_shard, data = layouts["per_shard"], layouts["data"]
    assert per_shard["inside"] == {}
    assert per_shard["outside"].get("all-reduce", 0) >= 1  # the gradient, once
    # Plain data parallelism all-reduces the loops' flags at every iteration.
    assert data["inside"] == {"all-reduce": 4} and only_flags(data["inside_sizes"])


@pytest.mark.slow
def test_bad_layouts_fail_in_one_line(layouts):
    errors = layouts["errors"]
    for text in errors.values():
        assert "\n" not in text
    assert "axis 'model' is not an axis of the mesh" in errors["axis"]
    assert "('data',)" in errors["axis"]
    assert "dimension 0 of an array of shape (12,) (12) is not divisible by the 8" \
        in errors["indivisible"]
    assert "MLPCell.W1 of shape (6, 8) cannot be split over the 4 devices of axis " \
        "'model'" in errors["tp_indivisible"]
    assert "TransformerCell with 2 heads and feed-forward width 16 cannot be split " \
        "over the 4 devices of axis 'model'" in errors["heads_indivisible"]
    assert "divisible by the 8 devices of mesh axis 'data'" in errors["batch"]
    assert "sizes [12]" in errors["batch"]
    assert "mixes samples across shards" in errors["mixing"]
    assert errors["apart"] == "accepted"
    assert "must multiply to the 8 devices" in errors["mesh"]


HLO = """HloModule step
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
%gather_fusion (p: f32[2,8]) -> f32[16,8] {
  %p = f32[2,8]{1,0} parameter(0)
  ROOT %g = f32[16,8]{1,0} all-gather(%p), dimensions={0}
}
%cond (c: (s32[], f32[2,8])) -> pred[] {
  %c = (s32[], f32[2,8]{1,0}) parameter(0)
  %flag = f32[] all-reduce(%x), to_apply=%add
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%body (c: (s32[], f32[2,8])) -> (s32[], f32[2,8]) {
  %c = (s32[], f32[2,8]{1,0}) parameter(0)
  %f = f32[16,8]{1,0} fusion(%z), kind=kLoop, calls=%gather_fusion
  %r = f32[4,8]{1,0} all-reduce-start(%y), to_apply=%add
  %d = f32[4,8]{1,0} all-reduce-done(%r)
  ROOT %t = (s32[], f32[2,8]{1,0}) tuple(%i, %z)
}
ENTRY %main (x: f32[2,8]) -> f32[2,8] {
  %x = f32[2,8]{1,0} parameter(0)
  %w = (s32[], f32[2,8]{1,0}) while(%init), condition=%cond, body=%body
  %g2 = (f32[3]{0}, f32[], f32[], f32[], f32[], /*index=5*/f32[5]{0}) all-reduce(%a, %b), to_apply=%add
  ROOT %o = f32[2,8]{1,0} get-tuple-element(%w), index=1
}
"""  # noqa: E501 (a real HLO line)


def test_hlo_collectives_counts_what_runs_per_iteration():
    sys.path.insert(0, str(BENCHMARKS))
    from hlo_collectives import collectives

    report = collectives(HLO)
    # The body's fused all-gather, its asynchronous all-reduce (counted once), the
    # condition's flag; outside, one tuple all-reduce of 3 + 4 + 5 elements.
    assert report.inside == {"all-gather": 1, "all-reduce": 2}
    assert report.inside_sizes("all-gather") == [128]
    assert report.inside_sizes("all-reduce") == [1, 32]
    assert report.outside == {"all-reduce": 1}
    assert report.ops[-1] == ("all-reduce", 12, "outside")
