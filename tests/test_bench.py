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

import numpy as np
import pytest

from _procs import run_python
from bench import floor, report
from bench.suites import BenchConfig, SuiteResult, measurement, resolve, skipped
from bench.timing import Candidate, summarize, time_interleaved

TENSORFLOW = {"KERAS_BACKEND": "tensorflow"}  # the benchmark measures TensorFlow whatever the tests run on
IMPLEMENTATIONS = ("kerasbn", "kerasbn_fused", "kerasbn_generic", "keras", "scratch", "tf_fused_kernel")
EXPORT_IMPLEMENTATIONS = ("savedmodel_folded", "savedmodel_unfolded", "keras")
REQUIRED_FIELDS = (
    "implementation", "shape", "layout", "mode", "jit", "median_s", "min_s", "max_s", "ratio_to_keras",
)  # fmt: skip


# ------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Runs `python -m bench --quick --out <tmp>` once; returns (completed process, out folder)."""
    out = tmp_path_factory.mktemp("bench")
    completed = run_python(["-m", "bench", "--quick", "--out", out], env=TENSORFLOW, timeout=1200, check=False)
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
    assert list(suites) == ["floor", "layer", "training", "export", "models", "distributed"]
    assert suites["floor"]["status"] == suites["layer"]["status"] == suites["export"]["status"] == "ok"
    assert all(suite["counts_as_done"] for suite in suites.values())
    training = [r for r in quick_records if r["record"] == "measurement" and r["suite"] == "training"]
    assert suites["training"]["status"] == suites["distributed"]["status"] == "ok"
    assert {(r["implementation"], r["replicas"]) for r in training} == {
        (norm, replicas) for norm in ("kerasbn", "keras", "none") for replicas in (1, 2)
    }
    for record in training:
        assert math.isfinite(record["ratio_to_keras"]) and record["ratio_to_keras"] > 0
        assert record["examples_per_s"] == pytest.approx(record["steps"] * 256 / record["median_s"])
    for record in quick_records:
        if record["record"] == "skipped":
            assert record["reason"], record


@pytest.mark.slow
def test_quick_run_export_suite_records(quick_run, quick_records):
    completed, out = quick_run
    export = [r for r in quick_records if r["record"] == "measurement" and r["suite"] == "export"]
    assert [r for r in quick_records if r["record"] == "skipped" and r["suite"] == "export"] == []
    assert sorted((r["implementation"], r["shape"][0]) for r in export) == sorted(
        (name, batch) for name in EXPORT_IMPLEMENTATIONS for batch in (1, 256)
    )
    for record in export:
        for field in REQUIRED_FIELDS:
            assert field in record, (field, record)
        assert record["shape"] == [record["batch"], 28, 28, 1]
        assert (record["layout"], record["mode"], record["jit"], record["replicas"]) == ("NHWC", "inference", False, 1)
        assert 0 < record["min_s"] <= record["median_s"] <= record["max_s"]
        assert record["examples_per_s"] == pytest.approx(record["batch"] / record["median_s"])
        # ratio_to_keras is relative to the Keras model's predict step of the same batch.
        keras_record = next(r for r in export if r["implementation"] == "keras" and r["batch"] == record["batch"])
        assert record["ratio_to_keras"] == pytest.approx(record["median_s"] / keras_record["median_s"])
        assert math.isfinite(record["ratio_to_keras"]) and record["ratio_to_keras"] > 0
        # Folded and unfolded SavedModels compute the Keras model's logits.
        assert record["max_abs_logit_diff_to_keras"] <= 1e-3, record
        assert len(record["load_average"]) == 3
    folded = {r["batch"]: r for r in export if r["implementation"] == "savedmodel_folded"}
    unfolded = {r["batch"]: r for r in export if r["implementation"] == "savedmodel_unfolded"}
    for batch in (1, 256):
        assert folded[batch]["fold_bn"] is True and unfolded[batch]["fold_bn"] is False
        assert folded[batch]["signature"] == unfolded[batch]["signature"] == "serving_float"
        # The folded graph holds no batch-norm op; the unfolded one computes
        # a = gamma * rsqrt(variance + epsilon) at run time (and may use the fused kernel).
        assert folded[batch]["batch_norm_ops"] == {}
        assert unfolded[batch]["batch_norm_ops"].get("Rsqrt", 0) >= 4
    # The goal is evaluated from these records, and the report tables them.
    (goal,) = report.goal_export(quick_records)
    speedup = unfolded[256]["median_s"] / folded[256]["median_s"]
    assert f">= {report.EXPORT_GOAL_THROUGHPUT:g}x" in goal.goal
    assert goal.status == ("met" if speedup >= report.EXPORT_GOAL_THROUGHPUT else "missed"), (speedup, goal)
    assert goal.detail.startswith(
        f"folded {unfolded[256]['median_s'] / folded[256]['median_s']:.2f}x the throughput of unfolded at batch 256"
    )
    markdown = (out / "latest.md").read_text()
    assert "## Exported SavedModel inference: BN folded vs unfolded" in markdown
    assert "| 256 | savedmodel_folded |" in markdown
    assert "| 256 | savedmodel_folded |" in completed.stdout


@pytest.mark.slow
def test_quick_run_models_suite_has_both_replica_counts(quick_records):
    models = [r for r in quick_records if r["record"] == "measurement" and r["suite"] == "models"]
    assert sorted(r["implementation"] for r in models) == sorted(
        [f"mobilenetv2/train/{n}dev/{v}" for n in (1, 2) for v in ("stock", "kerasbn.convert", "no_bn")]
        + [f"mobilenetv2/infer/1dev/{v}" for v in ("stock", "kerasbn.fold", "no_bn")]
    )
    assert all(math.isfinite(r["ratio_to_keras"]) and math.isfinite(r["bn_share"]) for r in models)


# ------------------------------------------------------------------ pieces


@pytest.mark.slow
def test_models_worker_at_a_tiny_size_names_every_variant_with_finite_ratios():
    from bench.workers import run_worker

    arguments = ["--replicas", 1, "--networks", "mobilenetv2", "--image-size", 32, "--batch", 4, "--repeats", 1]
    records = run_worker("bench.models_suite", [*arguments, "--warmup", 1, "--inference"], timeout_s=600)
    report.add_ratios(records)
    by_name = {r["implementation"]: r for r in records}
    assert sorted(by_name) == sorted(
        [f"mobilenetv2/train/1dev/{v}" for v in ("stock", "kerasbn.convert", "no_bn")]
        + [f"mobilenetv2/infer/1dev/{v}" for v in ("stock", "kerasbn.fold", "no_bn")]
    )
    for name, record in by_name.items():
        assert record["record"] == "measurement" and record["shape"] == [4, 32, 32, 3], name
        assert math.isfinite(record["ratio_to_keras"]) and math.isfinite(record["ratio_to_bound"]), name
        group = name.rsplit("/", 1)[0]
        stock, bound = by_name[f"{group}/stock"]["median_s"], by_name[f"{group}/no_bn"]["median_s"]
        assert record["bn_share"] == pytest.approx((record["median_s"] - bound) / (stock - bound))
    # MobileNetV2 has 52 batch norms; convert keeps them, fold and the bound have none.
    layers = {name.split("/", 2)[2]: r["batch_norm_layers"] for name, r in by_name.items()}
    assert layers == {
        "1dev/stock": 52, "1dev/kerasbn.convert": 52, "1dev/no_bn": 0, "1dev/kerasbn.fold": 0,
    }  # fmt: skip
    folded = by_name["mobilenetv2/infer/1dev/kerasbn.fold"]
    assert folded["folded_pairs"] + folded["affine_layers"] == 52 and folded["folded_pairs"] > 0
    for stock in ("mobilenetv2/train/1dev/stock", "mobilenetv2/infer/1dev/stock"):
        assert by_name[stock]["ratio_to_keras"] == 1.0 and by_name[stock]["bn_share"] == 1.0
    goals = {g.goal: g for g in report.goal_models(records)}
    goal = goals["kerasbn.convert train step <= 0.55x stock: mobilenetv2, 1 device"]
    ratio = by_name["mobilenetv2/train/1dev/kerasbn.convert"]["median_s"] / by_name["mobilenetv2/train/1dev/stock"]["median_s"]
    assert goal.status == ("met" if ratio <= 0.55 else "missed"), (ratio, goal)
    assert goal.detail.startswith(f"worst {ratio:.2f}"), (ratio, goal)
    assert goals["kerasbn.convert train step <= 0.78x stock: resnet50, 1 device"].status == "not evaluated"
    assert "| mobilenetv2 | inference | 1 |" in "\n".join(report.models_table(records))


def test_models_goals_and_bn_share_from_made_up_records():
    from bench.models_suite import add_shares

    def record(network, mode, variant, seconds, replicas=1):
        task = "train" if mode == "train_step" else "infer"
        return measurement(
            "models", f"{network}/{task}/{replicas}dev/{variant}", (32, 112, 112, 3), "NHWC", mode, False, [seconds],
            replicas=replicas, network=network, variant=variant, reference=variant == "stock",
        )  # fmt: skip

    records = [
        record("resnet50", "train_step", "stock", 1.0), record("resnet50", "train_step", "kerasbn.convert", 0.77),
        record("resnet50", "train_step", "no_bn", 0.7), record("resnet50", "inference", "stock", 0.2),
        record("resnet50", "inference", "kerasbn.fold", 0.18), record("resnet50", "inference", "no_bn", 0.17),
        record("resnet50", "train_step", "stock", 2.0, 2), record("resnet50", "train_step", "kerasbn.convert", 1.8, 2),
    ]  # fmt: skip
    add_shares(records)
    report.add_ratios(records)
    assert [r["ratio_to_keras"] for r in records] == pytest.approx([1.0, 0.77, 0.7, 1.0, 0.9, 0.85, 1.0, 0.9])
    assert records[1]["bn_share"] == pytest.approx(0.07 / 0.3)
    assert records[4]["ratio_to_bound"] == pytest.approx(18 / 17)
    assert records[7]["bn_share"] is None  # no bound measured at 2 replicas
    goals = {g.goal: (g.status, g.detail) for g in report.goal_models(records)}
    assert goals["kerasbn.convert train step <= 0.78x stock: resnet50, 1 device"][0] == "met"
    assert goals["kerasbn.convert train step <= 0.85x stock: resnet50, 2 replicas"] == (
        "missed", "worst 0.90x of stock on resnet50 train_step (32x112x112x3) NHWC 2 replicas; 1 of 1 cases above 0.85x"
    )
    assert goals["kerasbn.convert's BN share of the train step <= 1/4 of stock's, 1 device"] == (
        "met", "BN share resnet50 0.23 (limit 0.25)"
    )
    assert goals["kerasbn.fold inference <= 1.05x no BN, every network"][0] == "missed"
    assert goals["Stretch: BN share of the train step < 15% of stock's, 1 device"][0] == "missed"
    assert goals["kerasbn.convert train step <= 0.55x stock: mobilenetv2, 1 device"][0] == "not evaluated"
    table = "\n".join(report.models_table(records))
    assert "| resnet50 | train_step | 1 | 1000 | kerasbn.convert 0.77x | 0.70x | 0.23 | 1.10x | 1000-1000 |" in table
    assert "| resnet50 | train_step | 2 | 2000 | kerasbn.convert 0.90x | - | - | - | 2000-2000 |" in table


@pytest.mark.slow
def test_distributed_suite_at_a_tiny_size_counts_calls_and_ratios(tmp_path):
    """`python -m bench --quick --suite distributed`: a two-conv network at 32x32, 2 repetitions."""
    run_python(["-m", "bench", "--quick", "--suite", "distributed", "--out", tmp_path], env=TENSORFLOW, timeout=900)
    records = json.loads((tmp_path / "latest.json").read_text())
    found = {r["implementation"]: r for r in records if r["record"] == "measurement"}
    kinds = ("mirrored", "multiworker")
    synchronized = ("stock_sync", "kerasbn_sync", "kerasbn_sync_generic", "kerasbn_sync_group", "kerasbn")
    expected = [f"{kind}/train_step/{v}" for kind in kinds for v in synchronized]
    expected += [f"{kind}/inference/{v}" for kind in kinds for v in ("stock", "kerasbn")]
    jax = ("jax", "jax_processes")
    expected += [f"{kind}/train_step/{v}" for kind in jax for v in ("stock", "kerasbn", "kerasbn_sync")]
    assert sorted(found) == sorted(expected + ["kerasbn/batch 256", "kerasbn/batch None"])
    for name, record in found.items():
        assert math.isfinite(record["ratio_to_keras"]) and record["ratio_to_keras"] > 0, name
        if name.startswith(("mirrored", "multiworker")):
            assert record["replicas"] == 2 and record["batch_norm_layers"] == 2, name
            assert isinstance(record["cross_replica_calls"], int) and record["cross_replica_calls"] >= 0, name
            extra = record["cross_replica_calls"] - record["calls_without_batch_norm"]
            assert record["calls_per_batch_norm"] == extra / 2, name
    for kind in ("mirrored", "multiworker"):
        # Stock's synchronized moments: 3 all-reduces forward, 2 backward; unsynchronized kerasbn: none.
        assert found[f"{kind}/train_step/stock_sync"]["calls_per_batch_norm"] == 5
        assert found[f"{kind}/train_step/kerasbn"]["calls_per_batch_norm"] == 0
        assert found[f"{kind}/train_step/kerasbn"]["calls_without_batch_norm"] > 0  # the gradients' all-reduce
    for kind in jax:  # collectives per layer in the compiled step: stock's 4, local statistics none
        assert found[f"{kind}/train_step/stock"]["collectives_per_batch_norm"] == 4
        assert found[f"{kind}/train_step/kerasbn"]["collectives_per_batch_norm"] == 0
    assert found["kerasbn/batch 256"]["ratio_to_keras"] == 1.0
    # The eight goals' statuses, recomputed from the records here, in the report's order.
    variants = ("kerasbn_sync", "kerasbn_sync_generic", "kerasbn_sync_group")
    sync_records = [found[f"{kind}/train_step/{v}"] for kind in kinds for v in variants]
    sync_records += [found[f"{kind}/train_step/kerasbn_sync"] for kind in jax]
    collectives = [r["collectives_per_batch_norm"] for r in sync_records if r.get("collectives_per_batch_norm") is not None]
    workers = {v: found[f"multiworker/train_step/{v}"]["median_s"] for v in ("stock_sync", "kerasbn_sync", "kerasbn")}
    stock_adds, ours_adds = (workers[v] - workers["kerasbn"] for v in ("stock_sync", "kerasbn_sync"))
    median = {name: record["median_s"] for name, record in found.items()}
    infer = [(found[f"{kind}/inference/kerasbn"], found[f"{kind}/inference/stock"]) for kind in kinds]
    expected = [
        max(r["calls_per_batch_norm"] for r in sync_records if r.get("calls_per_batch_norm") is not None) <= 2,
        max(collectives) <= 2,
        stock_adds > 0 and ours_adds <= stock_adds / 2,
        all(median[f"{kind}/train_step/kerasbn_sync"] <= 0.8 * median[f"{kind}/train_step/stock_sync"] for kind in kinds),
        all(found[f"{kind}/train_step/kerasbn"]["collectives"] - found[f"{kind}/train_step/kerasbn"]["collectives_without_batch_norm"] <= 1
            for kind in jax),
        median["jax_processes/train_step/kerasbn"] <= median["jax_processes/train_step/stock"],
        all(ours["median_s"] <= stock["median_s"] and ours["cross_replica_calls"] == 0 for ours, stock in infer),
        median["kerasbn/batch None"] / median["kerasbn/batch 256"] <= 1.05,
    ]  # fmt: skip
    goals = report.goal_distributed(records)
    assert [g.status for g in goals] == ["met" if met else "missed" for met in expected], goals
    assert "| MultiWorkerMirroredStrategy | train_step | kerasbn_sync |" in (tmp_path / "latest.md").read_text()


def test_distributed_goals_and_table_from_made_up_records():
    def record(strategy, mode, variant, seconds, calls, per_layer):
        return measurement(
            "distributed", f"{strategy}/{mode}/{variant}", (32, 112, 112, 3), "NHWC", mode, False, [seconds],
            replicas=2, network="resnet50", variant=variant, strategy=strategy, reference=variant.startswith("stock"),
            cross_replica_calls=calls, calls_per_batch_norm=per_layer,
        )  # fmt: skip

    mwms, mirrored = "MultiWorkerMirroredStrategy", "MirroredStrategy"
    records = [
        record(mwms, "train_step", "stock_sync", 3.0, 268, 5), record(mwms, "train_step", "kerasbn_sync", 2.2, 109, 2),
        record(mwms, "train_step", "kerasbn", 2.0, 3, 0), record(mwms, "inference", "stock", 0.5, 0, 0),
        record(mwms, "inference", "kerasbn", 0.4, 0, 0), record(mirrored, "train_step", "stock_sync", 2.0, 268, 5),
        record(mirrored, "train_step", "kerasbn_sync", 2.0, 215, 4),
        record(mirrored, "train_step", "kerasbn", 1.0, 3, 0),
        record(mirrored, "inference", "stock", 0.5, 0, 0), record(mirrored, "inference", "kerasbn", 0.6, 53, 1),
    ]  # fmt: skip
    for batch, seconds in ((256, 1.0), (None, 1.1)):
        records.append(measurement("distributed", f"kerasbn/batch {batch}", (256, 120), "NC", "train_step", False,
                                   [seconds], variant="dynamic_batch", reference=batch == 256))  # fmt: skip
    report.add_ratios(records)
    assert records[1]["ratio_to_keras"] == pytest.approx(2.2 / 3.0) and records[6]["ratio_to_keras"] == 1.0
    assert records[-1]["ratio_to_keras"] == pytest.approx(1.1)
    goals = {g.goal: (g.status, g.detail) for g in report.goal_distributed(records)}
    assert goals["kerasbn synchronized=True: <= 2 cross-replica calls per batch-norm layer per training step"] == (
        "missed", "MultiWorkerMirroredStrategy 2, MirroredStrategy 4"
    )
    # (2.2 - 2.0) / (3.0 - 2.0) on the workers; (2.0 - 1.0) / (2.0 - 1.0) in one process.
    assert goals["2 workers: what synchronizing adds to kerasbn's step <= 1/2 of what it adds to stock's"] == (
        "met", "MultiWorkerMirroredStrategy 0.20 of stock's, MirroredStrategy 1.00 of stock's"
    )
    status, detail = goals["kerasbn inference: 0 cross-replica calls per step and time <= stock's"]
    assert status == "missed" and detail.endswith("calls per step MultiWorkerMirroredStrategy 0, MirroredStrategy 53")
    assert goals["Unknown batch (no drop_remainder): kerasbn's rank-2 train step <= 1.05x the known batch's"][0] == (
        "missed"
    )
    table = "\n".join(report.distributed_table(records))
    assert "| MultiWorkerMirroredStrategy | train_step | kerasbn_sync | 2200 | 0.73x | 109 | 2 | 0.20 |" in table
    assert "| - | train_step | kerasbn/batch None | 1100 | 1.10x | - | - | - |" in table
    assert all(g.status == "not evaluated" for g in report.goal_distributed(records[:1]))


def test_without_batch_norm_replaces_every_batch_norm_in_nested_models():
    keras = pytest.importorskip("keras")
    import kerasbn
    from bench.models_suite import count_batch_norms, without_batch_norm

    inner = keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(3, 1), kerasbn.BatchNorm()], name="inner")
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.BatchNormalization()(inner(inputs))
    model = keras.Model(inputs, keras.layers.ReLU()(x))
    bound = without_batch_norm(model)
    assert count_batch_norms(model) == 2 and count_batch_norms(bound) == 0
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 2)).astype("float32")
    kernel, bias = inner.layers[0].get_weights()
    bound.get_layer("inner").layers[0].set_weights([kernel, bias])
    # Conv (1x1) then ReLU: both batch norms are gone, in training mode too.
    expected = np.maximum(np.einsum("nhwc,cd->nhwd", x, kernel[0, 0]) + bias, 0)
    np.testing.assert_allclose(bound(x, training=True).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_resolve_adds_required_suites_in_registry_order():
    import bench

    bench.load_suites()
    assert [s.name for s in resolve(["layer"])] == ["floor", "layer"]
    assert [s.name for s in resolve(["export", "floor"])] == ["floor", "export"]
    assert [s.name for s in resolve([])] == ["floor", "layer", "training", "export", "models", "distributed"]


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
        {"record": "suite", "name": "export", "status": "skipped", "reason": "training.export not available"},
        {"record": "suite", "name": "training", "status": "skipped", "reason": "training.models not available"},
    ]
    (export,) = report.goal_export(records)
    assert (export.status, export.detail) == ("not evaluated", "export suite skipped: training.export not available")
    assert [(g.status, g.detail) for g in report.goal_training(records)] == [
        ("not evaluated", "training suite skipped: training.models not available")
    ] * 2
    assert {g.detail for g in report.goal_layer(records)} == {"layer suite not run"}


def _export_record(implementation, median, batch, minimum=None):
    seconds = [median] if minimum is None else [minimum, median, median * 2]
    record = measurement("export", implementation, (batch, 28, 28, 1), "NHWC", "inference", False, seconds)
    record.update(batch=batch, examples_per_s=batch / record["median_s"], max_abs_logit_diff_to_keras=1e-6)
    return record


def test_export_goal_is_folded_over_unfolded_throughput_at_batch_256():
    records = [
        _export_record("keras", 0.010, 256),
        _export_record("savedmodel_unfolded", 0.0105, 256, minimum=0.009),
        _export_record("savedmodel_folded", 0.008, 256, minimum=0.0075),
        _export_record("savedmodel_unfolded", 0.00096, 1),
        _export_record("savedmodel_folded", 0.0008, 1),
    ]
    report.add_ratios(records)
    (goal,) = report.goal_export(records)
    # Medians 0.0105 / 0.008 = 1.31 >= 1.3: met; the fastest repetitions say 0.009 / 0.0075 = 1.20.
    assert goal.status == "met"
    assert goal.detail == (
        "folded 1.31x the throughput of unfolded at batch 256 (32000 vs 24381 examples/s, 8 vs 10.5 ms; "
        "fastest repetitions 1.20x); batch 1 latency 0.8 vs 0.96 ms (1.20x)"
    )
    records[1] = _export_record("savedmodel_unfolded", 0.0100, 256)
    (goal,) = report.goal_export(records)
    assert goal.status == "missed" and goal.detail.startswith("folded 1.25x the throughput")
    # Only batch 1 measured: the goal has nothing to read.
    (goal,) = report.goal_export(records[3:] + [{"record": "suite", "name": "export", "status": "ok", "reason": ""}])
    assert (goal.status, goal.detail) == ("not evaluated", "no measurements for it in this run")


def test_render_tables_the_export_suite_against_unfolded_and_keras_predict():
    header = {
        "record": "header", "date": "2026-01-02", "host": "box", "started_utc": "2026-01-02T00:00:00+00:00",
        "machine": {"cpu_model": "Test CPU", "cores": 2, "devices": ["CPU:0"], "load_average_at_start": [0.1]},
        "versions": {"python": "3.11"}, "command": "python -m bench", "quick": False,
    }  # fmt: skip
    records = [header, _export_record("keras", 0.010, 256), _export_record("savedmodel_unfolded", 0.012, 256)]
    records.append(_export_record("savedmodel_folded", 0.006, 256))
    records[-1]["load_average"] = [2.5, 3.0, 3.5]
    report.add_ratios(records)
    text = report.render(records)
    assert "| 256 | savedmodel_folded | 6 | 6-6 | 42667 | 2.00x | 0.60x | 1.0e-06 | 2.5, 3.0, 3.5 |" in text
    assert "| 256 | savedmodel_unfolded | 12 | 12-12 | 21333 | 1.00x | 1.20x | 1.0e-06 | - |" in text
    assert "| Folded SavedModel >= 1.3x the throughput of unfolded at batch 256 | met | folded 2.00x" in text


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


# --------------------------------------------------- the op profile's pieces


def test_profile_attribute_splits_overlapping_ops_and_counts_gaps():
    from bench.profile import attribute

    ps = 10**9  # 1 ms in picoseconds
    ops = [(0, 4 * ps, "a:Conv"), (2 * ps, 6 * ps, "b:Mul"), (7 * ps, 8 * ps, "c:Add"), (20 * ps, 30 * ps, "d:Out")]
    ops.append((5 * ps, 5 * ps, "e:Empty"))  # zero length: no time, and not left running
    shares, wall, summed = attribute(ops, [(0, 10 * ps)])
    # 0-2 a alone, 2-4 a and b share, 4-6 b alone, 6-7 nothing, 7-8 c, 8-10 nothing; d is outside.
    expected = {"a:Conv": 3e-3, "b:Mul": 3e-3, "c:Add": 1e-3, "(no op running)": 3e-3}
    assert shares.keys() == expected.keys()
    for name, seconds in expected.items():
        assert shares[name] == pytest.approx(seconds)
    assert wall == pytest.approx(10e-3) and summed == pytest.approx(9e-3)


def test_profile_classify_names_layer_kinds_passes_and_the_rest():
    from bench.profile import classify

    kinds = {"conv1_bn": "bn", "conv1_relu": "activation", "conv1_conv": "conv", "activation_1": "activation"}
    assert classify("resnet50_1/conv1_bn_1/FusedBatchNormV3:_MklNativeFusedBatchNormV3", kinds) == ("bn", "forward")
    assert classify("gradient_tape/resnet50_1/conv1_relu_1/ReluGrad:ReluGrad", kinds) == ("activation", "backward")
    # Keras's train function calls the step as a function: its ops sit under that call's scope.
    assert classify("StatefulPartitionedCall/gradient_tape/m_1/conv1_bn_1/Sum:Sum", kinds) == ("bn", "backward")
    assert classify("lenet_1/activation_1/Sigmoid:Sigmoid", kinds) == ("activation", "forward")
    assert classify("compile_loss/sparse_categorical_crossentropy/Cast:Cast", kinds) == ("loss", "forward")
    assert classify("SGD/AssignSubVariableOp_3:AssignSubVariableOp", kinds) == ("optimizer", "update")
    assert classify("(no op running)", kinds) == ("gaps", "-")
    assert classify("Identity_3:Identity", kinds) == ("other", "forward")
