"""`python -m training.tune`: keras-tuner learning-rate searches, their results files, resume and distribution.

End-to-end searches run `python -m training.tune` in fresh processes on the
real Fashion-MNIST files, tiny: 1,024 training examples (205 held out), 1
epoch, 2-4 trials, so each process takes ~20-40 s on a busy 2-core machine.
Every process is bounded by `timeout -k 5 <s>` and runs in its own process
group, which the test kills and reaps in a `finally`. Flag errors, the result
table helpers and the divergence guard are checked in this process (no
TensorFlow needed for the flag errors).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

from _procs import free_ports, kill_group, run_python, start_python
from training import tune

# Tiny searches: 1,024 examples, batch 64 (13 steps per epoch) and BN momentum
# 0.5, so the moving statistics settle within one epoch and scores differ.
TINY = [
    "--epochs", "1", "--limit-train", "1024", "--batch-size", "64", "--bn-momentum", "0.5",
    "--quiet", "--retrain-epochs", "0", "--no-export",
]
PROCESS_S = 240  # bound of one search process (~20-40 s when the machine is busy)


# ------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def fashion_mnist():
    """Skips end-to-end searches where the Fashion-MNIST files are not installed."""
    from training import data

    try:
        data.load_arrays("train", limit=8)
    except data.DataError as error:
        pytest.skip(f"Fashion-MNIST is not available: {error}")


def _env(extra: Optional[Dict[str, str]] = None) -> Dict[str, Optional[str]]:
    """No keras-tuner cluster variables from the caller's shell; `extra` on top."""
    return {**{k: None for k in os.environ if k.startswith("KERASTUNER_")}, **(extra or {})}


class Search:
    """One `python -m training.tune` process under `timeout -k 5`, in its own process group."""

    def __init__(self, args: List[str], cwd: Path, log_name: str, env: Optional[Dict[str, str]] = None, seconds: int = PROCESS_S):
        self.log = cwd / f"{log_name}.log"
        self.args = args
        self.popen = start_python(
            ["-m", "training.tune", *args], cwd / log_name, env=_env(env), timeout=seconds, cwd=cwd, merge_stderr=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log.read_text()

    def wait(self, seconds: float = PROCESS_S + 10) -> int:
        try:
            return self.popen.wait(seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.args} did not finish in {seconds} s:\n{self.output()[-4000:]}")

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole group (`timeout` and Python), then reap."""
        kill_group(self.popen)


def _finish(search: Search, expected_rc: int = 0) -> str:
    rc = search.wait()
    output = search.output()
    assert rc == expected_rc, f"exit status {rc} (expected {expected_rc}) for {search.args}:\n{output[-5000:]}"
    assert "Traceback" not in output, output[-5000:]
    return output


def _wait_for(predicate, seconds: float, searches: List[Search], what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for search in searches:
            if not search.running():
                pytest.fail(f"{search.log.name} exited ({search.popen.returncode}) while waiting for {what}:\n{search.output()[-4000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {seconds} s waiting for {what}")


def _records(tune_dir: Path) -> Dict[str, Dict]:
    """trial id -> kerasbn_trial.json (written atomically, so safe to read while a search runs)."""
    records = {}
    for path in sorted((tune_dir / tune.PROJECT_NAME).glob(f"trial_*/{tune.RECORD_FILE}")):
        record = json.loads(path.read_text())
        records[record["trial_id"]] = record
    return records


def _read_csv(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _markdown_rows(path: Path) -> List[List[str]]:
    """The body rows of the results table in results.md, as lists of cells."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Rank | Trial | Norm | Learning rate | Batch size |"), lines[0]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines[1:]]


def _keras_tuner_trials(tune_dir: Path) -> Dict[str, Dict]:
    """keras-tuner's own trial.json files: status and score as its oracle recorded them."""
    trials = {}
    for path in (tune_dir / tune.PROJECT_NAME).glob("trial_*/trial.json"):
        state = json.loads(path.read_text())
        trials[state["trial_id"]] = state
    return trials


def _check_results(tune_dir: Path, trials: int, lr_min: float, lr_max: float) -> List[Dict[str, str]]:
    """Checks results.csv against the trial records and keras-tuner's trial files; returns its rows."""
    rows = _read_csv(tune_dir / "results.csv")
    assert len(rows) == trials
    assert sorted(int(row["trial_id"]) for row in rows) == list(range(trials))
    assert [int(row["rank"]) for row in rows] == list(range(1, trials + 1))
    records, kt_trials = _records(tune_dir), _keras_tuner_trials(tune_dir)
    completed = [row for row in rows if row["status"] == "completed"]
    failed = [row for row in rows if row["status"] != "completed"]
    # Sorted by score: completed trials first, best first; then the others by learning rate.
    assert rows[: len(completed)] == completed
    scores = [float(row["best_val_accuracy"]) for row in completed]
    assert scores == sorted(scores, reverse=True)
    assert [float(row["lr"]) for row in failed] == sorted(float(row["lr"]) for row in failed)
    for row in rows:
        record, kt_trial = records[row["trial_id"]], kt_trials[row["trial_id"]]
        lr = float(row["lr"])
        assert lr_min <= lr <= lr_max
        assert lr == pytest.approx(record["hyperparameters"]["lr"], rel=1e-12)
        assert row["status"] == kt_trial["status"].lower()
        if row["status"] == "completed":
            # The score is the best epoch's held-out accuracy, as keras-tuner and the history both say.
            score = float(row["best_val_accuracy"])
            assert 0.0 <= score <= 1.0
            assert score == pytest.approx(kt_trial["score"], rel=1e-9)
            assert score == pytest.approx(max(record["history"]["val_accuracy"]), rel=1e-9)
            assert int(row["epochs"]) == record["history"]["epoch"][-1]
        else:
            assert row["best_val_accuracy"] == ""
            assert row["note"] == record["reason"]
    return rows


# ------------------------------------------------------------------ bad input (no TensorFlow)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr-min", "1", "--lr-max", "0.5"], "`--lr-min` must be smaller than `--lr-max`. Received: lr_min=1.0, lr_max=0.5"),
        (["--lr-min", "0.1", "--lr-max", "0.1"], "`--lr-min` must be smaller than `--lr-max`. Received: lr_min=0.1, lr_max=0.1"),
        (["--lr-min", "0"], "`--lr-min` must be a positive finite number. Received: lr_min=0.0"),
        (["--lr-min", "-1", "--lr-max", "-0.5"], "`--lr-min` must be a positive finite number. Received: lr_min=-1.0"),
        (["--lr-max", "-2"], "`--lr-max` must be a positive finite number. Received: lr_max=-2.0"),
        (["--lr-max", "inf"], "`--lr-max` must be a positive finite number. Received: lr_max=inf"),
        (["--max-trials", "0"], "`--max-trials` must be a positive integer. Received: max_trials=0"),
        (["--max-trials", "-3"], "`--max-trials` must be a positive integer. Received: max_trials=-3"),
        (["--epochs", "0"], "`--epochs` must be a positive integer. Received: epochs=0"),
        (["--val-fraction", "1"], "`--val-fraction` must be in (0, 1). Received: val_fraction=1.0"),
        (["--name", "a/b"], "`--name` must be a plain folder name (no '/'). Received: name='a/b'"),
        (["--batch-size", "0"], "`--batch-size` must be a positive integer. Received: batch_size=0"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tune.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_unknown_tuner_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tune.main(["--tuner", "grid"])
    assert exit_info.value.code == 2
    assert "argument --tuner: invalid choice: 'grid' (choose from 'random', 'hyperband', 'bayesian')" in capsys.readouterr().err


def test_multi_worker_strategy_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert tune.main(["--strategy", "multi-worker"]) == 2
    assert "`--strategy multi-worker` is not supported for tuning" in capsys.readouterr().err


def test_incomplete_keras_tuner_environment_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.delenv("KERASTUNER_ORACLE_PORT", raising=False)
    monkeypatch.delenv("KERASTUNER_TUNER_ID", raising=False)
    assert tune.main([]) == 2
    assert capsys.readouterr().err == (
        "error: Distributed tuning needs KERASTUNER_ORACLE_PORT, KERASTUNER_TUNER_ID as well as "
        "KERASTUNER_ORACLE_IP. Received: KERASTUNER_ORACLE_IP='127.0.0.1'\n"
    )


def test_resuming_a_folder_with_other_search_settings_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    import dataclasses

    from training.config import TrainConfig

    folder = tmp_path / "runs" / "tune-mine"
    folder.mkdir(parents=True)
    old = {"search": dataclasses.asdict(tune.TuneConfig(lr_max=5.0, name="mine")), "train": dataclasses.asdict(TrainConfig())}
    (folder / "tune_config.json").write_text(json.dumps(old))
    assert tune.main(["--name", "mine", "--lr-max", "10", "--norm", "none"]) == 2
    assert capsys.readouterr().err == (
        f"error: {os.path.join('runs', 'tune-mine')} holds a search with other settings "
        "(search.lr_max: 5.0 -> 10.0, train.norm: 'kerasbn' -> 'none'); resume it with its own settings, "
        "choose another --name, or pass --overwrite to start afresh.\n"
    )


def test_command_line_errors_print_no_traceback(tmp_path):
    for argv, expected in (
        (["--lr-min", "1", "--lr-max", "0.1"], "error: `--lr-min` must be smaller than `--lr-max`. Received: lr_min=1.0, lr_max=0.1\n"),
        (["--tuner", "grid"], "invalid choice: 'grid'"),
    ):
        result = run_python(["-m", "training.tune", *argv], env=_env(), timeout=120, check=False, cwd=tmp_path)
        assert result.returncode == 2
        assert expected in result.stderr
        assert "Traceback" not in result.stderr
        assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ pieces, in this process


def _row(trial_id, lr, score, status="completed", note=""):
    return {
        "trial_id": trial_id, "status": status, "norm": "kerasbn", "lr": lr, "batch_size": 256, "bn_momentum": 0.9,
        "best_val_accuracy": score, "epochs": 2, "best_epoch": 2, "seconds": 1.0, "tuner_id": "tuner0", "note": note,
    }


def test_results_sort_by_score_then_failed_by_learning_rate():
    rows = [
        _row("0", 0.01, 0.50),
        _row("1", 50.0, None, "failed", "diverged: training loss nan at epoch 1, step 3"),
        _row("2", 0.30, 0.81),
        _row("3", 3.00, 0.81),  # a tie: the smaller learning rate ranks first
        _row("4", 20.0, None, "failed", "diverged: training loss 40 > 23.03"),
    ]
    ordered = tune.sort_results(rows)
    assert [row["trial_id"] for row in ordered] == ["2", "3", "0", "4", "1"]
    assert [row["rank"] for row in ordered] == [1, 2, 3, 4, 5]
    best = tune.best_hyperparameters(ordered, tune.TuneConfig())
    assert best == {
        "trial_id": "2", "lr": 0.30, "batch_size": 256, "bn_momentum": 0.9, "norm": "kerasbn",
        "best_val_accuracy": 0.81, "epochs": 2, "objective": "val_accuracy", "tuner": "random",
    }
    assert tune.best_hyperparameters(tune.sort_results([rows[1], rows[4]]), tune.TuneConfig()) is None


def test_results_markdown_table(tmp_path):
    ordered = tune.sort_results([_row("0", 0.0123456, 0.5), _row("1", 42.0, None, "failed", "diverged: loss | nan")])
    path = tmp_path / "results.md"
    path.write_text(tune.results_markdown(ordered, "A title", ["Best: trial 0."]))
    text = path.read_text()
    assert text.startswith("# A title\n\n")
    assert text.endswith("\nBest: trial 0.\n")
    assert _markdown_rows(path) == [
        ["1", "0", "kerasbn", "0.01235", "256", "0.9", "0.5000", "2", "completed", "-"],
        ["2", "1", "kerasbn", "42", "256", "0.9", "-", "2", "failed", "diverged: loss / nan"],
    ]


def test_plot_has_one_series_per_norm(tmp_path):
    import matplotlib.image

    rows = [_row("0", 0.01, 0.5), _row("1", 1.0, 0.8), {**_row("2", 0.1, 0.1), "norm": "none"}, {**_row("3", 30.0, None, "failed"), "norm": "none"}]
    path = tmp_path / "plot.png"
    tune.plot_lr_vs_accuracy(str(path), tune.sort_results(rows), "title")
    image = matplotlib.image.imread(str(path))
    assert image.shape[0] > 200 and image.shape[1] > 300
    assert not list(tmp_path.glob(".tmp-*"))


def test_divergence_guard_stops_on_non_finite_loss_or_exploding_epoch_mean():
    from training import tuner_classes as parts

    guard = parts.DivergenceGuard(23.03)
    guard.on_epoch_begin(1)
    guard.on_train_batch_end(4, {"loss": 2.30})
    guard.on_train_batch_end(5, {"loss": 500.0})  # a spike within an epoch is not yet divergence
    with pytest.raises(parts.TrialDiverged, match=r"^diverged: training loss became nan at epoch 2, step 7$") as error:
        guard.on_train_batch_end(6, {"loss": float("nan")})
    assert error.value.epoch == 2
    guard.on_epoch_end(1, {"loss": 23.0, "val_accuracy": 0.1})
    with pytest.raises(
        parts.TrialDiverged, match=r"^diverged: mean training loss 40 over epoch 2 > 23.03 \(--divergence-loss\)$"
    ) as error:
        guard.on_epoch_end(1, {"loss": 40.0})
    assert error.value.epoch == 2
    unbounded = parts.DivergenceGuard(0.0)
    unbounded.on_epoch_end(0, {"loss": 1e30})
    with pytest.raises(parts.TrialDiverged, match="became inf at epoch 1, step 1"):
        unbounded.on_train_batch_end(0, {"loss": math.inf})
    # keras-tuner marks a FailedTrialError FAILED at once, without retries.
    import keras_tuner

    assert issubclass(parts.TrialDiverged, keras_tuner.errors.FailedTrialError)


def test_search_split_holds_out_part_of_the_training_set_only(fashion_mnist):
    from training import data
    from training.config import TrainConfig

    (x_fit, y_fit), (x_val, y_val) = tune.search_split(tune.TuneConfig(search_examples=500, val_fraction=0.2), TrainConfig(limit_train=1000, seed=3))
    assert (len(y_fit), len(y_val)) == (400, 100)
    assert x_fit.shape == (400, 28, 28, 1) and x_fit.dtype == np.float32
    assert 0.0 <= x_fit.min() and x_fit.max() <= 1.0
    images, labels = data.load_arrays("train", limit=500)  # min(--limit-train, --search-examples)
    raw = np.concatenate([x_fit, x_val])[..., 0] * 255.0
    # Together the two parts are exactly the first 500 training examples, each once.
    key = lambda x: x.reshape(len(x), -1).round().astype(np.uint8).tobytes()  # noqa: E731
    assert sorted(key(raw[i : i + 1]) for i in range(500)) == sorted(key(images[i : i + 1].astype(np.float32)) for i in range(500))
    assert sorted(np.concatenate([y_fit, y_val]).tolist()) == sorted(labels.tolist())
    again = tune.search_split(tune.TuneConfig(search_examples=500, val_fraction=0.2), TrainConfig(limit_train=1000, seed=3))
    np.testing.assert_array_equal(again[1][0], x_val)


# ------------------------------------------------------------------ end-to-end searches


@pytest.mark.slow
def test_random_search_compares_norms_writes_results_retrains_and_exports(fashion_mnist, tmp_path):
    """Random search over lr in [0.01, 1000] with and without BN: the results files, then the retrained, exported best.

    With --seed 5 keras-tuner 1.4 draws lr 92.6 (kerasbn), 7.2 (kerasbn) and
    0.034 (none): both norms, and one trial whose loss explodes.
    """
    args = [
        *TINY, "--tuner", "random", "--max-trials", "3", "--compare-norms", "--lr-min", "0.01", "--lr-max", "1000",
        "--seed", "5", "--name", "cmp", "--retrain-epochs", "1", "--export", "--export-dir", "exported",
    ]
    output = _finish(Search(args, tmp_path, "random"))
    tune_dir = tmp_path / "runs" / "tune-cmp"
    rows = _check_results(tune_dir, trials=3, lr_min=0.01, lr_max=1000)
    assert {row["norm"] for row in rows} == {"kerasbn", "none"}
    assert [row["status"] for row in rows] == ["completed", "completed", "failed"]
    assert rows[2]["note"].startswith("diverged: mean training loss ")
    assert float(rows[2]["lr"]) > 10.0  # only a large step blows the loss past 10x chance
    for row in rows:
        assert row["batch_size"] == "64"
        assert row["bn_momentum"] == ("0.5" if row["norm"] == "kerasbn" else "")

    # results.md holds the same table, in the same order.
    markdown = _markdown_rows(tune_dir / "results.md")
    assert [cells[:3] for cells in markdown] == [[row["rank"], row["trial_id"], row["norm"]] for row in rows]
    assert [cells[8] for cells in markdown] == [row["status"] for row in rows]
    for cells, row in zip(markdown, rows):
        assert float(cells[3]) == pytest.approx(float(row["lr"]), rel=1e-3)
        if row["best_val_accuracy"]:
            assert float(cells[6]) == pytest.approx(float(row["best_val_accuracy"]), abs=5e-5)

    best = json.loads((tune_dir / "best_hyperparameters.json").read_text())
    first = rows[0]
    assert first["status"] == "completed"
    assert best["trial_id"] == first["trial_id"] and best["norm"] == first["norm"]
    assert best["lr"] == pytest.approx(float(first["lr"]), rel=1e-12)
    assert best["best_val_accuracy"] == pytest.approx(float(first["best_val_accuracy"]), rel=1e-12)
    assert best["batch_size"] == 64

    # The plot, and the best configuration retrained on all 1,024 examples by training.train.
    assert (tune_dir / "lr_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    retrained = json.loads((tune_dir / "best" / "config.json").read_text())["settings"]
    assert retrained["lr"] == pytest.approx(best["lr"], rel=1e-12)
    assert (retrained["norm"], retrained["batch_size"], retrained["epochs"], retrained["limit_train"]) == (best["norm"], 64, 1, 1024)
    summary = json.loads((tune_dir / "summary.json").read_text())
    assert summary["trials"] == 3 and summary["best"] == best
    assert 0.0 <= summary["retrain"]["test_acc"] <= 1.0
    assert f"test accuracy {summary['retrain']['test_acc']:.4f}" in (tune_dir / "results.md").read_text()
    assert summary["export"] == os.path.join("exported", "lenet_bn_tuned", "1")
    assert (tmp_path / summary["export"] / "saved_model.pb").is_file()
    assert "Exported" in output


@pytest.mark.slow
@pytest.mark.parametrize("tuner_name, trials", [("hyperband", 4), ("bayesian", 4)])
def test_hyperband_and_bayesian_searches(fashion_mnist, tmp_path, tuner_name, trials):
    """Hyperband with 3 epochs: 3 one-epoch trials, then the best continued to epoch 3. Bayesian: 3 random points, then one from its GP."""
    epochs = "3" if tuner_name == "hyperband" else "1"
    args = [*TINY, "--tuner", tuner_name, "--max-trials", str(trials), "--epochs", epochs, "--name", tuner_name]
    _finish(Search(args, tmp_path, tuner_name))
    tune_dir = tmp_path / "runs" / f"tune-{tuner_name}"
    rows = _check_results(tune_dir, trials=trials, lr_min=1e-3, lr_max=10.0)
    assert all(row["status"] == "completed" for row in rows)
    records = _records(tune_dir)
    if tuner_name == "hyperband":
        first_round = [records[str(i)] for i in range(3)]
        assert [(r["initial_epoch"], r["epochs"]) for r in first_round] == [(0, 1)] * 3
        # The second round continues the best first-round trial from its checkpoint, to epoch 3.
        promoted = records["3"]
        assert (promoted["initial_epoch"], promoted["epochs"], promoted["history"]["epoch"]) == (1, 3, [2, 3])
        parent = records[promoted["hyperparameters"]["tuner/trial_id"]]
        assert parent["best_val_accuracy"] == max(r["best_val_accuracy"] for r in first_round)
        assert promoted["hyperparameters"]["lr"] == parent["hyperparameters"]["lr"]
    else:
        assert len({row["lr"] for row in rows}) == trials  # four distinct learning rates


@pytest.mark.slow
def test_diverged_trials_are_failed_with_their_reason_and_the_search_goes_on(fashion_mnist, tmp_path):
    """lr >= 1000 without BN: the first epoch's mean loss is in the hundreds, over 10 x chance. Four such
    trials in a row: more than keras-tuner's limit of 3 consecutive failures, yet the search runs them all."""
    args = [*TINY, "--norm", "none", "--lr-min", "1000", "--lr-max", "10000", "--max-trials", "4", "--name", "nan"]
    search = Search(args, tmp_path, "diverge")
    rc = search.wait()
    output = search.output()
    assert rc == 1, output[-4000:]
    assert "error: no trial completed, so there is nothing to retrain" in output
    assert "Traceback" not in output
    tune_dir = tmp_path / "runs" / "tune-nan"
    rows = _check_results(tune_dir, trials=4, lr_min=1000, lr_max=10000)
    for row in rows:
        assert row["status"] == "failed"
        assert row["note"].startswith("diverged: mean training loss ")
        assert row["note"].endswith(" over epoch 1 > 23.03 (--divergence-loss)")
        assert float(row["note"].split()[4]) > 100.0
        assert f"Trial {row['trial_id']} {row['note']}" in output
    assert not (tune_dir / "best_hyperparameters.json").exists()
    assert (tune_dir / "lr_vs_accuracy.png").is_file()


@pytest.mark.slow
def test_killed_search_resumes_without_redoing_finished_trials(fashion_mnist, tmp_path):
    args = [*TINY, "--max-trials", "3", "--name", "resume"]
    tune_dir = tmp_path / "runs" / "tune-resume"
    first = Search(args, tmp_path, "first")
    try:
        # Kill (SIGKILL) as soon as trial 1 has started, i.e. mid-trial.
        _wait_for(lambda: _records(tune_dir).get("1", {}).get("status") == "running", 200, [first], "trial 1 to start")
    finally:
        first.kill()
    before = _records(tune_dir)
    assert before["0"]["status"] == "completed" and before["1"]["status"] == "running"
    assert "2" not in before

    second = Search(args, tmp_path, "second")
    output = _finish(second)
    assert "Reloading Tuner from" in output
    after = _records(tune_dir)
    assert after["0"] == before["0"]  # the finished trial was not run again
    assert after["1"]["status"] == after["2"]["status"] == "completed"
    assert after["1"]["pid"] != before["1"]["pid"]  # the interrupted trial was rerun by the second process
    assert after["1"]["pid"] == after["2"]["pid"]
    assert after["1"]["hyperparameters"] == before["1"]["hyperparameters"]
    rows = _check_results(tune_dir, trials=3, lr_min=1e-3, lr_max=10.0)
    assert all(row["status"] == "completed" for row in rows)

    # --overwrite starts afresh: the old trials are gone.
    _finish(Search([*TINY, "--max-trials", "1", "--name", "resume", "--overwrite"], tmp_path, "third"))
    assert "Reloading Tuner from" not in (tmp_path / "third.log").read_text()
    assert sorted(_records(tune_dir)) == ["0"]
    assert len(_read_csv(tune_dir / "results.csv")) == 1


def _distributed_env(port: int, tuner_id: str) -> Dict[str, str]:
    return {"KERASTUNER_TUNER_ID": tuner_id, "KERASTUNER_ORACLE_IP": "127.0.0.1", "KERASTUNER_ORACLE_PORT": str(port)}


@pytest.mark.slow
def test_distributed_chief_and_two_workers_share_one_search(fashion_mnist, tmp_path):
    port, trials = free_ports(1)[0], 4
    args = [*TINY, "--max-trials", str(trials), "--name", "dist"]
    searches = []
    try:
        chief = Search(args, tmp_path, "chief", _distributed_env(port, "chief"))
        searches.append(chief)
        workers = [Search(args, tmp_path, name, _distributed_env(port, name)) for name in ("tuner0", "tuner1")]
        searches.extend(workers)
        for worker in workers:
            assert "no trials left, done." in _finish(worker)
        chief_output = _finish(chief)
    finally:
        for search in searches:
            search.kill()
    assert "Chief oracle serving on 127.0.0.1" in chief_output
    tune_dir = tmp_path / "runs" / "tune-dist"
    rows = _check_results(tune_dir, trials=trials, lr_min=1e-3, lr_max=10.0)
    assert all(row["status"] == "completed" for row in rows)
    # Both workers ran trials of the one search; the chief ran none, and only it wrote the results.
    assert {row["tuner_id"] for row in rows} == {"tuner0", "tuner1"}
    assert f"Results: {os.path.join('runs', 'tune-dist')}/results.md ({trials} trials, {trials} completed)" in chief_output
    for worker in workers:
        assert "Results:" not in worker.output()


@pytest.mark.slow
def test_distributed_worker_killed_mid_trial_is_waited_for_and_restarted(fashion_mnist, tmp_path):
    port, trials = free_ports(1)[0], 3
    args = [*TINY, "--max-trials", str(trials), "--name", "restart"]
    tune_dir = tmp_path / "runs" / "tune-restart"
    searches = []
    try:
        chief = Search(args, tmp_path, "chief", _distributed_env(port, "chief"))
        worker0 = Search(args, tmp_path, "tuner0", _distributed_env(port, "tuner0"))
        worker1 = Search(args, tmp_path, "tuner1", _distributed_env(port, "tuner1"))
        searches.extend([chief, worker0, worker1])

        def tuner1_trial():
            running = [r for r in _records(tune_dir).values() if r["tuner_id"] == "tuner1" and r["status"] == "running"]
            return running[0]["trial_id"] if running else None

        killed_trial = _wait_for(tuner1_trial, 200, [chief, worker1], "tuner1 to start a trial")
        worker1.kill()
        killed_record = _records(tune_dir)[killed_trial]
        assert killed_record["status"] == "running"  # killed mid-trial

        # tuner0 runs every other trial and leaves; the chief keeps waiting for tuner1's trial.
        _finish(worker0)
        time.sleep(5)
        assert chief.running(), chief.output()[-3000:]
        assert _records(tune_dir)[killed_trial]["status"] == "running"

        restarted = Search(args, tmp_path, "tuner1-again", _distributed_env(port, "tuner1"))
        searches.append(restarted)
        _finish(restarted)
        _finish(chief)
    finally:
        for search in searches:
            search.kill()
    records = _records(tune_dir)
    assert records[killed_trial]["status"] == "completed"
    assert records[killed_trial]["tuner_id"] == "tuner1"
    assert records[killed_trial]["pid"] != killed_record["pid"]  # finished by the restarted process
    rows = _check_results(tune_dir, trials=trials, lr_min=1e-3, lr_max=10.0)
    assert all(row["status"] == "completed" for row in rows)


@pytest.mark.slow
def test_trials_train_under_the_strategy_on_two_cpu_replicas(fashion_mnist, tmp_path):
    """--cpu-replicas 2: every trial's weights are mirrored on both logical CPUs (built in the strategy's scope)."""
    args = [*TINY, "--max-trials", "2", "--cpu-replicas", "2", "--name", "mirrored"]
    output = _finish(Search(args, tmp_path, "mirrored"))
    assert "MirroredStrategy on 2 replica(s) (CPU:0, CPU:1)" in output
    tune_dir = tmp_path / "runs" / "tune-mirrored"
    config = json.loads((tune_dir / "tune_config.json").read_text())
    assert config["strategy"] == "MirroredStrategy on 2 replica(s) (CPU:0, CPU:1)"
    records = _records(tune_dir)
    assert sorted(records) == ["0", "1"]
    assert [records[t]["replicas"] for t in ("0", "1")] == [2, 2]
    rows = _check_results(tune_dir, trials=2, lr_min=1e-3, lr_max=10.0)
    assert all(row["status"] == "completed" for row in rows)
