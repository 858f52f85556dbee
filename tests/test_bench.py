"""Tests for the benchmark package `bench`.

The end-to-end test runs `python -m bench --quick` in a fresh process and
checks the structure and internal consistency of what it writes; it never
asserts a timing. The other tests check the pieces (registry, timing
harness, ratios, goals, floor arithmetic, the from-scratch layer) on values
made up for them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import floor, report
from bench.suites import BenchConfig, SuiteResult, measurement, resolve, skipped
from bench.timing import Candidate, summarize, time_interleaved

REPO_ROOT = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("kerasbn", "kerasbn_fused", "kerasbn_generic", "keras", "scratch", "tf_fused_kernel")
REQUIRED_FIELDS = (
    "implementation", "shape", "layout", "mode", "jit", "median_s", "min_s", "max_s", "ratio_to_keras",
)  # fmt: skip


# ------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs `python -m bench --quick --out <tmp>` once; returns (completed process, out folder)."""
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return completed, out


@pytest.fixture(scope="module")
def quick_records(quick_run):
    completed, out = quick_run
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((out / "latest.json").read_text())


@pytest.mark.slow
def test_quick_run_writes_dated_and_latest_files(quick_run, quick_records):
    completed, out = quick_run
    header = quick_records[0]
    stem = f"{header['date']}-{header['host']}"
    for suffix in (".md", ".json"):
        dated = out / f"{stem}{suffix}"
        assert dated.is_file()
        assert dated.read_bytes() == (out / f"latest{suffix}").read_bytes()
    markdown = (out / "latest.md").read_text()
    assert "## Goals" in markdown
    assert "| shape | layout | mode | jit | kerasbn | kerasbn_fused |" in markdown
    # The table and the machine are printed at the end of the run too.
    assert f"Machine: {header['machine']['cpu_model']}, {header['machine']['cores']} cores" in completed.stdout
    assert "| shape | layout | mode | jit | kerasbn |" in completed.stdout


@pytest.mark.slow
def test_quick_run_header(quick_records):
    header = quick_records[0]
    assert header["record"] == "header"
    assert header["quick"] is True
    assert header["machine"]["cpu_model"]
    assert header["machine"]["cores"] >= 1
    assert any(d.startswith("CPU") for d in header["machine"]["devices"])
    assert set(header["versions"]) == {"python", "tensorflow", "keras", "kerasbn", "numpy"}
    assert all(header["versions"].values())
    assert [r for r in quick_records if r["record"] == "header"] == [header]


@pytest.mark.slow
def test_quick_run_measures_every_implementation(quick_records):
    layer = [r for r in quick_records if r["record"] == "measurement" and r["suite"] == "layer"]
    assert {r["implementation"] for r in layer} == set(IMPLEMENTATIONS)
    # Both modes, both jit settings, NHWC, NCHW and 2-D, each with the keras reference.
    keras_cases = {(r["layout"], r["mode"], r["jit"]) for r in layer if r["implementation"] == "keras"}
    assert keras_cases == {
        (l, m, j) for l in ("NHWC", "NCHW", "NC") for m in ("train_step", "inference") for j in (False, True)
    }


@pytest.mark.slow
def test_quick_run_measurements_are_consistent(quick_records):
    bandwidth = next(r for r in quick_records if r["record"] == "bandwidth")
    assert bandwidth["bandwidth_gbps"] > 0
    layer = [r for r in quick_records if r["record"] == "measurement" and r["suite"] == "layer"]
    for record in layer:
        for field in REQUIRED_FIELDS:
            assert field in record, (field, record)
        assert 0 < record["min_s"] <= record["median_s"] <= record["max_s"]
        assert math.isfinite(record["ratio_to_keras"]) and record["ratio_to_keras"] > 0, record
        if record["implementation"] == "keras":
            assert record["ratio_to_keras"] == 1.0
        # Every implementation computes what keras computes (dx, dgamma, dbeta or y).
        assert record["max_rel_diff_to_keras"] < 1e-4, record
        passes = 8 if record["mode"] == "train_step" else 2
        assert record["bytes_moved"] == passes * 4 * math.prod(record["shape"])
        assert record["floor_s"] == pytest.approx(record["bytes_moved"] / (bandwidth["bandwidth_gbps"] * 1e9))
        assert record["time_over_floor"] == pytest.approx(record["median_s"] / record["floor_s"])
        assert record["achieved_gbps"] == pytest.approx(record["bytes_moved"] / record["median_s"] / 1e9)


@pytest.mark.slow
def test_quick_run_suites_and_skips(quick_records):
    suites = {r["name"]: r for r in quick_records if r["record"] == "suite"}
    assert list(suites) == ["floor", "layer", "training", "export"]
    assert suites["floor"]["status"] == suites["layer"]["status"] == "ok"
    # Part 4 is a placeholder, and says so.
    assert suites["export"]["status"] == "skipped"
    assert suites["export"]["reason"] == "export not yet implemented"
    assert suites["export"]["counts_as_done"] is False
    training = [r for r in quick_records if r["record"] == "measurement" and r["suite"] == "training"]
    if suites["training"]["status"] == "skipped":
        assert suites["training"]["reason"].startswith("training.models not available")
    else:
        assert suites["training"]["status"] == "ok"
        assert {(r["implementation"], r["replicas"]) for r in training} == {
            (norm, replicas) for norm in ("kerasbn", "keras", "none") for replicas in (1, 2)
        }
        for record in training:
            assert math.isfinite(record["ratio_to_keras"]) and record["ratio_to_keras"] > 0
            assert record["examples_per_s"] == pytest.approx(record["steps"] * 256 / record["median_s"])
    for record in quick_records:
        if record["record"] == "skipped":
            assert record["reason"], record


# ------------------------------------------------------------------ pieces


def test_resolve_adds_required_suites_in_registry_order():
    import bench

    bench.load_suites()
    assert [s.name for s in resolve(["layer"])] == ["floor", "layer"]
    assert [s.name for s in resolve(["export", "floor"])] == ["floor", "export"]
    assert [s.name for s in resolve([])] == ["floor", "layer", "training", "export"]


def test_config_errors_name_the_argument_and_value():
    import bench

    bench.load_suites()
    with pytest.raises(ValueError, match=r"`repeats` must be a positive integer or None. Received: repeats=0"):
        BenchConfig(repeats=0)
    with pytest.raises(ValueError, match=r"unknown suites \['nope'\].*Received: suites=\['layer', 'nope'\]"):
        BenchConfig(suites=("layer", "nope"))
    assert BenchConfig(quick=True).repeats_or(full=7, quick=3) == 3
    assert BenchConfig(repeats=5, quick=True).repeats_or(full=7, quick=3) == 5


def test_time_interleaved_rotates_order_and_records_errors():
    calls = []

    def candidate(name):
        return Candidate(name, lambda: calls.append(name))

    def broken():
        raise RuntimeError("no kernel for this layout\nsecond line")

    timings = time_interleaved(
        [candidate("a"), candidate("b"), Candidate("c", broken), candidate("d")], repeats=3, min_repetition_s=0.0
    )
    assert timings["c"].error == "RuntimeError: no kernel for this layout"
    assert timings["c"].seconds == []
    for name in "abd":
        assert len(timings[name].seconds) == 3 and timings[name].calls_per_repetition == 1
    # Two warm-up calls each, then rounds a b d / b d a / d a b.
    assert calls == ["a", "a", "b", "b", "d", "d"] + list("abd") + list("bda") + list("dab")


def test_time_interleaved_uses_self_timed_values():
    values = iter([9.0, 9.0, 0.25, 0.5, 0.75])
    timings = time_interleaved(
        [Candidate("fit", lambda: next(values), self_timed=True)], repeats=3, min_repetition_s=1.0
    )
    assert timings["fit"].seconds == [0.25, 0.5, 0.75]
    assert summarize(timings["fit"].seconds) == {"median_s": 0.5, "min_s": 0.25, "max_s": 0.75, "repeats": 3}


def _layer_record(
    implementation, median, shape=(128, 56, 56, 64), layout="NHWC", mode="train_step", jit=False, family="resnet"
):
    return measurement("layer", implementation, shape, layout, mode, jit, [median], family=family)


def test_add_ratios_divides_by_keras_of_the_same_group_only():
    records = [
        _layer_record("keras", 2.0),
        _layer_record("kerasbn", 0.5),
        _layer_record("keras", 4.0, jit=True),
        _layer_record("kerasbn", 1.0, jit=True),
        _layer_record("kerasbn", 3.0, layout="NCHW"),  # no keras for this group
    ]
    records[1]["min_s"] = 0.25
    report.add_ratios(records)
    assert [r["ratio_to_keras"] for r in records] == [1.0, 0.25, 1.0, 0.25, None]
    assert [r["min_ratio_to_keras"] for r in records] == [1.0, 0.125, 1.0, 0.25, None]


def test_layer_goals_met_and_missed_with_numbers():
    records = [
        _layer_record("keras", 1.0),
        _layer_record("kerasbn", 0.45),
        _layer_record("tf_fused_kernel", 0.4),
        _layer_record("keras", 1.0, shape=(256, 8, 8, 16), family="lenet"),
        _layer_record("kerasbn", 0.95, shape=(256, 8, 8, 16), family="lenet"),
        _layer_record("tf_fused_kernel", 1.0, mode="inference"),
        _layer_record("kerasbn", 1.02, mode="inference"),
    ]
    report.add_ratios(records)
    goals = {g.goal: g for g in report.goal_layer(records)}
    resnet = goals["kerasbn train step <= 0.5x keras on ResNet-sized 4-D shapes"]
    assert resnet.status == "met"
    assert resnet.detail == (
        "worst 0.45x of keras on (128x56x56x64) NHWC (the raw fused kernel there: 0.40x of keras); "
        "all 1 cases at or below 0.5x"
    )
    lenet = goals["kerasbn train step <= 0.9x keras on LeNet shapes and 2-D"]
    assert lenet.status == "missed"
    assert lenet.detail == "worst 0.95x of keras on (256x8x8x16) NHWC; 1 of 1 cases above 0.9x"
    assert goals["kerasbn train step <= 1x keras on every shape (never slower)"].status == "met"
    assert goals["kerasbn inference <= 1.05x tf.compat.v1.nn.fused_batch_norm"].status == "met"
    assert (
        goals["kerasbn train step <= 0.5x keras on ResNet-sized 4-D shapes (jit_compile=True)"].status
        == "not evaluated"
    )


def test_export_and_training_goals_say_why_they_were_not_evaluated():
    records = [
        {"record": "suite", "name": "export", "status": "skipped", "reason": "export not yet implemented"},
        {"record": "suite", "name": "training", "status": "skipped", "reason": "training.models not available"},
    ]
    (export,) = report.goal_export(records)
    assert (export.status, export.detail) == ("not evaluated", "export suite skipped: export not yet implemented")
    assert [(g.status, g.detail) for g in report.goal_training(records)] == [
        ("not evaluated", "training suite skipped: training.models not available")
    ] * 2
    assert {g.detail for g in report.goal_layer(records)} == {"layer suite not run"}


def test_training_goal_compares_kerasbn_with_keras_and_none_per_replica_count():
    def record(norm, seconds, replicas):
        return measurement("training", norm, (256, 28, 28, 1), "NHWC", "fit", False, [seconds], replicas=replicas)

    records = [record("keras", 1.0, 1), record("none", 0.9, 1), record("kerasbn", 1.001, 1)]
    records += [record("keras", 2.0, 2), record("none", 1.5, 2), record("kerasbn", 2.2, 2)]
    as_fast, within = report.goal_training(records)
    assert as_fast.status == "missed"
    # 1.001 prints with enough digits not to read as the limit 1.
    assert as_fast.detail == (
        "worst 1.10x of keras's epoch time on (256x28x28x1) NHWC 2 replicas; 2 of 2 cases above 1x "
        "((256x28x28x1) NHWC 1.001x)"
    )
    assert within.status == "missed" and within.detail.startswith("worst 1.47x of none's epoch time")


def test_render_has_goals_tables_and_skip_reasons():
    header = {
        "record": "header", "date": "2026-01-02", "host": "box", "started_utc": "2026-01-02T00:00:00+00:00",
        "machine": {"cpu_model": "Test CPU", "cores": 2, "devices": ["CPU:0"], "load_average_at_start": [0.1]},
        "versions": {"python": "3.11"}, "command": "python -m bench", "quick": False,
    }  # fmt: skip
    records = [
        header,
        _layer_record("keras", 2.0),
        _layer_record("kerasbn", 0.5),
        skipped("layer", "kerasbn_fused", (1024, 120), "NC", "train_step", False, "ValueError: needs 4-D"),
        _layer_record("keras", 1.0, shape=(1024, 120), layout="NC", family="dense"),
    ]
    report.add_ratios(records)
    floor.add_floor(records, bandwidth_gbps=10.0)
    text = report.render(records)
    assert "Test CPU, 2 cores" in text
    assert "| 128x56x56x64 | NHWC | train_step | no | 0.25x | - | - | 1.00x | - | - | 2000 |" in text
    assert "| 1024x120 | NC | train_step | no | - | skip | - | 1.00x | - | - | 1000 |" in text
    assert "layer / kerasbn_fused: ValueError: needs 4-D (1 cases, e.g. (1024x120) NC train_step)" in text


def test_bytes_moved_and_floor_fields():
    assert floor.bytes_moved((2, 3), "inference") == 2 * 4 * 6
    assert floor.bytes_moved((2, 3), "train_step") == 8 * 4 * 6
    with pytest.raises(ValueError, match=r"`mode` must be one of \['inference', 'train_step'\]. Received: mode='fit'"):
        floor.bytes_moved((2, 3), "fit")
    records = [measurement("layer", "keras", (1000,), "NC", "inference", False, [1e-6], bytes_moved=8000)]
    floor.add_floor(records, bandwidth_gbps=4.0)
    assert records[0]["floor_s"] == pytest.approx(2e-6)
    assert records[0]["achieved_gbps"] == pytest.approx(8.0)
    assert records[0]["time_over_floor"] == pytest.approx(0.5)


def test_measure_bandwidth_counts_read_and_written_bytes():
    result = floor.measure_bandwidth(buffer_bytes=4 * 2**20, repeats=2)
    assert result["bytes_per_copy"] == 2 * 4 * 2**20
    assert result["bandwidth_gbps"] == max(v["best_gbps"] for v in result["by_threads"].values())
    assert "1" in result["by_threads"]


def test_scratch_layer_matches_closed_form_and_updates_moving_averages():
    tf = pytest.importorskip("tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the from-scratch layer is written with TensorFlow ops")
    from bench.scratch import ScratchBatchNorm

    x = np.random.default_rng(0).normal(3.0, 2.0, size=(8, 2, 3, 4)).astype("float32")
    layer = ScratchBatchNorm(axis=1, momentum=0.9, epsilon=1e-3)
    y = layer(tf.constant(x), training=True).numpy()
    mean = x.astype("float64").mean(axis=(0, 2, 3), keepdims=True)
    variance = x.astype("float64").var(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(variance + 1e-3), atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean.ravel(), atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * variance.ravel(), atol=1e-5)
    # Inference uses the moving statistics.
    y = layer(tf.constant(x), training=False).numpy()
    expected = (x - 0.1 * mean) / np.sqrt(0.9 + 0.1 * variance + 1e-3)
    np.testing.assert_allclose(y, expected, atol=1e-4)


def test_suite_result_defaults():
    result = SuiteResult()
    assert (result.status, result.records, result.reason, result.notes) == ("ok", [], "", [])
