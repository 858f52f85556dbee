"""training.exercises: the chapter's exercises (quick runs end to end, resume, the bias measurement, bad flags)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import keras
from conftest import tf_only
from training import models
from training.exercises import EXERCISES, ExercisesConfig, main, measure, runner
from training.exercises import report as exercise_report


def _records(out):
    return json.loads((out / "results.json").read_text())


def _counts(stdout: str):
    match = re.search(r"(\d+) runs trained, (\d+) reused from finished runs, (\d+) records kept", stdout)
    assert match, stdout[-2000:]
    return tuple(int(g) for g in match.groups())


@pytest.mark.slow
def test_quick_run_of_every_exercise(run_python, tmp_path):
    out = tmp_path / "exercises"
    result = run_python(["-m", "training.exercises", "--quick", "--out", out], timeout=900)
    records = _records(out)
    for key, exercise in EXERCISES.items():
        names = {r["variant"] for r in records if r["exercise"] == key}
        assert names == {v.name for v in exercise.variants}, key
    assert len(records) == sum(len(e.variants) for e in EXERCISES.values())
    for record in records:
        assert record["seed"] == 0 and len(record["history"]) == 1
        for key in ("test_acc", "train_acc", "train_acc_eval", "seconds", "step_ms"):
            assert math.isfinite(record[key]) and record[key] >= 0, (record["variant"], key)
        assert 0.0 <= record["test_acc"] <= 1.0
        assert record["params"] > 40000
        has_bn = record["settings"].get("norm", "kerasbn") in models.BATCH_NORMS
        assert (record["test_acc_moving"] is not None) == has_bn, record["variant"]
    # The recipe's configuration, shared by five exercises, was trained once.
    recipe_dirs = {r["run_dir"] for r in records if r["settings"] == {}}
    assert len(recipe_dirs) == 1
    distinct = {r["run_dir"] for r in records}
    assert _counts(result.stdout) == (len(distinct), len(records) - len(distinct), 0)
    # Without a bias before BN: fewer parameters, the same accuracy (the bias never mattered).
    bias = {r["variant"]: r for r in records if r["exercise"] == "bias"}
    with_bias, without = bias["biases before BN (recipe)"], bias["no bias before BN"]
    assert with_bias["params"] - without["params"] == 6 + 16 + 120 + 84
    assert abs(with_bias["test_acc"] - without["test_acc"]) < 0.02
    for row in with_bias["bias_gradients"]["layers"]:
        if row["before_norm"]:
            assert row["bias_grad_rms_start"] < 1e-3 * row["kernel_grad_rms_start"], row
    step_times = json.loads((out / "step_times.json").read_text())["ms_per_step"]
    assert set(step_times) >= {"DecorrelatedBatchNorm (ZCA)", "LayerNormalization", "GroupNormalization"}
    report = (out / "results.md").read_text()
    for key in EXERCISES:
        assert f"## {key}" in report
        assert (out / f"{key}.png").stat().st_size > 10000
    assert (out / "summary.png").stat().st_size > 10000


@pytest.mark.slow
def test_a_repeated_command_reruns_nothing_and_overwrite_starts_afresh(run_python, tmp_path):
    out = tmp_path / "frozen"
    command = ["-m", "training.exercises", "--quick", "--exercise", "frozen-affine", "--out", out]
    first = run_python(command, timeout=600)
    assert _counts(first.stdout) == (2, 0, 0)
    before = _records(out)
    again = run_python(command, timeout=600)
    assert _counts(again.stdout) == (0, 0, 2)
    assert _records(out) == before  # same records, same finish times: nothing was redone
    # A results file that lost a record (a run killed before writing it) trains nothing: the run folder is finished.
    (out / "results.json").write_text(json.dumps(before[:1]))
    partial = run_python(command, timeout=600)
    assert _counts(partial.stdout) == (0, 1, 1)
    fresh = run_python(command + ["--overwrite"], timeout=600)
    assert _counts(fresh.stdout) == (2, 0, 0)
    assert len(_records(out)) == 2


def test_shared_configurations_share_one_run_folder():
    config = ExercisesConfig()
    variants = {(e.key, v.name): v for e in EXERCISES.values() for v in e.variants}
    folder = {k: runner.run_folder("out", config.train_config(v, 1)) for k, v in variants.items()}
    recipe = folder[("bias", "biases before BN (recipe)")]
    for key in [("dropout", "BN only (recipe)"), ("learning-rate", "BN, lr 1"), ("other-norms", "BatchNorm, moving averages")]:
        assert folder[key] == recipe
    assert folder[("placement", "none, lr 1.0")] == folder[("dropout", "neither")] == folder[("learning-rate", "no BN, lr 1")]
    assert len({folder[k] for k in folder}) == len({runner.config_hash(config.train_config(v, 1)) for v in variants.values()})
    assert folder[("learning-rate", "BN, lr 0.1")] != recipe
    assert runner.run_folder("out", config.train_config(variants[("bias", "no bias before BN")], 2)) != folder[("bias", "no bias before BN")]
    assert recipe.endswith(f"recipe-seed1-{runner.config_hash(config.train_config(variants[('bias', 'biases before BN (recipe)')], 1))}")


@tf_only
@pytest.mark.parametrize("norm", ["kerasbn", "keras", "decorrelated"])
def test_the_gradient_reaching_a_bias_before_batch_norm_is_zero_up_to_rounding(norm):
    keras.utils.set_random_seed(3)
    model = models.build_lenet(norm)
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(128, 28, 28, 1)).astype("float32")
    labels = rng.integers(0, 10, size=128)
    moving = [keras.ops.convert_to_numpy(v) for v in model.non_trainable_variables]
    rows = {row["layer"]: row for row in measure.bias_gradients(model, images, labels)}
    assert set(rows) == {"conv1", "conv2", "dense1", "dense2", "logits"}
    for name in ("conv1", "conv2", "dense1", "dense2"):
        assert rows[name]["before_norm"]
        assert rows[name]["kernel_grad_rms"] > 1e-5
        assert rows[name]["bias_grad_rms"] < 1e-4 * rows[name]["kernel_grad_rms"], rows[name]
    assert not rows["logits"]["before_norm"] and rows["logits"]["bias_grad_rms"] > 1e-3
    # The measurement's training-mode pass leaves the moving statistics as they were.
    for before, variable in zip(moving, model.non_trainable_variables):
        np.testing.assert_array_equal(before, keras.ops.convert_to_numpy(variable))


@tf_only
def test_without_batch_norm_the_same_biases_get_real_gradients():
    keras.utils.set_random_seed(3)
    model = models.build_lenet("none")
    rng = np.random.default_rng(0)
    rows = measure.bias_gradients(
        model, rng.uniform(size=(64, 28, 28, 1)).astype("float32"), rng.integers(0, 10, size=64)
    )
    for row in rows:
        assert not row["before_norm"]
        assert row["bias_grad_rms"] > 1e-2 * row["kernel_grad_rms"], row


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--exercise", "batchnorm"], "`--exercise` must be 'all' or among bias, learning-rate"),
        (["--exercise", "bias,nope"], "Received: exercise='bias,nope'"),
        (["--seeds", "0"], "`--seeds` must be a positive integer. Received: seeds=0"),
        (["--epochs", "-2"], "`--epochs` must be a positive integer. Received: epochs=-2"),
    ],
)
def test_bad_flags_exit_2_with_a_message(flags, message, capsys):
    assert main(flags) == 2
    assert message in capsys.readouterr().err


def test_bad_flags_exit_code_from_the_command_line(run_python):
    result = run_python(["-m", "training.exercises", "--seeds", "0"], check=False, timeout=120)
    assert result.returncode == 2
    assert "Received: seeds=0" in result.stderr


def _layer_names(model):
    return [layer.name for layer in model.layers]


def test_lenet_variants_for_the_exercises():
    recipe = models.build_lenet()
    assert [n for n in _layer_names(recipe) if n.startswith("bn")] == ["bn1", "bn2", "bn3", "bn4"]
    assert all(recipe.get_layer(n).use_bias for n in ("conv1", "conv2", "dense1", "dense2"))

    no_bias = models.build_lenet(bias=False)
    assert not any(no_bias.get_layer(n).use_bias for n in ("conv1", "conv2", "dense1", "dense2"))
    assert no_bias.get_layer("logits").use_bias
    # Without a normalization after it, a layer keeps its bias whatever --no-bias says.
    conv_only = models.build_lenet(norm_places="conv", bias=False)
    assert [n for n in _layer_names(conv_only) if n.startswith("bn")] == ["bn1", "bn2"]
    assert conv_only.get_layer("dense1").use_bias and not conv_only.get_layer("conv2").use_bias
    assert [n for n in _layer_names(models.build_lenet(norm_places="first")) if n.startswith("bn")] == ["bn1"]
    assert [n for n in _layer_names(models.build_lenet(norm_places="dense")) if n.startswith("bn")] == ["bn3", "bn4"]

    dropout = models.build_lenet("none", dropout=0.3)
    assert [layer.rate for layer in dropout.layers if isinstance(layer, keras.layers.Dropout)] == [0.3, 0.3]
    assert _layer_names(dropout).index("dropout1") == _layer_names(dropout).index("dense1") + 2

    frozen = models.build_lenet(affine=False)
    assert frozen.count_params() == recipe.count_params() - 2 * (6 + 16 + 120 + 84)
    assert all(not w.trainable for n in ("bn1", "bn4") for w in frozen.get_layer(n).weights)

    group = models.build_lenet("group")
    assert [group.get_layer(n).groups for n in ("bn1", "bn2", "bn3", "bn4")] == [3, 4, 4, 4]
    layer = models.build_lenet("layer")
    assert list(layer.get_layer("bn1").axis) == [-3, -2, -1] and layer.get_layer("bn3").axis in (-1, [-1])
    with pytest.raises(ValueError, match=r"`norm_places` must be one of .* Received: norm_places='middle'"):
        models.build_lenet(norm_places="middle")


def test_spread_formats_mean_and_range():
    assert exercise_report.spread([0.5, 0.7, 0.6]) == "0.6000 (0.5000-0.7000)"
    assert exercise_report.spread([0.25]) == "0.2500"
    assert exercise_report.spread([None, None]) == "-"


def _record(variant, seed, test_acc, exercise="learning-rate"):
    history = [{"epoch": e, "train_acc": test_acc, "test_acc": test_acc} for e in (1, 2)]
    return {
        "exercise": exercise, "variant": variant, "seed": seed, "test_acc": test_acc, "test_acc_moving": None,
        "train_acc_eval": test_acc, "params": 44426, "step_ms": 10.0, "history": history,
    }


def test_report_and_plots_from_records(tmp_path):
    # Three seeds stuck at exactly chance level: their mean differs from them in the last bit.
    records = [_record("no BN, lr 10", seed, 0.1) for seed in range(3)]
    records += [_record("BN, lr 10", seed, acc) for seed, acc in enumerate((0.889, 0.893, 0.8873))]
    exercise_report.write_report(str(tmp_path), records)
    report = (tmp_path / "results.md").read_text()
    assert "| BN, lr 10 | 0.8898 (0.8873-0.8930) | - |" in report
    assert "| no BN, lr 10 | 0.1000 (0.1000-0.1000) |" in report
    assert report.index("BN, lr 10 |") < report.index("no BN, lr 10 |")  # the order of EXERCISES
    assert (tmp_path / "learning-rate.png").stat().st_size > 10000
    assert (tmp_path / "summary.png").stat().st_size > 10000
