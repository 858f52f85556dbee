"""Part 3: LeNet-BN training throughput with kerasbn, keras and no batch norm, 1 and 2 replicas.

Runs `bench.training_worker` in a subprocess per replica count (two
replicas on a CPU need logical devices configured before TensorFlow
starts), the norms interleaved inside each. The model comes
from `training.models.build_lenet`; where that does not exist yet the suite
reports itself skipped.
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from bench.suites import BenchConfig, SuiteResult, register_suite

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
REPLICAS = (1, 2)
NORMS = ("kerasbn", "keras", "none")


def _build_lenet_available() -> str:
    """Empty when `training.models.build_lenet` can be imported, else why not."""
    try:
        models = importlib.import_module("training.models")
    except ImportError as error:
        return f"training.models not available ({type(error).__name__}: {error})"
    if not callable(getattr(models, "build_lenet", None)):
        return "training.models not available (it has no build_lenet)"
    return ""


def _run_worker(replicas: int, norms, steps: int, repeats: int, timeout_s: float):
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "training.json")
        command = [
            sys.executable, "-m", "bench.training_worker",
            "--replicas", str(replicas),
            "--norms", *norms,
            "--steps", str(steps),
            "--repeats", str(repeats),
            "--json-out", out,
        ]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=timeout_s, stdout=subprocess.PIPE)
        if completed.returncode != 0:
            raise RuntimeError(
                f"training worker {command[3:]} exited with {completed.returncode} (its stderr is above)"
            )
        with open(out, encoding="utf-8") as f:
            return json.load(f)["records"]


@register_suite("training", "LeNet-BN training throughput (fit), --norm kerasbn/keras/none, 1 and 2 replicas")
def run_training(config: BenchConfig, previous) -> SuiteResult:
    del previous
    missing = _build_lenet_available()
    if missing:
        return SuiteResult(status="skipped", reason=missing)
    steps = 4 if config.quick else 40
    repeats = config.repeats_or(full=5, quick=2)
    # A full run also times synchronized (global-batch) statistics at 2 replicas.
    norms = list(NORMS) if config.quick else [*NORMS, "kerasbn_sync"]
    records = []
    for replicas in REPLICAS:
        records += _run_worker(replicas, norms, steps, repeats, timeout_s=600 if config.quick else 1800)
    notes = [
        f"model.fit, one epoch of {steps} steps of global batch 256 per call, on synthetic 28x28x1 images "
        f"(10 classes), SGD, jit_compile=False; the epoch's own time (a callback), {repeats} repetitions "
        "interleaved across norms after two warm-up fits (the first traces).",
        "One process per replica count; strategy from training.distribute.get_strategy('auto'): one device "
        "for 1 replica, MirroredStrategy over 2 logical CPU devices (GPUs where present) for 2.",
        "epoch s (est.) = seconds per step x ceil(60000 / 256), Fashion-MNIST's training set.",
    ]
    return SuiteResult(records=records, notes=notes)
