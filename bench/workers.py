"""The worker pattern: a suite's measurements in a fresh process, and what every worker shares.

Two replicas on a CPU-only machine need two logical CPU devices, which can only
be configured before TensorFlow initialises its runtime; so a suite runs its
module in a fresh interpreter (`run_worker`, or `run_workers` for a cluster),
whose `__main__` calls `serve`: parse the arguments, configure the devices,
measure, write the records.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Optional

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_worker(module: str, arguments, timeout_s: float, env: Optional[dict] = None) -> list:
    """Runs `python -m <module> <arguments> --json-out FILE` in a fresh interpreter (`env` added to the
    environment); returns its records."""
    return run_workers(module, [arguments], timeout_s, env)[0]


def run_workers(module: str, argument_lists, timeout_s: float, env: Optional[dict] = None) -> List[list]:
    """Like `run_worker`, one process per argument list, all at once; returns each one's records.

    Every process still running when one fails or the time is up is killed.
    """
    with tempfile.TemporaryDirectory() as folder:
        outs = [os.path.join(folder, f"records{index}.json") for index in range(len(argument_lists))]
        path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **(env or {}), "PYTHONPATH": path}
        processes = []
        try:
            for arguments, out in zip(argument_lists, outs):
                command = [sys.executable, "-m", module, *map(str, arguments), "--json-out", out]
                processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL))
            deadline = time.monotonic() + timeout_s
            for process in processes:
                process.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                if process.returncode != 0:
                    raise RuntimeError(f"worker {process.args[2:-2]} exited with {process.returncode} (stderr above)")
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        return [json.loads(pathlib.Path(out).read_text(encoding="utf-8"))["records"] for out in outs]


def serve(measure: Callable[[argparse.Namespace], list], **defaults) -> None:
    """A worker's `__main__`: writes `measure(args)`'s records to `--json-out`; `args` has a `--name value` per
    keyword of `defaults`, of its type (a flag for False, several values for a list). Exits at once after writing:
    TensorFlow's native teardown after a distributed run can hang for minutes."""
    parser = argparse.ArgumentParser()
    for name, default in {**defaults, "json_out": ""}.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            several = isinstance(default, list)
            item = (default or [""])[0] if several else default
            parser.add_argument(flag, nargs="+" if several else None, type=type(item), default=default)
    args = parser.parse_args()
    records = measure(args)
    pathlib.Path(args.json_out).write_text(json.dumps({"records": records}), encoding="utf-8")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_ports(count: int) -> list:
    """`count` TCP ports free on 127.0.0.1 now, for a cluster's workers."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def configure_devices(replicas: int):
    """Makes `replicas` devices available and returns the strategy over them, before TensorFlow's runtime starts.

    The project's strategy factory (`training.distribute`) splits the CPU into
    logical devices and mirrors over them (or over the GPUs); one replica: one device.
    """
    import tensorflow as tf

    from training.distribute import configure_cpu_replicas, get_strategy

    if not tf.config.list_physical_devices("GPU"):
        configure_cpu_replicas(replicas)
    return get_strategy("auto")


def synthetic_dataset(batch_size: int, image_shape=(28, 28, 1), batches: int = 8):
    """Random images and labels of 10 classes, batched and repeated forever (speed does not depend on values)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.standard_normal((batches * batch_size, *image_shape), dtype=np.float32)
    labels = rng.integers(0, 10, size=batches * batch_size).astype(np.int32)
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size, drop_remainder=True).cache().repeat()


def compile_models(models: dict, from_logits: bool = False, jit_compile: bool = False) -> dict:
    """Compiles every model of `{name: model}` as the suites train: SGD(0.01), sparse cross-entropy."""
    import keras

    for model in models.values():
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss=loss, jit_compile=jit_compile)
    return models
