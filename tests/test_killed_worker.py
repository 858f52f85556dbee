"""A multi-worker run whose worker is SIGKILLed: the survivor fails fast, the restart resumes exactly.

Two `python -m training.train --strategy multi-worker` workers on 127.0.0.1
(`MultiWorkerMirroredStrategy`, one CPU replica each) run one short command
three times:

1. Killed: once the chief has checkpointed epoch 1 and its progress bar is
   8 steps into epoch 2 (of 64), one worker gets SIGKILL (the non-chief, then,
   in a second case, the chief, which also hosts TensorFlow's coordination
   service). The survivor must not wait for ever: its collectives are aborted
   (the dead peer's connection resets, or the coordination service misses its
   heartbeats) and the driver exits with one error line and
   `PEER_LOST_EXIT_CODE`.
2. Restarted: both workers again, same command and cluster; they resume from
   the checkpoint of epoch 1 and finish.
3. Uninterrupted (once for the module): the same command in another run
   folder.

The final checkpoints of 2 and 3, read with `tf.train.load_checkpoint`, must
hold the same values (the BN moving statistics within a few float32 ulps, see
`MOVING_STATISTICS_TOL`): every epoch's data order is seeded by the epoch, the
model has no dropout, and the optimizer (plain SGD) keeps only its step
counter, which the checkpoint holds.

Every process runs under `timeout -k` in its own process group, and the test
SIGKILLs every group it started in a `finally`. A fast test checks the
driver's exit for a lost peer on its own, without a cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from training.config import PEER_LOST_EXIT_CODE, run_cli
from _procs import WORKER_ENV, kill_group, logs, start_python, tf_configs
from test_train import RESUMING, needs_data

# 2048 examples in global batches of 32: 64 steps per epoch (a few seconds).
EPOCHS = 3
STEPS = 64
COMMAND = [
    "-m", "training.train", "--strategy", "multi-worker", "--epochs", str(EPOCHS), "--limit-train", "2048",
    "--batch-size", "32", "--limit-test", "256", "--recompute-stats-batches", "0", "--no-export", "--seed", "0",
]
WORKERS = 2
CHIEF = 0  # TF_CONFIG without a "chief" job: worker 0 is the chief
PROCESS_TIMEOUT = 300  # `timeout` bound of each worker; a whole run took 41-67 s on a busy 2-core machine
KILL_AFTER_STEP = 8  # of epoch 2, as the chief's progress bar shows it
# The survivor exits within ~1 s when its pending collective's connection to
# the dead peer resets, in ~6-11 s when only the coordination service's
# missed heartbeats (10 s timeout) tell it; more only on a starved machine.
SURVIVOR_EXIT_S = 90
# Both runs do the same float32 operations on the same batches in the same
# order (op determinism is on): trainable weights, the step counter and the
# epoch agree bit for bit. The BN moving statistics may differ by a few
# float32 ulps: each worker updates its own copy, a checkpoint holds their
# mean, and a restore gives every copy that mean. The mean of the copies
# (what the final checkpoint holds) is then the same sum in exact arithmetic
# (the moving average is linear), rounded in another order. Measured: at most
# 3e-8 absolute, 2.4e-7 relative (2 ulps); the bound allows ~8 ulps of 1.0
# (absolute too, for means near 0 whose rounding is that of their summands).
MOVING_STATISTICS_TOL = dict(rtol=1e-6, atol=1e-6)

needs_timeout = pytest.mark.skipif(
    shutil.which("timeout") is None, reason="needs coreutils' timeout to bound the workers"
)


def _start(out: Path, configs: List[str], log_dir: Path) -> List[subprocess.Popen]:
    """Starts one worker per TF_CONFIG, all with the same command; logs in log_dir/worker-I.{out,err}."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**WORKER_ENV, "PYTHONUNBUFFERED": "1"}  # the progress shows when printed
    return [
        start_python([*COMMAND, "--out", str(out)], log_dir / f"worker-{index}", env={**env, "TF_CONFIG": config},
                     timeout=PROCESS_TIMEOUT)
        for index, config in enumerate(configs)
    ]


def _all_logs(log_dir: Path) -> str:
    return "\n".join(logs(log_dir / f"worker-{index}") for index in range(WORKERS))


def _run_to_the_end(out: Path, configs: List[str], log_dir: Path) -> float:
    """Runs the command on every worker until all exit; asserts they succeed; returns the wall seconds."""
    processes = []
    began = time.monotonic()
    try:
        processes = _start(out, configs, log_dir)
        for process in processes:
            process.wait(timeout=PROCESS_TIMEOUT + 30)
    finally:
        for process in processes:
            kill_group(process)
    assert [p.returncode for p in processes] == [0] * WORKERS, _all_logs(log_dir)
    return time.monotonic() - began


def _checkpoint_values(checkpoint_dir: Path) -> Dict[str, np.ndarray]:
    """Every numeric tensor of the latest checkpoint in `checkpoint_dir`, by its checkpoint key."""
    tf = pytest.importorskip("tensorflow")
    reader = tf.train.load_checkpoint(str(checkpoint_dir))
    return {
        key: reader.get_tensor(key)
        for key, dtype in reader.get_variable_to_dtype_map().items()
        if dtype != tf.string  # the object graph, not a value
    }


def _step_of_epoch_2(stdout: str) -> int:
    """The last step of epoch 2 that the chief's progress bar shows (`12/64`, amid colour codes); 0 before."""
    _, marker, epoch_2 = stdout.partition(f"Epoch 2/{EPOCHS}\n")
    steps = re.findall(rf"(\d+)/{STEPS}(?!\d)", epoch_2) if marker else []
    return int(steps[-1]) if steps else 0


def _latest_epoch(checkpoint_dir: Path) -> int:
    """The number of the checkpoint the manager's state file names as the latest (`ckpt-N`)."""
    state = (checkpoint_dir / "checkpoint").read_text()
    return int(re.search(r'^model_checkpoint_path: "ckpt-(\d+)"$', state, flags=re.M)[1])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Dict:
    """Run 3: the command on two workers, never killed."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    seconds = _run_to_the_end(tmp / "run", tf_configs(WORKERS), tmp / "logs")
    return {"out": tmp / "run", "seconds": seconds}


@needs_data
@needs_timeout
@pytest.mark.slow
@pytest.mark.parametrize("victim", [1 - CHIEF, CHIEF], ids=["non-chief", "chief"])
def test_killed_worker_fails_fast_and_the_restart_ends_as_if_never_killed(tmp_path, uninterrupted, victim):
    out = tmp_path / "run"
    checkpoints = out / "checkpoints"
    configs = tf_configs(WORKERS)  # the restart reuses the cluster, ports included
    survivor = 1 - victim

    # Run 1: kill one worker in the middle of epoch 2.
    log_dir = tmp_path / "killed"
    processes = []
    try:
        processes = _start(out, configs, log_dir)
        chief_stdout = log_dir / f"worker-{CHIEF}.out"
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while _step_of_epoch_2(chief_stdout.read_text()) < KILL_AFTER_STEP:
            assert all(p.poll() is None for p in processes), f"a worker ended before epoch 2\n{_all_logs(log_dir)}"
            assert time.monotonic() < deadline, f"no epoch 2 after {PROCESS_TIMEOUT} s\n{_all_logs(log_dir)}"
            time.sleep(0.02)
        assert (checkpoints / "ckpt-1.index").exists()
        os.killpg(processes[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            processes[survivor].wait(timeout=SURVIVOR_EXIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker {survivor} still runs {SURVIVOR_EXIT_S} s after worker {victim} was killed\n"
                        f"{_all_logs(log_dir)}")
        survivor_seconds = time.monotonic() - killed_at
    finally:
        for process in processes:
            kill_group(process)
    assert processes[victim].returncode == -signal.SIGKILL
    assert processes[survivor].returncode == PEER_LOST_EXIT_CODE, _all_logs(log_dir)
    stderr = (log_dir / f"worker-{survivor}.err").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a worker of the multi-worker cluster is gone" in errors[0], _all_logs(log_dir)
    assert "Traceback" not in stderr, _all_logs(log_dir)
    # Killed mid-epoch: epoch 2 never reached its checkpoint.
    assert _latest_epoch(checkpoints) == 1, (checkpoints / "checkpoint").read_text()
    assert not (out / "summary.json").exists()

    # Run 2: the same command on the same cluster resumes from epoch 1.
    log_dir = tmp_path / "restarted"
    resumed_seconds = _run_to_the_end(out, configs, log_dir)
    chief_stdout = (log_dir / f"worker-{CHIEF}.out").read_text()
    match = RESUMING.search(chief_stdout)
    assert match and int(match[1]) == 1 and Path(match[2]) == checkpoints, chief_stdout[-3000:]
    printed = [int(epoch) for epoch in re.findall(rf"^Epoch (\d+)/{EPOCHS}$", chief_stdout, flags=re.M)]
    assert printed == list(range(2, EPOCHS + 1)), printed
    assert _latest_epoch(checkpoints) == EPOCHS

    # As if never killed: the history and every value of the final checkpoint.
    history = json.loads((out / "history.json").read_text())
    expected_history = json.loads((uninterrupted["out"] / "history.json").read_text())
    assert [row["epoch"] for row in history] == list(range(1, EPOCHS + 1))
    for row, expected in zip(history, expected_history, strict=True):
        for key in ("loss", "train_acc", "test_loss", "test_acc"):
            assert row[key] == pytest.approx(expected[key], rel=1e-6), (key, row, expected)
    final = _checkpoint_values(checkpoints)
    expected_final = _checkpoint_values(uninterrupted["out"] / "checkpoints")
    assert sorted(final) == sorted(expected_final)
    assert any("moving_mean" in key for key in final) and any("iteration" in key for key in final), sorted(final)
    differences = {key: float(np.max(np.abs(final[key] - expected_final[key]), initial=0.0)) for key in final}
    worst = max(differences, key=differences.get)
    relative = max(
        float(np.max(np.abs(final[key] / expected_final[key] - 1.0), initial=0.0))
        for key in final if "moving_variance" in key
    )
    print(
        f"\nkilled worker {victim}: worker {survivor} exited {survivor_seconds:.1f} s later "
        f"(code {processes[survivor].returncode}); restart {resumed_seconds:.1f} s, uninterrupted run "
        f"{uninterrupted['seconds']:.1f} s; max |difference| of the final checkpoint {differences[worst]:.3g} "
        f"({worst}), relative on the moving variances {relative:.3g}"
    )
    for key in final:
        if "moving_mean" in key or "moving_variance" in key:
            np.testing.assert_allclose(final[key], expected_final[key], err_msg=key, **MOVING_STATISTICS_TOL)
        else:
            np.testing.assert_array_equal(final[key], expected_final[key], err_msg=key)


# TensorFlow's messages when a peer is gone (TF 2.21): in flight, not yet
# connected, and a silence the coordination service noticed.
LOST_PEER_MESSAGES = {
    "Graph execution error:\n\nDetected at node CollectiveReduceV2 defined at (most recent call last):\n"
    "Collective ops is aborted by: recvmsg:Connection reset by peer\nAdditional GRPC error information": (
        "recvmsg:Connection reset by peer"
    ),
    "{{function_node __wrapped__CollectiveReduceV2}} Collective ops is aborted by: failed to connect to all "
    "addresses\n:UNKNOWN:Error received from peer": "failed to connect to all addresses",
    "Collective ops is aborted by: Error reported from /job:worker/task:1: The following tasks are unhealthy "
    "(stopped sending heartbeats):\n/job:worker/replica:0/task:1": (
        "Error reported from /job:worker/task:1: The following tasks are unhealthy (stopped sending heartbeats)"
    ),
    "no reason given": "no reason given",
}


@pytest.mark.parametrize("message", sorted(LOST_PEER_MESSAGES))
def test_lost_peer_exits_with_one_line_and_its_own_code(capsys, message):
    tf = pytest.importorskip("tensorflow")

    def run(config):
        raise tf.errors.UnavailableError(None, None, message)

    assert run_cli(lambda argv: None, run, []) == PEER_LOST_EXIT_CODE == 75
    assert capsys.readouterr().err.splitlines() == [
        f"error: a worker of the multi-worker cluster is gone ({LOST_PEER_MESSAGES[message]}). Start every "
        "worker again with the same command: training resumes from the last checkpoint in the run folder."
    ]


def test_other_tensorflow_errors_keep_their_traceback():
    tf = pytest.importorskip("tensorflow")

    def run(config):
        raise tf.errors.InternalError(None, None, "Collective ops is aborted by: something else")

    with pytest.raises(tf.errors.InternalError, match="something else"):
        run_cli(lambda argv: None, run, [])
