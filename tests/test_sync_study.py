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
    assert {(row["mode"], row["batch"]) for row in rows} == {(mode, 2) for mode in MODE_KEYS}
    for row in rows:
        for column in ("test_acc_recomputed", "test_acc_moving"):
            assert 0.0 <= row[column]["min"] <= row[column]["mean"] <= row[column]["max"] <= 1.0
            assert row[column]["values"] and row[column]["mean"] > 0.0
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        assert row["global_batch"] == REPLICAS * 2 and row["steps"] == 64 // (REPLICAS * 2)
    # At the largest batch ghost BN is the local run itself: trained once, timed once.
    cell = {row["mode"]: row for row in rows}
    assert cell["ghost"]["test_acc_moving"] == cell["local"]["test_acc_moving"]
    assert cell["ghost"]["step_ms"] == cell["local"]["step_ms"]
    assert "1 reused from finished runs" in first.stdout, first.stdout[-2000:]
    table = (out / "sync_study.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)
    assert "synchronized in groups of 2" in table
    assert (out / "sync_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

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
    # Ghost BN: the largest per-replica batch, its statistics over the x-axis batch.
    ghost = {batch: config.train_config(MODES[-1], batch, 0) for batch in config.batch_list()}
    assert {run.batch_size for run in ghost.values()} == {REPLICAS * 32}
    assert [ghost[b].virtual_batch_size for b in (2, 4, 8, 16, 32)] == [2, 4, 8, 16, None]
    groups = config.train_config(MODES[2], 2, 0)
    assert (groups.sync_bn, groups.sync_group_size, groups.batch_size) == (True, 2, REPLICAS * 2)


def test_the_guide_shows_the_committed_study():
    # The page links the committed plot and table where they live in the checkout (docs/hooks.py serves them).
    page = open(os.path.join(REPO, "docs", "guides", "when-to-synchronize.md")).read()
    for name in ("sync_study.png", "sync_study.md"):
        assert f"](../../training/results/{name})" in page, name
        assert os.path.isfile(os.path.join(REPO, "training", "results", name)), name
    rows = json.loads(open(os.path.join(REPO, "training", "results", "sync_study.json")).read())["rows"]
    assert {row["mode"] for row in rows} == set(MODE_KEYS)
    assert "guides/when-to-synchronize.md" in open(os.path.join(REPO, "mkdocs.yml")).read()
