"""Fresh processes for the tests: one place to run, start and stop them.

* `python_env(env)`: this process's environment with the repository
  importable and TensorFlow's C++ logging quiet; `env` on top (None removes).
* `run_python(code_or_args, ...)`: run Python to the end (a fixture too,
  from conftest.py).
* `start_python(args, log, ...)`: start `timeout -k 5 T python ARGS` in its
  own process group, output to log files; `kill_group(process)` ends the
  group and reaps it; `logs(log)` reads the tails back.
* `free_ports(count)` on 127.0.0.1 and `tf_configs(workers)`, a
  `TF_CONFIG` per worker of a local MultiWorkerMirroredStrategy cluster;
  `run_workers(worker_args, folder, ...)` runs such a cluster to the end.
* `WORKER_ENV`: what a TensorFlow worker process needs on top (GPUs hidden,
  no cluster config inherited from the caller).

Every helper takes Python arguments as a list (`["-m", "training.train", ...]`)
and runs `sys.executable`, so a test process and its children share one
interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Union

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# GPUs hidden, so logical CPU replicas (and a run's numbers) are the same on
# a machine with one; no TF_CONFIG inherited from the caller's shell.
WORKER_ENV = {"CUDA_VISIBLE_DEVICES": "", "TF_CONFIG": None}

Env = Optional[Mapping[str, Optional[str]]]


def python_env(env: Env = None) -> dict:
    """This process's environment, the repository first on `PYTHONPATH`, `env` on top (a None value removes)."""
    full_env = dict(os.environ)
    full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    for key, value in (env or {}).items():
        if value is None:
            full_env.pop(key, None)
        else:
            full_env[key] = str(value)
    return full_env


def tail(text, limit: int = 4000) -> str:
    """The last `limit` characters of a process's output (str, bytes or None)."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text[-limit:]


def run_python(
    code_or_args: Union[str, Sequence[str]],
    env: Env = None,
    timeout: float = 600,
    check: bool = True,
    cwd: Union[str, Path, None] = None,
) -> subprocess.CompletedProcess:
    """Runs Python in a fresh process, with the repository importable.

    Args:
        code_or_args: A string of Python source (dedented, run with `-c`), or a
            list of arguments for the interpreter (e.g. `["-m", "training.train", "--epochs", "1"]`).
        env: Variables to set on top of `python_env()`; a value of None removes
            the variable (e.g. `{"KERAS_BACKEND": None}`).
        timeout: Seconds before the process is killed (the test then fails).
        check: Fail the calling test, showing the output's tail, when the
            process exits non-zero.
        cwd: Working directory (default: the repository root).

    Returns:
        The `subprocess.CompletedProcess`, with `stdout` and `stderr` as text.
    """
    if isinstance(code_or_args, str):
        args = ["-c", textwrap.dedent(code_or_args)]
    else:
        args = [str(a) for a in code_or_args]
    try:
        result = subprocess.run(
            [sys.executable, *args], env=python_env(env), cwd=str(cwd or REPO_ROOT),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as error:  # subprocess.run has killed it
        pytest.fail(f"subprocess timed out after {timeout}s: {args[:2]}\n{tail(error.stdout)}\n{tail(error.stderr)}")
    if check and result.returncode != 0:
        pytest.fail(
            f"subprocess exited with {result.returncode}: {args[:2]}\n"
            f"--- stdout ---\n{tail(result.stdout)}\n--- stderr ---\n{tail(result.stderr)}"
        )
    return result


def start_python(
    args: Sequence[str],
    log: Path,
    env: Env = None,
    timeout: float = 600,
    cwd: Union[str, Path, None] = None,
    merge_stderr: bool = False,
) -> subprocess.Popen:
    """Starts `timeout -k 5 T python ARGS` in its own process group, without waiting.

    `timeout` bounds the process even if the test dies (TensorFlow catches
    SIGTERM; `-k 5` sends SIGKILL 5 s later); the own group lets
    `kill_group` end `timeout` and Python together.

    Args:
        args: Arguments for the interpreter.
        log: Output goes to `LOG.out` and `LOG.err`, or both to `LOG.log`
            with `merge_stderr`.
        env: Variables on top of `python_env()` (None removes).
        timeout: Seconds before `timeout` stops the process.
        cwd: Working directory (default: the repository root).
        merge_stderr: One log file, stderr interleaved with stdout.
    """
    names = [f"{log}.log"] if merge_stderr else [f"{log}.out", f"{log}.err"]
    files = [open(name, "w") for name in names]
    try:
        return subprocess.Popen(
            ["timeout", "-k", "5", str(int(timeout)), sys.executable, *map(str, args)],
            cwd=str(cwd or REPO_ROOT), env=python_env(env), stdout=files[0],
            stderr=subprocess.STDOUT if merge_stderr else files[1], start_new_session=True,
        )  # fmt: skip
    finally:
        for handle in files:
            handle.close()


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILLs the process group `process` leads (timeout and its Python child) if alive, then reaps it."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def logs(log: Path, limit: int = 3000) -> str:
    """The tails of what a `start_python(args, log)` process wrote, labelled."""
    parts = []
    for suffix in (".log", ".out", ".err"):
        path = Path(f"{log}{suffix}")
        if path.exists():
            parts.append(f"--- {path.name} ---\n{tail(path.read_text(errors='replace'), limit)}")
    return "\n".join(parts)


def free_ports(count: int) -> List[int]:
    """`count` distinct ports free on 127.0.0.1 just now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def tf_configs(workers: int) -> List[str]:
    """One `TF_CONFIG` per worker of a MultiWorkerMirroredStrategy cluster on 127.0.0.1 (worker 0 is the chief)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(workers)]}
    return [json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}) for i in range(workers)]


def run_workers(
    worker_args: Sequence[Sequence],
    folder: Path,
    env: Env = None,
    timeout: float = 600,
    cwds: Optional[Sequence[Union[str, Path]]] = None,
    merge_stderr: bool = True,
) -> List[tuple]:
    """Runs one process per entry of `worker_args` (Python arguments), each with its `TF_CONFIG`, to the end.

    Worker i logs to `folder/worker-i` (`start_python`; `logs()` reads it
    back) and runs in `cwds[i]` (default: the repository root). Waits for all
    within `timeout` (plus 30 s), and kills every group still alive when
    anything goes wrong.

    Returns:
        `(exit status, log prefix)` per worker.
    """
    processes, prefixes = [], []
    try:
        for index, (args, config) in enumerate(zip(worker_args, tf_configs(len(worker_args)))):
            prefixes.append(folder / f"worker-{index}")
            processes.append(start_python(
                args, prefixes[-1], env={**(env or {}), "TF_CONFIG": config}, timeout=timeout,
                cwd=cwds[index] if cwds else None, merge_stderr=merge_stderr,
            ))  # fmt: skip
        deadline = time.monotonic() + timeout + 30
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:
            kill_group(process)
    return [(process.returncode, prefix) for process, prefix in zip(processes, prefixes)]


def load_module(path: Path, name: str):
    """A worker script loaded as a module, for its constants and data generators (no `__main__` run)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

