"""kerasbn.BatchNorm under `keras.distribution.DataParallel` on JAX (kerasbn/sharding.py), on 4 host devices.

Each check runs in a fresh JAX process (`tests/_jax_dist_worker.py`: JAX
must see several devices before it initialises), from any backend's pytest
run; the worker measures, these tests assert: the collectives in the
compiled training step, local statistics against each device's float64 ones,
synchronized statistics against the global batch's (masked, uneven counts,
replica groups), reads, saves and reloads.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_python

DEVICES = 4
JAX_ENV = {
    "KERAS_BACKEND": "jax",
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}",
    "JAX_PLATFORMS": "cpu",
}


@pytest.fixture(scope="module")
def measured():
    """One worker process for every check of this file (JAX's start-up is the slow part)."""
    result = run_python(
        ["tests/_jax_dist_worker.py", "hlo", "local", "sync", "save", "group_error"], env=JAX_ENV, timeout=600
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_worker_saw_every_device(measured):
    assert measured["devices"] == DEVICES


def test_collectives_per_layer_in_the_compiled_train_step(measured):
    hlo = measured["hlo"]
    # The counter sees what XLA inserts for global statistics: the stock layer's 4 all-reduces per layer.
    assert hlo["stock"]["per_layer"]["total"] == 4
    # Local statistics: nothing per layer; the whole step's reductions (gradients, loss, and every
    # layer's moving-statistics mean) travel in one combined all-reduce.
    assert hlo["local"]["per_layer"]["total"] == 0
    assert hlo["local"]["step_6_layers"]["total"] == 1
    # Synchronized: one all-gather forward, one all-reduce backward per layer.
    assert hlo["synchronized"]["per_layer"] == {
        "all-reduce": 1, "all-gather": 1, "reduce-scatter": 0, "collective-permute": 0, "all-to-all": 0, "total": 2
    }


def test_local_statistics_are_each_devices_own(measured):
    # Outputs, gradients (x, gamma, beta) and the moving averages of the mean over devices of each
    # device's float64 statistics; each device's slice is offset, so global statistics would miss by ~1.
    for quantity, error in measured["local"].items():
        assert error < 1e-5, quantity


@pytest.mark.parametrize("groups", ["all", "groups"])
def test_synchronized_statistics_are_the_global_batchs(measured, groups):
    # Masked, uneven per-device counts (7, 8, 1, 0 of 8): float64 on the whole batch, or per group of
    # 2 devices (sync_group_size=2; the second group keeps one position, so its variance is 0 and
    # 1/sqrt(epsilon) ~ 32 scales float32's rounding).
    tolerance = 1e-5 if groups == "all" else 5e-4
    for quantity, error in measured["sync"][groups].items():
        assert error < tolerance, quantity


def test_reads_saves_and_reloads_under_the_distribution(measured):
    save = measured["save"]
    assert save["moving_mean_moved"] > 1e-4  # fit moved the statistics, so equality below means something
    assert save["replicated"]  # one value on every device: a read is the cross-device mean, no handover
    assert save["reloaded_moving_mean"] == 0.0
    assert save["reloaded_predict"] < 1e-6
    assert save["plain_predict"] < 1e-6  # reloaded without any distribution
    assert save["sync_moving_statistics"] == 0  # nothing to hand over on JAX


def test_a_group_size_that_does_not_divide_the_devices(measured):
    assert measured["group_error"] == (
        "`sync_group_size` must divide the number of devices along the batch axis 'batch' (4). "
        "Received: sync_group_size=3"
    )


@pytest.mark.parametrize("size", [0, -2, 1.5, True, "2"])
def test_sync_group_size_must_be_a_positive_integer(size):
    import kerasbn

    with pytest.raises(ValueError) as error:
        kerasbn.BatchNorm(synchronized=True, sync_group_size=size)
    assert str(error.value) == (
        f"`sync_group_size` must be a positive integer or None. Received: sync_group_size={size!r}"
    )
