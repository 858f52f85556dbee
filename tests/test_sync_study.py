"""The sync study's command: its --quick run writes the table, the json and the plot, and a rerun resumes."""

import json
import math
import os
import subprocess
import sys

import pytest

from training.config import ConfigError
from training.sync_study import MODE_KEYS, MODES, REPLICAS, SyncStudyConfig, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _study(out, *flags):
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run(
        [sys.executable, "-m", "training.sync_study", "--quick", "--out", str(out), *flags],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )


def test_quick_study_writes_table_json_and_plot_and_resumes(tmp_path):
    out = tmp_path / "study"
    first = _study(out)
    assert first.returncode == 0, first.stderr[-3000:]
    summary = json.loads((out / "sync_study.json").read_text())
    rows = summary["rows"]
    assert {row["mode"] for row in rows} == set(MODE_KEYS)
    assert {row["batch"] for row in rows} == {2, 4}
    for row in rows:
        for column in ("test_acc_recomputed", "test_acc_moving"):
            assert 0.0 <= row[column]["min"] <= row[column]["mean"] <= row[column]["max"] <= 1.0
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        # Ghost BN trains at the largest per-replica batch; the others at their own.
        assert row["global_batch"] == REPLICAS * (4 if row["mode"] == "ghost" else row["batch"])
        assert row["virtual_batch_size"] == (2 if row["mode"] == "ghost" and row["batch"] == 2 else None)
    # At the largest batch ghost BN is the local run itself, trained once.
    cell = {(row["mode"], row["batch"]): row for row in rows}
    assert cell["ghost", 4]["test_acc_moving"] == cell["local", 4]["test_acc_moving"]
    table = (out / "sync_study.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)
    assert "synchronized in groups of 2" in table
    assert (out / "sync_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every distinct configuration trained once: ghost at batch 4 reuses local's run.
    assert "1 reused from finished runs" in first.stdout, first.stdout[-2000:]

    again = _study(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"0 runs trained, 0 reused from finished runs, {len(rows)} records kept" in again.stdout, again.stdout[-2000:]
    assert json.loads((out / "sync_study.json").read_text())["rows"] == rows


def test_flags_are_checked():
    with pytest.raises(ConfigError, match=r"`--batches` must be positive integers.*Received: batches='2,x'"):
        parse_args(["--batches", "2,x"])
    with pytest.raises(ConfigError, match=r"`--modes` must be 'all' or among .*Received: modes='sync'"):
        parse_args(["--modes", "sync"])
    with pytest.raises(ConfigError, match=r"`--batches` must each divide the largest .*Received: batches='3,4'"):
        parse_args(["--batches", "3,4"])
    with pytest.raises(ConfigError, match=r"`--examples` must be at least one global batch \(4 x 32 = 128\)"):
        parse_args(["--examples", "100"])


def test_runs_share_examples_and_scale_the_learning_rate():
    config = SyncStudyConfig()
    runs = [config.train_config(mode, batch, 0) for mode in MODES for batch in config.batch_list()]
    assert {run.limit_train for run in runs} == {config.examples}
    assert all(run.lr == pytest.approx(run.batch_size / 256) for run in runs)
    assert all(run.cpu_replicas == REPLICAS for run in runs)
