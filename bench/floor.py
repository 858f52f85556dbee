"""The memory-bandwidth floor: how fast could a batch norm possibly be here?

Batch norm does a handful of flops per element, so its time is set by the
bytes it moves between memory and the cores: the floor of a call is `bytes it
must move / memory bandwidth`. The bandwidth is the best rate of a large copy
(`numpy.copyto` of buffers far larger than any cache, bytes read plus bytes
written) on one thread and on one thread per core: a floor is the least time
possible, not the typical one. A float32 call moves, per element, 2 passes in
inference (read x, write y) and 8 in a training step (forward: x twice, y;
backward: dy and x for the gamma/beta gradients, then dy, x and dx). A tensor
that stays in cache between passes (small shapes fit) can beat the floor:
`time_over_floor` below 1 then means "cache-resident", not "faster than memory".
"""

from __future__ import annotations

import math
import threading
import time
from typing import Dict, List

import numpy as np

from bench.machine import usable_cores
from bench.suites import BenchConfig, SuiteResult, register_suite

BYTES_PER_ELEMENT = 4  # float32
PASSES = {"inference": 2, "train_step": 8}


def bytes_moved(shape, mode: str) -> int:
    """The least number of bytes one BN call of `mode` on a float32 tensor of `shape` must move."""
    if mode not in PASSES:
        raise ValueError(f"`mode` must be one of {list(PASSES)}. Received: mode={mode!r}")
    return PASSES[mode] * BYTES_PER_ELEMENT * math.prod(shape)


def _copy_seconds(source: np.ndarray, target: np.ndarray, threads: int) -> float:
    """Wall time of copying `source` into `target` on `threads` threads (numpy's copy releases the GIL)."""
    bounds = np.linspace(0, source.size, threads + 1).astype(int)
    workers = [threading.Thread(target=np.copyto, args=(target[a:b], source[a:b])) for a, b in zip(bounds, bounds[1:])]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def measure_bandwidth(buffer_bytes: int, repeats: int) -> Dict[str, object]:
    """Copy bandwidth in GB/s (1e9 bytes/s) for 1 thread and one per core, `repeats` copies of `buffer_bytes` each.

    Returns the per-count medians and bests and `bandwidth_gbps`, the best rate overall (the floor's bandwidth).
    """
    elements = buffer_bytes // BYTES_PER_ELEMENT
    source = np.full(elements, 1.0, dtype=np.float32)
    target = np.zeros(elements, dtype=np.float32)  # pages touched: a first write would time their mapping
    thread_counts = sorted({1, usable_cores()})
    seconds: Dict[int, List[float]] = {count: [] for count in thread_counts}
    for count in thread_counts:
        _copy_seconds(source, target, count)  # warm-up
    for _ in range(repeats):
        for count in thread_counts:
            seconds[count].append(_copy_seconds(source, target, count))
    moved = 2 * elements * BYTES_PER_ELEMENT  # read + written
    per_count = {str(count): {"median_gbps": moved / float(np.median(t)) / 1e9, "best_gbps": moved / min(t) / 1e9}
                 for count, t in seconds.items()}  # fmt: skip
    return {"buffer_bytes": elements * BYTES_PER_ELEMENT, "bytes_per_copy": moved, "repeats": repeats,
            "by_threads": per_count, "bandwidth_gbps": max(v["best_gbps"] for v in per_count.values())}  # fmt: skip


def add_floor(records: List[dict], bandwidth_gbps: float) -> None:
    """Adds `floor_s`, `achieved_gbps` and `time_over_floor` to records with `bytes_moved`."""
    for record in records:
        if record.get("record") == "measurement" and record.get("bytes_moved"):
            moved, floor_s = record["bytes_moved"], record["bytes_moved"] / (bandwidth_gbps * 1e9)
            record.update(floor_s=floor_s, achieved_gbps=moved / record["median_s"] / 1e9,
                          time_over_floor=record["median_s"] / floor_s)  # fmt: skip


@register_suite("floor", "memory bandwidth from a large copy: the floor every BN pass is held to")
def run_floor(config: BenchConfig, previous) -> SuiteResult:
    del previous
    buffer_bytes = (64 if config.quick else 512) * 2**20
    result = measure_bandwidth(buffer_bytes, config.repeats_or(full=7, quick=3))
    by_threads = ", ".join(f"{count} thread(s): best {v['best_gbps']:.1f}, median {v['median_gbps']:.1f} GB/s"
                           for count, v in result["by_threads"].items())  # fmt: skip
    notes = [
        f"Copy of {buffer_bytes / 2**20:.0f} MiB, counting bytes read + written: {by_threads}. "
        f"Floor bandwidth (best seen): {result['bandwidth_gbps']:.1f} GB/s.",
        "Bytes each float32 BN call must move: inference 2 passes over the tensor (read x, write y), "
        "train step 8 (forward: x twice, y; backward: dy and x twice, dx).",
    ]
    return SuiteResult(records=[{"record": "bandwidth", "suite": "floor", **result}], notes=notes)
