"""The header record: which machine and which versions produced the numbers."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import socket
import subprocess
import sys


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            fields = [line.partition(":") for line in cpuinfo]
    except OSError:
        fields = []
    names = [value.strip() for key, _, value in fields if key.strip() in ("model name", "Model", "cpu model")]
    return next(iter(names), None) or platform.processor() or platform.machine() or "unknown"


def usable_cores() -> int:
    """CPU cores this process may run on (the affinity mask where there is one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def host_name() -> str:
    """The host name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname().split(".")[0]) or "host"


def git_commit():
    """The checkout's short commit, or None outside a git checkout."""
    root = pathlib.Path(__file__).resolve().parent.parent
    command = ["git", "rev-parse", "--short", "HEAD"]
    try:
        completed = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() or None


def header_record(config, started: datetime.datetime) -> dict:
    """The first record of every result file, for the run's `BenchConfig` begun at `started` (UTC)."""
    import keras
    import numpy as np
    import tensorflow as tf

    import kerasbn

    devices = [f"{d.device_type}:{d.name.rsplit(':', 1)[-1]}" for d in tf.config.list_physical_devices()]
    machine = dict(cpu_model=cpu_model(), cores=usable_cores(), logical_cpus=os.cpu_count(), devices=devices,
                   platform=platform.platform(), load_average_at_start=[round(v, 2) for v in os.getloadavg()])
    versions = dict(python=platform.python_version(), tensorflow=tf.__version__, keras=keras.__version__,
                    kerasbn=kerasbn.__version__, numpy=np.__version__)
    return dict(record="header", date=started.date().isoformat(), started_utc=started.isoformat(timespec="seconds"),
                host=host_name(), machine=machine, versions=versions, keras_backend=keras.backend.backend(),
                onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on for x86 CPUs)"), git_commit=git_commit(),
                command=" ".join([os.path.basename(sys.executable), "-m", "bench", *sys.argv[1:]]),
                quick=bool(config.quick), suites=list(config.suites), repeats=config.repeats)  # fmt: skip
