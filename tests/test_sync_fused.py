"""Synchronized batch norm's fused path and replica groups against float64, and what a step costs.

Under MirroredStrategy on 4 logical CPUs (tests/_sync_worker.py, in a fresh
process) and on 2 MultiWorkerMirroredStrategy workers on 127.0.0.1 (slow):
outputs, input gradients, dgamma, dbeta and every replica's moving
statistics of `kerasbn.BatchNorm(synchronized=True)`, fused and generic, in
groups of replicas and across all, against a float64 single-device reference
fed each group's examples, on uneven and empty slices (and a group without
any example); mixed_float16; the cross-replica calls and the collective ops
of a traced training step; the errors a user meets. In-process: the plan's
choice for synchronized calls and the arguments' checks.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _procs import load_module, logs, run_python, run_workers
from test_distributed import DIST_ENV, _load

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tf.distribute tests need TensorFlow installed"
)

WORKER = Path(__file__).with_name("_sync_worker.py")
WORKER_TIMEOUT_S = 900


worker = load_module(WORKER, "kerasbn_sync_worker")  # it imports only NumPy at module level
FLOAT32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def mirrored4(tmp_path_factory):
    """Results of one MirroredStrategy process with 4 logical CPU replicas."""
    out = tmp_path_factory.mktemp("sync4") / "results.npz"
    proc = run_python([WORKER, "mirrored", "--replicas", "4", "--out", out], env=DIST_ENV, timeout=WORKER_TIMEOUT_S)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"]
    results = _load(out)
    assert int(results["num_replicas"]) == 4
    return results


# ------------------------------------------------------------- float64 reference


def np_group_step(x, upstream, gamma, beta, channel_axis):
    """Float64 training-mode batch norm of one group's examples and the gradients of sum(upstream * y)."""
    x, upstream = np.moveaxis(x, channel_axis, -1), np.moveaxis(upstream, channel_axis, -1)
    axes = tuple(range(x.ndim - 1))
    mean, variance = x.mean(axis=axes), x.var(axis=axes)
    inv_std = 1.0 / np.sqrt(variance + worker.EPSILON)
    x_hat = (x - mean) * inv_std
    g = upstream * gamma
    dx = inv_std * (g - g.mean(axis=axes) - x_hat * (g * x_hat).mean(axis=axes))
    back = lambda a: np.moveaxis(a, -1, channel_axis)  # noqa: E731
    return back(gamma * x_hat + beta), back(dx), (upstream * x_hat).sum(axis=axes), upstream.sum(axis=axes), \
        mean, variance


def check_against_float64(results, prefix, case, replicas, group_size, half=False):
    """Every step of SPLITS: each group's replicas against the float64 reference fed that group's examples."""
    feature_shape, axis, _ = worker.CASES[case]
    channel_axis = axis % (len(feature_shape) + 1)
    key = f"{prefix}.{case}.g{group_size}"
    gamma, beta, moving_mean, moving_variance = results[f"{key}.initial"].astype(np.float64)
    moving = {r: (moving_mean, moving_variance) for r in range(replicas)}
    # float16 outputs and upstream gradients: half a float16 ulp is 5e-4 relative.
    tol = dict(outputs=dict(rtol=2e-3, atol=2e-3), input_grad=dict(rtol=5e-3, atol=2e-3)) if half else {}
    sums_tol = dict(rtol=5e-3, atol=5e-3) if half else dict(rtol=1e-5, atol=1e-4)
    for step, sizes in enumerate(worker.SPLITS[replicas]):
        for first in range(0, replicas, group_size):
            members = range(first, first + group_size)
            rows = [f"{key}.s{step}.r{r}" for r in members]
            where = f"{key} step {step} slices {sizes}, replicas {list(members)}"
            x = np.concatenate([results[f"{row}.inputs"] for row in rows]).astype(np.float64)
            if half:
                x = x.astype(np.float16).astype(np.float64)  # what the layer normalizes
            upstream = np.concatenate([results[f"{row}.upstream"] for row in rows]).astype(np.float64)
            if len(x):
                outputs, dx, dgamma, dbeta, mean, variance = np_group_step(x, upstream, gamma, beta, channel_axis)
                for r in members:
                    moving[r] = tuple(worker.MOMENTUM * m + (1 - worker.MOMENTUM) * s
                                      for m, s in zip(moving[r], (mean, variance)))
                for name, expected in (("outputs", outputs), ("input_grad", dx)):
                    got = np.concatenate([results[f"{row}.{name}"] for row in rows])
                    np.testing.assert_allclose(got, expected, **tol.get(name, FLOAT32_TOL), err_msg=f"{where}: {name}")
                # dgamma and dbeta stay each replica's; the optimizer's aggregation sums them.
                for name, expected in (("gamma_grad", dgamma), ("beta_grad", dbeta)):
                    got = sum(results[f"{row}.{name}"].astype(np.float64) for row in rows)
                    np.testing.assert_allclose(got, expected, **sums_tol, err_msg=f"{where}: {name}")
            for r, row in zip(members, rows):
                for index, name in enumerate(("moving_mean", "moving_variance")):
                    np.testing.assert_allclose(results[f"{row}.{name}"], moving[r][index], **FLOAT32_TOL,
                                               err_msg=f"{where}: replica {r}'s {name}")


@pytest.mark.parametrize("group_size", [4, 2], ids=["all4", "groups_of_2"])
@pytest.mark.parametrize("case", list(worker.CASES))
def test_synchronized_matches_float64_per_group(mirrored4, case, group_size):
    check_against_float64(mirrored4, "exact", case, 4, group_size)


def test_fused_kernels_run_where_the_plan_takes_them(mirrored4):
    for group_size in (4, 2):
        for case, fused in (("nhwc", True), ("view", True), ("generic", False), ("nchw", False)):
            count = int(mirrored4[f"exact.{case}.g{group_size}.fused_kernels"])
            assert (count > 0) == fused, (case, group_size, count)


@pytest.mark.parametrize("group_size", [4, 2], ids=["all4", "groups_of_2"])
def test_fused_synchronized_mixed_precision(mirrored4, group_size):
    assert int(mirrored4[f"mixed.nhwc.g{group_size}.fused_kernels"]) > 0
    check_against_float64(mirrored4, "mixed", "nhwc", 4, group_size, half=True)


def _per_layer(results, kind, group_size):
    names = ("all_reduce", "all_gather", "reduce_to", "batch_reduce_to", "collective_ops", "all_gather_ops")
    one = {n: float(results[f"counts.{kind}.g{group_size}.1.{n}"]) for n in names}
    three = {n: float(results[f"counts.{kind}.g{group_size}.3.{n}"]) for n in names}
    return {n: (three[n] - one[n]) / 2 for n in names}, one


def check_counts(results, replicas):
    """2 cross-replica calls and 2 collective ops per layer per training step, fused or not, groups or not."""
    for kind in ("fused", "generic"):
        for group_size in [g or replicas for g in worker.GROUP_SIZES[replicas]]:
            per_layer, one = _per_layer(results, kind, group_size)
            assert per_layer == {"all_reduce": 2, "all_gather": 0, "reduce_to": 0, "batch_reduce_to": 0,
                                 "collective_ops": 2, "all_gather_ops": 0}, (kind, group_size, per_layer)
            # One layer's 2, and the optimizer's one batched gradient all-reduce.
            assert one["all_reduce"] == 3 and one["collective_ops"] == 3, (kind, group_size, one)


def test_two_collective_ops_per_layer_per_step(mirrored4):
    check_counts(mirrored4, 4)


def test_group_size_must_divide_the_replicas(mirrored4):
    assert ("`sync_group_size` must divide the number of replicas in sync (4). "
            "Received: sync_group_size=3 with 4 replicas") in str(mirrored4["errors.group_size"])


def test_synchronized_rnn_cell_raises_a_clear_error_and_unrolled_it_trains(mirrored4):
    error = str(mirrored4["errors.rnn_unroll0"])
    assert "`synchronized=True` batch norm cannot compute its statistics here" in error, error
    assert "Use `synchronized=False` for this layer" in error and "unroll=True" in error, error
    assert "Received: synchronized=True at " in error and "while" in error, error
    assert str(mirrored4["errors.rnn_unroll1"]) == ""
    assert np.isfinite(float(mirrored4["errors.rnn_unroll1.loss"]))


# ---------------------------------------------------------------- in process


def test_plan_for_synchronized_calls():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the fused path is TensorFlow's")
    from kerasbn.plan import plan

    def path(shape, axes=None, device="CPU", **kwargs):
        axes = axes or (len(shape) - 1,)
        chosen = plan(shape, "float32", training=True, feature_axes=axes, cross_replica=True, device=device, **kwargs)
        return chosen.path, chosen.layout

    assert path((8, 28, 28, 64)) == ("fused", "NHWC")
    assert path((8, 24, 24, 6)) == ("fused", "NHWC")  # no channel-multiple rule for the inference kernels
    assert path((None, 7, 7, 512)) == ("fused", "NHWC")  # unknown batch
    assert path((16, 120)) == ("fused", "NHWC")  # the (-1, 1, 1, C) view
    assert path((1, 1, 1, 8)) == ("fused", "NHWC")  # one value per channel here, the statistics are global
    assert path((8, 64, 28, 28), axes=(1,)) == ("generic", None)
    assert path((8, 28, 28, 64), masked=True) == ("generic", None)
    assert path((8, 28, 28, 64), renorm=True) == ("generic", None)
    assert path((8, 28, 28, 64), device="GPU") == ("fused", "NHWC")  # the device rule: 4-D
    assert path((8, 64, 28, 28), axes=(1,), device="GPU") == ("generic", None)
    assert path((16, 120), device="GPU") == ("generic", None)
    assert path((8, 28, 28, 64), fused=False) == ("generic", None)
    with pytest.raises(ValueError, match=r"`fused=True` cannot take the fused kernel here: synchronized NCHW "
                                         r"\(the inference-mode gradient kernel takes NHWC only\)"):
        path((8, 64, 28, 28), axes=(1,), fused=True)


def test_sync_group_size_argument():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("replica groups are tf.distribute's")
    import kerasbn

    layer = kerasbn.BatchNorm(synchronized=True, sync_group_size=2)
    config = layer.get_config()
    assert config["sync_group_size"] == 2
    assert kerasbn.BatchNorm.from_config(config).sync_group_size == 2
    assert kerasbn.BatchNorm().get_config()["sync_group_size"] is None
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"`sync_group_size` must be a positive integer or None. "
                                             rf"Received: sync_group_size={bad!r}"):
            kerasbn.BatchNorm(synchronized=True, sync_group_size=bad)
    with pytest.raises(ValueError, match=r"it needs `synchronized=True`. Received: sync_group_size=2, synchronized=False"):
        kerasbn.BatchNorm(sync_group_size=2)
    with pytest.raises(ValueError, match=r"`virtual_batch_size` cannot be combined with `synchronized=True`.*"
                                         r"Received: synchronized=True, virtual_batch_size=4"):
        kerasbn.BatchNorm(synchronized=True, virtual_batch_size=4)
    # Without a strategy a group changes nothing: the statistics are the batch's own.
    x = np.random.default_rng(0).normal(size=(6, 3, 2, 4)).astype("float32")
    grouped = kerasbn.BatchNorm(synchronized=True, sync_group_size=2)(x, training=True)
    plain = kerasbn.BatchNorm()(x, training=True)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(plain), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------- MultiWorkerMirroredStrategy


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout to bound the workers")
def test_multi_worker_synchronized_fused_and_groups(tmp_path):
    """Two workers on 127.0.0.1: the fused and generic paths, across both and in groups of 1, against float64."""
    workers = 2
    worker_args = [[WORKER, "multi-worker", "--out", tmp_path / f"worker{i}.npz"] for i in range(workers)]
    results = run_workers(worker_args, tmp_path, env=DIST_ENV, timeout=600)
    if any(code for code, _ in results):
        output = "\n".join(f"--- worker {i} (exit {code}) ---\n{logs(log, 6000)}" for i, (code, log) in enumerate(results))
        pytest.fail(f"MultiWorkerMirroredStrategy workers failed (124/137: timed out)\n{output}")
    merged = {}
    for index in range(workers):
        results = _load(tmp_path / f"worker{index}.npz")
        assert int(results["task_index"]) == index and int(results["num_replicas"]) == workers
        for key, value in results.items():
            if key.startswith("counts.") or key.endswith(".fused_kernels"):
                merged.setdefault(key, value)  # every worker counts its own replica's
            elif key != "task_index":
                merged[key] = value
    for case in ("nhwc", "generic"):
        for group_size in (2, 1):
            check_against_float64(merged, "exact", case, workers, group_size)
    assert int(merged["exact.nhwc.g2.fused_kernels"]) > 0
    check_counts(merged, workers)
