"""The memory-bandwidth floor: how fast could a batch norm possibly be here?

Batch norm does a handful of flops per element, so on a CPU (and on a GPU)
its time is set by how many bytes it moves between memory and the cores.
The floor of one pass is `bytes it must move / memory bandwidth`:

* bandwidth: measured with a large copy (`numpy.copyto` of buffers far larger
  than any cache, counting bytes read plus bytes written), once on one
  thread and once on one thread per core; the best rate seen is the floor's
  bandwidth (a floor is the least time possible, not the typical one).
* bytes per pass, for float32 inputs of `n` elements (the per-channel vectors
  are negligible):
  - inference: read x, write y: 2 passes, `8 n` bytes;
  - training step: forward reads x for the statistics and again to
    normalize, and writes y (3 passes); backward reads dy and x for the
    gamma/beta gradients, then dy and x again and writes dx (5 passes):
    8 passes, `32 n` bytes.
  An implementation that keeps the tensor in cache between passes (small
  shapes do fit) can beat this floor: `time_over_floor` below 1 then means
  "cache-resident", not "faster than memory".

`add_floor(records, bandwidth)` adds `bytes_moved`-based fields to every
measurement that has them.
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
    """Wall time of copying `source` into `target`, split over `threads` threads.

    numpy releases the GIL while it copies plain float arrays, so the
    threads copy in parallel.
    """
    bounds = np.linspace(0, source.size, threads + 1).astype(int)
    workers = [
        threading.Thread(target=np.copyto, args=(target[lo:hi], source[lo:hi]))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start


def measure_bandwidth(buffer_bytes: int, repeats: int) -> Dict[str, object]:
    """Copy bandwidth in GB/s (1e9 bytes/s) for 1 thread and one thread per core.

    Args:
        buffer_bytes: Size of each of the two buffers.
        repeats: Copies timed per thread count (interleaved between the counts).

    Returns:
        A dict with the per-count medians and bests and `bandwidth_gbps`,
        the best rate overall (the floor's bandwidth).
    """
    elements = buffer_bytes // BYTES_PER_ELEMENT
    source = np.full(elements, 1.0, dtype=np.float32)
    # Touch every page of the target first: a first write would also time
    # the kernel mapping fresh pages.
    target = np.zeros(elements, dtype=np.float32)
    thread_counts = sorted({1, usable_cores()})
    seconds: Dict[int, List[float]] = {count: [] for count in thread_counts}
    for count in thread_counts:
        _copy_seconds(source, target, count)  # warm-up
    for _ in range(repeats):
        for count in thread_counts:
            seconds[count].append(_copy_seconds(source, target, count))
    moved = 2 * elements * BYTES_PER_ELEMENT  # read + written
    per_count = {
        str(count): {
            "median_gbps": moved / float(np.median(times)) / 1e9,
            "best_gbps": moved / min(times) / 1e9,
        }
        for count, times in seconds.items()
    }
    return {
        "buffer_bytes": elements * BYTES_PER_ELEMENT,
        "bytes_per_copy": moved,
        "repeats": repeats,
        "by_threads": per_count,
        "bandwidth_gbps": max(v["best_gbps"] for v in per_count.values()),
    }


def add_floor(records: List[dict], bandwidth_gbps: float) -> None:
    """Adds `floor_s`, `achieved_gbps` and `time_over_floor` to records with `bytes_moved`."""
    for record in records:
        if record.get("record") != "measurement" or not record.get("bytes_moved"):
            continue
        moved = record["bytes_moved"]
        record["floor_s"] = moved / (bandwidth_gbps * 1e9)
        record["achieved_gbps"] = moved / record["median_s"] / 1e9
        record["time_over_floor"] = record["median_s"] / record["floor_s"]


@register_suite("floor", "memory bandwidth from a large copy: the floor every BN pass is held to")
def run_floor(config: BenchConfig, previous) -> SuiteResult:
    del previous
    buffer_bytes = (64 if config.quick else 512) * 2**20
    repeats = config.repeats_or(full=7, quick=3)
    result = measure_bandwidth(buffer_bytes, repeats)
    record = {"record": "bandwidth", "suite": "floor", **result}
    by_threads = ", ".join(
        f"{count} thread(s): best {v['best_gbps']:.1f}, median {v['median_gbps']:.1f} GB/s"
        for count, v in result["by_threads"].items()
    )
    notes = [
        f"Copy of {buffer_bytes / 2**20:.0f} MiB, counting bytes read + written: {by_threads}. "
        f"Floor bandwidth (best seen): {result['bandwidth_gbps']:.1f} GB/s.",
        "Bytes each float32 BN call must move: inference 2 passes over the tensor (read x, write y), "
        "train step 8 (forward: x twice, y; backward: dy and x twice, dx).",
    ]
    return SuiteResult(records=[record], notes=notes)
