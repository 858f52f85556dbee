"""End-to-end tests of the training driver, `python -m training.train`.

Every run is a real subprocess of the command users type, on the real
Fashion-MNIST files (skipped, saying why, where they are missing), with its
run folder under pytest's tmp_path. Runs that several tests read (the short
1- and 2-replica runs, the 1-epoch runs) happen once per session (`Runs`).
The multi-worker workers run the same driver through tests/_train_worker.py,
which also saves each worker's final weights (only the chief writes a run
folder), so that the test can compare them.

Multi-replica runs use logical CPU devices (`--cpu-replicas 2`); the tests hide
GPUs (CUDA_VISIBLE_DEVICES="") so that "1 replica" and "2 CPU replicas" mean
the same on every machine. Multi-process runs are bounded by
`timeout -k 5 SECONDS`, since TensorFlow catches SIGTERM and a worker whose
peer is gone waits for ever; their process groups are killed in a `finally`.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

from _procs import WORKER_ENV, kill_group, logs, run_python, run_workers, start_python
from training import data as fmnist
from training.config import TrainConfig
from training.train import HISTORY_COLUMNS

RUN_TIMEOUT = 420  # seconds for one short run; ~10 s on a quiet 2-core machine, much more when it is busy
HISTORY_KEYS = set(HISTORY_COLUMNS)
# The env of every run: GPUs hidden (see the module docstring), no stray cluster config.
RUN_ENV = WORKER_ENV

FINAL_LINE = re.compile(
    r"^loss (?P<loss>\d+\.\d{3}), train acc (?P<train_acc>[01]\.\d{3}), test acc (?P<test_acc>[01]\.\d{3})"
    r" \(moving averages (?P<moving>[01]\.\d{3}), recomputed over (?P<batches>\d+) batches\),"
    r" (?P<speed>\d+\.\d) examples/sec on (?P<devices>.+)$"
)
RESUMING = re.compile(r"Resuming from the checkpoint of epoch (\d+) in (.+)")


# ------------------------------------------------------------------ data


def _data_folder() -> Optional[Path]:
    """The folder the driver reads by default, if it holds all four IDX files."""
    folder = os.environ.get(fmnist.DATA_DIR_ENV) or fmnist.DEFAULT_DATA_DIR
    if folder == fmnist.TFDS_SOURCE:
        return None
    names = [name for split in fmnist.SPLITS for name in fmnist.FILES[split]]
    return Path(folder) if all((Path(folder) / name).is_file() for name in names) else None


DATA_FOLDER = _data_folder()
needs_data = pytest.mark.skipif(
    DATA_FOLDER is None,
    reason=(
        f"the Fashion-MNIST IDX files are not in ${fmnist.DATA_DIR_ENV} or {fmnist.DEFAULT_DATA_DIR} "
        "(`make test` installs Debian's dataset-fashion-mnist where apt is available)"
    ),
)


# ------------------------------------------------------------------ runs


def train(args: Sequence[str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """`python -m training.train ARGS` in a fresh process; returns it whatever its exit status."""
    return run_python(["-m", "training.train", *args], env=RUN_ENV, timeout=timeout, check=False)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"


@dataclasses.dataclass
class Run:
    """A finished run: its folder and what it printed."""

    out: Path
    args: List[str]
    result: subprocess.CompletedProcess

    @property
    def history(self) -> List[Dict]:
        return json.loads((self.out / "history.json").read_text())

    @property
    def summary(self) -> Dict:
        return json.loads((self.out / "summary.json").read_text())

    @property
    def config(self) -> Dict:
        return json.loads((self.out / "config.json").read_text())


class Runs:
    """Runs shared by several tests, each made once per session and kept under one tmp folder."""

    def __init__(self, root: Path):
        self.root = root
        self._runs: Dict[str, Run] = {}

    def get(self, name: str, args: Sequence[str]) -> Run:
        if name not in self._runs:
            out = self.root / name
            full_args = [*args, "--out", str(out), "--no-export"]
            result = train(full_args)
            assert result.returncode == 0, f"run {name} failed: {_explain(result)}"
            self._runs[name] = Run(out, full_args, result)
        run = self._runs[name]
        assert run.args[: len(args)] == list(args), f"run {name!r} was made with other flags"
        return run


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("train-runs"))


# The short end-to-end runs of the issue (2048 examples = 8 steps of 256 per epoch).
SHORT = ["--limit-train", "2048", "--epochs", "2"]
ONE_REPLICA = SHORT  # not --quiet: the progress output is checked
TWO_REPLICAS = [*SHORT, "--cpu-replicas", "2", "--strategy", "mirrored", "--quiet"]
# One epoch of the same (8 steps), for the seed and sync-BN comparisons.
ONE_EPOCH = ["--limit-train", "2048", "--epochs", "1", "--quiet"]


def _one_replica(runs: Runs) -> Run:
    return runs.get("one-replica", ONE_REPLICA)


def _two_replicas(runs: Runs) -> Run:
    return runs.get("two-replicas", TWO_REPLICAS)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _load_model(path: Path):
    import keras

    import kerasbn  # noqa: F401  registers kerasbn>BatchNorm for deserialization

    return keras.saving.load_model(path)


def _test_accuracy(model) -> float:
    images, labels = fmnist.load_arrays("test")
    x = images[..., None].astype(np.float32) / 255.0
    predictions = np.argmax(model.predict(x, batch_size=1000, verbose=0), axis=-1)
    return float(np.mean(predictions == labels))


def _scalars(tensorboard_dir: Path) -> Dict[str, Dict[int, float]]:
    """{tag: {step: value}} from every events file in the folder."""
    import tensorflow as tf

    found: Dict[str, Dict[int, float]] = {}
    for path in sorted(tensorboard_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return found


def _check_history(history: List[Dict], epochs: int) -> None:
    assert [row["epoch"] for row in history] == list(range(1, epochs + 1))
    for row in history:
        assert set(row) == HISTORY_KEYS, row
        for key in HISTORY_KEYS - {"epoch"}:
            assert math.isfinite(row[key]), (key, row)
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0, row
        assert row["loss"] > 0 and row["test_loss"] > 0 and row["examples_per_sec"] > 0 and row["seconds"] > 0, row


# ------------------------------------------------------- end-to-end runs


def _check_run_folder(run: Run, replicas: int, devices: str) -> None:
    """Everything a finished 2-epoch run on 2048 examples must leave and print."""
    import keras
    import tensorflow as tf

    import kerasbn

    # config.json: every setting, resolved, and the versions.
    config = run.config
    settings = config["settings"]
    assert set(settings) == {field.name for field in dataclasses.fields(TrainConfig)}
    assert settings["epochs"] == 2 and settings["limit_train"] == 2048 and settings["batch_size"] == 256
    assert settings["lr"] == 1.0 and settings["norm"] == "kerasbn" and settings["seed"] == 0
    assert settings["out"] == str(run.out) and settings["export"] is False
    assert settings["cpu_replicas"] == (2 if replicas == 2 else 0)
    assert config["versions"] == {"tensorflow": tf.__version__, "keras": keras.__version__, "kerasbn": kerasbn.__version__}
    assert config["strategy"] == devices

    # history.json and history.csv: two epochs, the same numbers.
    history = run.history
    _check_history(history, epochs=2)
    with open(run.out / "history.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == HISTORY_COLUMNS
        rows = list(reader)
    assert len(rows) == 2
    for row, expected in zip(rows, history):
        for key in HISTORY_COLUMNS:
            assert float(row[key]) == pytest.approx(expected[key], rel=1e-12), (key, row, expected)

    # curves.png: a real PNG image.
    png = (run.out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(run.out / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert float(image[..., :3].std()) > 0.05, "curves.png is blank"

    # TensorBoard: every history column at steps 1 and 2, equal to the history.
    scalars = _scalars(run.out / "tensorboard")
    assert set(scalars) == set(HISTORY_COLUMNS[1:])
    for key in HISTORY_COLUMNS[1:]:
        assert sorted(scalars[key]) == [1, 2], (key, scalars[key])
        for row in history:
            assert scalars[key][row["epoch"]] == pytest.approx(row[key], rel=1e-6), key

    # summary.json: the last epoch, and the test accuracy before and after recomputing the BN statistics.
    summary = run.summary
    last = history[-1]
    assert summary["epochs"] == 2 and summary["devices"] == devices
    assert summary["loss"] == last["loss"] and summary["train_acc"] == last["train_acc"]
    assert summary["test_acc_moving_averages"] == last["test_acc"]
    assert summary["recomputed_batches"] == 8  # all 2048 // 256 batches, fewer than the 200 asked for
    assert 0.0 <= summary["test_acc"] <= 1.0
    # 16 steps with momentum 0.9 leave 0.9**16 ~ 19% of the initial (0, 1) in
    # the moving statistics; the recomputed ones are those of the trained net.
    assert summary["test_acc"] > summary["test_acc_moving_averages"] + 0.05, summary

    # The final line, like the source text's, agreeing with summary.json.
    stdout_lines = [line for line in run.result.stdout.replace("\r", "\n").splitlines() if line.strip()]
    match = FINAL_LINE.match(stdout_lines[-1])
    assert match, f"unexpected final line: {stdout_lines[-1]!r}"
    assert match["loss"] == f"{summary['loss']:.3f}"
    assert match["train_acc"] == f"{summary['train_acc']:.3f}"
    assert match["test_acc"] == f"{summary['test_acc']:.3f}"
    assert match["moving"] == f"{summary['test_acc_moving_averages']:.3f}"
    assert int(match["batches"]) == 8 and float(match["speed"]) > 0
    assert match["devices"] == devices
    assert "Traceback" not in run.result.stderr

    # model.keras: loads with kerasbn imported, and carries the recomputed statistics.
    model = _load_model(run.out / "model.keras")
    assert sum(isinstance(layer, kerasbn.BatchNorm) for layer in model.layers) == 4
    assert _test_accuracy(model) == pytest.approx(summary["test_acc"], abs=5e-4)

    # A checkpoint per epoch, and nothing half-written left behind.
    assert {p.name for p in (run.out / "checkpoints").glob("ckpt-*.index")} == {"ckpt-1.index", "ckpt-2.index"}
    assert not list(run.out.glob(".tmp-*"))


@needs_data
def test_short_run_one_replica(runs):
    run = _one_replica(runs)
    _check_run_folder(run, replicas=1, devices="OneDeviceStrategy on 1 replica(s) (CPU:0)")
    # Without --quiet: a progress section and a line per epoch.
    stdout = run.result.stdout.replace("\r", "\n")
    assert "Epoch 1/2" in stdout and "Epoch 2/2" in stdout
    for row in run.history:
        assert f"  loss {row['loss']:.3f}, train acc {row['train_acc']:.3f}, test acc {row['test_acc']:.3f}, " in stdout


@needs_data
def test_short_run_two_cpu_replicas(runs):
    run = _two_replicas(runs)
    _check_run_folder(run, replicas=2, devices="MirroredStrategy on 2 replica(s) (CPU:0, CPU:1)")
    # --quiet: the final line is all of stdout.
    assert len(run.result.stdout.strip().splitlines()) == 1, run.result.stdout


@needs_data
@pytest.mark.slow
def test_seed_makes_runs_reproducible(runs):
    first = runs.get("one-epoch", ONE_EPOCH)
    second = runs.get("one-epoch-again", ONE_EPOCH)
    (row_a,), (row_b,) = first.history, second.history
    for key in ("loss", "train_acc", "test_loss", "test_acc"):
        assert row_a[key] == row_b[key], (key, row_a, row_b)
    assert first.summary["test_acc"] == second.summary["test_acc"]
    weights_a = _load_model(first.out / "model.keras").get_weights()
    weights_b = _load_model(second.out / "model.keras").get_weights()
    for a, b in zip(weights_a, weights_b, strict=True):
        np.testing.assert_array_equal(a, b)
    # --epochs does not change the epochs before: the 2-epoch run's first one is the same.
    longer = _one_replica(runs).history[0]
    for key in ("loss", "train_acc", "test_loss", "test_acc"):
        assert longer[key] == row_a[key], (key, longer, row_a)


@needs_data
@pytest.mark.slow
def test_sync_bn_two_replicas_matches_one_replica(runs):
    one = runs.get("one-epoch", ONE_EPOCH)
    synced = runs.get("one-epoch-sync-bn", [*ONE_EPOCH, "--cpu-replicas", "2", "--strategy", "mirrored", "--sync-bn"])
    assert synced.config["settings"]["sync_bn"] is True
    assert synced.summary["devices"] == "MirroredStrategy on 2 replica(s) (CPU:0, CPU:1)"
    reference, with_sync = one.history[0], synced.history[0]
    # Global-batch statistics on 2 x 128 examples train like 1 x 256: the same
    # training loss over the epoch's 8 steps, so the same gradients.
    # (The layer-level equality, outputs, gradients and moving statistics at
    # rtol 1e-5, is tests/test_distributed.py's. The test loss after a whole
    # epoch at lr 1.0 is not compared here: the 1-replica run takes the fused
    # and widened kernels, the synchronized one the all-reduce path, and
    # rounding differences between correct paths grow through 8 steps of
    # training; on one device fused vs generic already differ by up to 2e-4.)
    assert _relative(with_sync["loss"], reference["loss"]) < 1e-4, (with_sync, reference)
    # Control, so that the check above can fail: per-replica statistics (the
    # 2-replica run without --sync-bn, same seed; its epoch 1 is a 1-epoch run's).
    without_sync = _two_replicas(runs).history[0]
    assert _relative(without_sync["loss"], reference["loss"]) > 1e-3, (without_sync, reference)


# ------------------------------------------------------------ multi-worker


@needs_data
@pytest.mark.slow
def test_multi_worker_two_processes_end_with_equal_weights(runs, tmp_path):
    out = tmp_path / "run"
    flags = [*SHORT, "--strategy", "multi-worker", "--out", str(out), "--no-export", "--quiet"]
    worker_args = [["tests/_train_worker.py", str(tmp_path / f"weights-{i}.npz"), *flags] for i in range(2)]
    results = run_workers(worker_args, tmp_path, env=RUN_ENV, timeout=RUN_TIMEOUT, merge_stderr=False)
    output = "\n".join(logs(prefix) for _, prefix in results)
    assert [code for code, _ in results] == [0, 0], output
    for _, prefix in results:
        assert "Traceback" not in Path(f"{prefix}.err").read_text(), output

    # Only the chief (worker 0) prints and writes artifacts.
    chief_out = Path(f"{results[0][1]}.out").read_text().strip().splitlines()
    assert len(chief_out) == 1 and FINAL_LINE.match(chief_out[0]), output
    assert "on 2 replica(s)" in chief_out[0]
    assert Path(f"{results[1][1]}.out").read_text().strip() == "", output
    assert (out / "model.keras").is_file() and (out / "summary.json").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {
        "checkpoint", "ckpt-1.index", "ckpt-1.data-00000-of-00001", "ckpt-2.index", "ckpt-2.data-00000-of-00001",
    }, "the non-chief's scratch checkpoints must be gone"
    history = json.loads((out / "history.json").read_text())
    _check_history(history, epochs=2)

    # Both workers end with the same weights, BN moving statistics included
    # (not synchronized: each worker normalizes its own 128 examples, and the
    # moving statistics are averaged across workers).
    weights = [np.load(tmp_path / f"weights-{i}.npz") for i in range(2)]
    assert sorted(weights[0].files) == sorted(weights[1].files)
    assert "bn1/moving_mean" in weights[0].files and "bn4/moving_variance" in weights[0].files
    for name in weights[0].files:
        np.testing.assert_array_equal(weights[0][name], weights[1][name], err_msg=name)
    # ... which are those of the chief's model.keras.
    model = _load_model(out / "model.keras")
    saved = {variable.path.removeprefix(model.name + "/"): variable.numpy() for variable in model.variables}
    assert sorted(saved) == sorted(weights[0].files)
    for name, value in saved.items():
        np.testing.assert_array_equal(value, weights[0][name], err_msg=name)

    # Two workers with one replica each train exactly like MirroredStrategy on 2 replicas.
    mirrored = _two_replicas(runs).history
    for row, expected in zip(history, mirrored, strict=True):
        for key in ("loss", "train_acc", "test_loss", "test_acc"):
            assert _relative(row[key], expected[key]) < 1e-6, (key, row, expected)


def test_multi_worker_batch_size_not_divisible(tmp_path):
    out = tmp_path / "run"
    flags = ["-m", "training.train", "--strategy", "multi-worker", "--batch-size", "255", "--out", str(out), "--quiet"]
    results = run_workers([flags, flags], tmp_path, env=RUN_ENV, timeout=240, merge_stderr=False)
    output = "\n".join(logs(prefix) for _, prefix in results)
    for code, prefix in results:
        assert code == 2, output
        stderr = Path(f"{prefix}.err").read_text()
        assert "Traceback" not in stderr, output
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, output
        assert "`--batch-size`" in errors[0] and "batch_size=255" in errors[0] and "2 workers" in errors[0], errors
    assert not out.exists(), "a refused run must not write a run folder"


# ------------------------------------------------------ kill and resume


RESUMABLE = ["--limit-train", "4096", "--epochs", "3", "--no-export"]


@needs_data
@pytest.mark.slow
def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    killed_out, straight_out = tmp_path / "killed", tmp_path / "straight"
    command = ["-m", "training.train", *RESUMABLE, "--out", str(killed_out)]
    # The uninterrupted reference runs alongside the run that gets killed.
    straight = start_python(["-m", "training.train", *RESUMABLE, "--quiet", "--out", str(straight_out)],
                            tmp_path / "straight", env=RUN_ENV, timeout=RUN_TIMEOUT)
    victim = start_python(command, tmp_path / "killed", env=RUN_ENV, timeout=RUN_TIMEOUT)
    try:
        state = killed_out / "checkpoints" / "checkpoint"
        deadline = time.monotonic() + RUN_TIMEOUT
        while not state.exists():
            assert victim.poll() is None, f"the run ended before its first checkpoint\n{logs(tmp_path / 'killed')}"
            assert time.monotonic() < deadline, f"no checkpoint after {RUN_TIMEOUT} s\n{logs(tmp_path / 'killed')}"
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        assert victim.returncode == -signal.SIGKILL
        assert not (killed_out / "summary.json").exists(), "the run finished before it was killed"

        resumed = run_python(command, env=RUN_ENV, timeout=RUN_TIMEOUT, check=False)
        assert resumed.returncode == 0, _explain(resumed)
        straight.wait(timeout=RUN_TIMEOUT + 30)
        assert straight.returncode == 0, logs(tmp_path / "straight")
    finally:
        kill_group(victim)
        kill_group(straight)

    stdout = resumed.stdout.replace("\r", "\n")
    match = RESUMING.search(stdout)
    assert match, stdout[-3000:]
    start = int(match[1])
    assert Path(match[2]) == killed_out / "checkpoints"
    assert 1 <= start < 3  # killed after the epoch-1 checkpoint, before the end
    printed = [int(epoch) for epoch in re.findall(r"^Epoch (\d+)/3$", stdout, flags=re.M)]
    assert printed == list(range(start + 1, 4)), printed

    history = json.loads((killed_out / "history.json").read_text())
    _check_history(history, epochs=3)
    with open(killed_out / "history.csv", newline="") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3]

    # Same seed, same batches per epoch: the same run as if never killed.
    reference = json.loads((straight_out / "history.json").read_text())
    for row, expected in zip(history, reference, strict=True):
        for key in ("loss", "train_acc", "test_loss", "test_acc"):
            assert _relative(row[key], expected[key]) < 1e-6, (key, row, expected)
    summary = json.loads((killed_out / "summary.json").read_text())
    expected_summary = json.loads((straight_out / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(expected_summary["test_acc"], abs=1e-4)
    final = _load_model(killed_out / "model.keras").get_weights()
    expected_final = _load_model(straight_out / "model.keras").get_weights()
    for a, b in zip(final, expected_final, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    # TensorBoard has every epoch too: the resumed run logs the restored
    # epochs again (a repeated step holds the same values).
    steps = {tag: sorted(set(values)) for tag, values in _scalars(killed_out / "tensorboard").items()}
    assert steps == {tag: [1, 2, 3] for tag in HISTORY_COLUMNS[1:]}, steps


@needs_data
@pytest.mark.parametrize(
    "changed, expected",
    [
        (["--lr", "0.5"], ["lr: 1.0 -> 0.5"]),
        (["--cpu-replicas", "2", "--strategy", "mirrored"], ["cpu_replicas: 0 -> 2", "strategy: 'auto' -> 'mirrored'"]),
    ],
    ids=["lr", "strategy"],
)
def test_resuming_with_other_settings_is_refused(runs, tmp_path, changed, expected):
    original = _one_replica(runs)
    out = tmp_path / "run"
    shutil.copytree(original.out, out)
    before = {name: (out / name).read_bytes() for name in ("config.json", "history.json", "summary.json")}
    result = train([*ONE_REPLICA, *changed, "--out", str(out), "--no-export"])
    assert result.returncode == 2, _explain(result)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, _explain(result)
    assert f"`--out` {out} holds a run with other settings" in errors[0]
    for text in expected:
        assert text in errors[0], errors[0]
    assert "Epoch" not in result.stdout
    for name, content in before.items():
        assert (out / name).read_bytes() == content, f"{name} changed by a refused run"


# ----------------------------------------------------------- data errors


def _break_missing(path: Path) -> None:
    pass  # not linked into the folder at all


def _break_truncated(path: Path) -> None:
    whole = (DATA_FOLDER / path.name).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])


def _break_not_gzip(path: Path) -> None:
    # Decompressed by hand but still named .gz.
    path.write_bytes(gzip.decompress((DATA_FOLDER / path.name).read_bytes()))


def _break_checksum(path: Path) -> None:
    # A valid gzip of a valid IDX file with one label changed (to another
    # class): only the checksum can tell.
    raw = bytearray(gzip.decompress((DATA_FOLDER / path.name).read_bytes()))
    raw[8] = (raw[8] + 1) % 10  # the first label, after the 8-byte header
    path.write_bytes(gzip.compress(bytes(raw), mtime=0))


@needs_data
@pytest.mark.parametrize(
    "name, damage, words",
    [
        ("train-images-idx3-ubyte.gz", _break_missing, "is missing"),
        ("t10k-images-idx3-ubyte.gz", _break_truncated, "is truncated"),
        ("t10k-labels-idx1-ubyte.gz", _break_not_gzip, "is corrupt: not a valid gzip file"),
        ("train-labels-idx1-ubyte.gz", _break_checksum, "fails its checksum"),
    ],
    ids=["missing", "truncated", "corrupt", "checksum"],
)
def test_data_errors_give_one_clear_line(tmp_path, name, damage, words):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split in fmnist.SPLITS:
        for file_name in fmnist.FILES[split]:
            if file_name != name:
                (folder / file_name).symlink_to(DATA_FOLDER / file_name)
    damage(folder / name)
    out = tmp_path / "run"
    result = train([*SHORT, "--data-dir", str(folder), "--out", str(out), "--no-export", "--quiet"])
    assert result.returncode == 1, _explain(result)
    assert "Traceback" not in result.stderr, _explain(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, _explain(result)
    assert f"Fashion-MNIST file {folder / name} {words}" in errors[0], errors[0]
    assert "apt-get install dataset-fashion-mnist" in errors[0], errors[0]
    assert not (out / "history.json").exists()


def test_data_folder_from_the_environment_must_exist(tmp_path):
    folder = tmp_path / "no-such-folder"
    result = run_python(
        ["-m", "training.train", *SHORT, "--out", str(tmp_path / "run"), "--no-export", "--quiet"],
        env={**RUN_ENV, fmnist.DATA_DIR_ENV: str(folder)}, timeout=RUN_TIMEOUT, check=False,
    )
    assert result.returncode == 1, _explain(result)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, _explain(result)
    assert f"Fashion-MNIST folder {folder} (${fmnist.DATA_DIR_ENV}='{folder}') does not exist" in errors[0], errors[0]


# --------------------------------------------------------------- flags


BAD_FLAGS = [
    (["--lr", "-0.5"], ["`--lr`", "lr=-0.5"]),
    (["--lr", "nan"], ["`--lr`", "lr=nan"]),
    (["--lr", "abc"], ["--lr", "'abc'"]),
    (["--epochs", "0"], ["`--epochs`", "epochs=0"]),
    (["--batch-size", "0"], ["`--batch-size`", "batch_size=0"]),
    (["--strategy", "bogus"], ["--strategy", "'bogus'", "multi-worker"]),
    (["--norm", "batch"], ["--norm", "'batch'", "kerasbn"]),
    (["--bn-momentum", "1.0"], ["`--bn-momentum`", "bn_momentum=1.0"]),
    (["--cpu-replicas", "-1"], ["`--cpu-replicas`", "cpu_replicas=-1"]),
    (["--limit-train", "0"], ["`--limit-train`", "limit_train=0"]),
    (["--norm", "none", "--sync-bn"], ["`--sync-bn`", "norm='none'"]),
    (["--norm", "layer", "--sync-bn"], ["`--sync-bn`", "norm='layer'"]),
    (["--dropout", "1.0"], ["`--dropout`", "dropout=1.0"]),
    (["--limit-test", "0"], ["`--limit-test`", "limit_test=0"]),
    (["--norm-places", "middle"], ["--norm-places", "'middle'", "dense"]),
    (["--epochs", "2", "--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    (["--seed", "-1"], ["`--seed`", "[0, 2**32)", "seed=-1"]),
    (["--seed", str(2**32)], ["`--seed`", f"seed={2**32}"]),
    (["--seed", "1.5"], ["--seed", "'1.5'"]),
    (["--data-dir", "/no/such/folder"], ["`--data-dir`", "data_dir='/no/such/folder'"]),
    (["--run-name", "a/b"], ["`--run-name`", "run_name='a/b'"]),
    (["--run-name", ""], ["`--run-name`", "run_name=''"]),
    (["--recompute-stats-batches", "-1"], ["`--recompute-stats-batches`", "recompute_stats_batches=-1"]),
    (["--quiet=yes"], ["--quiet", "'yes'"]),
    (["--export=no"], ["--export", "'no'"]),
    (["--sync-bn=1"], ["--sync-bn", "'1'"]),
    (["--bias=maybe"], ["--bias", "'maybe'"]),
    (["--affine=0"], ["--affine", "'0'"]),
    (["--sync-group-size", "0"], ["`--sync-group-size`", "positive integer", "sync_group_size=0"]),
    (["--sync-group-size", "2"], ["`--sync-group-size`", "--sync-bn", "sync_bn=False"]),
    (["--virtual-batch-size", "4", "--norm", "keras"], ["`--virtual-batch-size`", "norm='keras'"]),
]


@pytest.mark.parametrize("flags, names", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_bad_flags_give_a_clear_message(tmp_path, flags, names):
    out = tmp_path / "run"
    result = train([*flags, "--out", str(out), "--quiet"], timeout=120)
    assert result.returncode == 2, _explain(result)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(("error:", "python -m training.train: error:")), result.stderr
    for name in names:
        assert name in message, message
    assert not out.exists()


def test_out_naming_a_file_is_refused(tmp_path):
    out = tmp_path / "a-file"
    out.write_text("not a folder")
    result = train(["--out", str(out), "--quiet"], timeout=120)
    assert result.returncode == 2, _explain(result)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: `--out` must name a folder (new or existing). Received: out={str(out)!r}"


def test_every_flag_has_a_bad_value_tested():
    tested = {flag[2:].split("=")[0] for flags, _ in BAD_FLAGS for flag in flags if flag.startswith("--")}
    tested.add("out")  # test_out_naming_a_file_is_refused
    flags = {field.name.replace("_", "-") for field in dataclasses.fields(TrainConfig)}
    assert flags <= tested, sorted(flags - tested)


def test_help_lists_every_flag():
    result = train(["--help"], timeout=120)
    assert result.returncode == 0, _explain(result)
    text = "".join(result.stdout.split())  # argparse wraps (and breaks at hyphens) freely
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in result.stdout, flag
        if field.type in ("bool", bool):
            assert f"--no-{flag[2:]}" in result.stdout, flag
        assert "".join(field.metadata["help"].split()) in text, field.name
    assert result.stdout.startswith("usage: python -m training.train")
