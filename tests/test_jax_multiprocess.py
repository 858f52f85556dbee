"""Two JAX processes on 127.0.0.1 (gloo CPU collectives) train kerasbn under `keras.distribution.DataParallel`.

Slow (a minute or more: three JAX processes start). The moving statistics
after the run equal those of one process on 2 host devices fed the same
global batches, on both processes; the chief saves alone and returns.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

WORKER = str(REPO_ROOT / "tests" / "_jax_multiprocess_worker.py")
TIMEOUT = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args, out, devices=1):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    command = ["timeout", "-k", "5", str(TIMEOUT), sys.executable, WORKER, "--out", str(out), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    assert process.returncode == 0, f"exit {process.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return json.loads(stdout.strip().splitlines()[-1])


def test_two_processes_match_one_process_fed_the_same_global_batches(tmp_path):
    port = str(_free_port())
    workers = [
        _start(["--process-id", str(i), "--processes", "2", "--port", port], tmp_path / f"p{i}") for i in range(2)
    ]
    reference = _start(["--processes", "1"], tmp_path / "ref", devices=2)
    try:
        results = [_finish(process) for process in workers]
        _finish(reference)
    finally:
        for process in workers + [reference]:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [r["devices"] for r in results] == [2, 2]
    # The chief saved alone, and promptly (a collective would have waited for the other process).
    assert results[0]["save_seconds"] is not None and results[0]["save_seconds"] < 60
    assert results[1]["save_seconds"] is None and not (tmp_path / "p1" / "model.keras").exists()
    want = np.load(tmp_path / "ref" / "statistics.npz")
    assert sorted(want) == ["bn1.moving_mean", "bn1.moving_variance", "bn2.moving_mean", "bn2.moving_variance"]
    for process in ("p0", "p1"):
        got = np.load(tmp_path / process / "statistics.npz")
        for name in want:
            # Measured: bit-equal (6 steps; the same per-device arithmetic, gloo's sums of two values).
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=f"{process} {name}")
    # The chief's save holds those statistics.
    import keras

    import kerasbn  # noqa: F401  (registers BatchNorm for loading)

    saved = keras.models.load_model(tmp_path / "p0" / "model.keras")
    for layer in ("bn1", "bn2"):
        got = keras.ops.convert_to_numpy(saved.get_layer(layer).moving_mean)
        np.testing.assert_allclose(got, want[f"{layer}.moving_mean"], rtol=0, atol=1e-6)
