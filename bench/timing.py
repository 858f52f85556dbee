"""Interleaved timing: every candidate measured in turn, round after round.

On a shared machine the speed drifts (other processes, frequency scaling).
Timing A A A ... then B B B ... lets the drift land on one candidate; A B C
A B C ... (the order rotated each round) spreads it over all, so the ratios
between candidates stay meaningful where the absolute times do not.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence


@dataclasses.dataclass
class Candidate:
    """One thing to time: `call` runs it once; a `self_timed` call returns the seconds it measured itself (e.g.
    an epoch inside `fit`, without fit's set-up), recorded as one repetition."""

    name: str
    call: Callable[[], object]
    self_timed: bool = False


@dataclasses.dataclass
class Timings:
    """One candidate's time per call in each repetition (averaged over `calls_per_repetition` calls), its first
    warm-up call's time (tracing and compiling included), or the `error` that kept it from being timed."""

    seconds: List[float] = dataclasses.field(default_factory=list)
    calls_per_repetition: int = 1
    first_call_s: float = float("nan")
    error: Optional[str] = None


def summarize(seconds: Sequence[float]) -> dict:
    """Median, min, max and count of per-repetition times."""
    if not seconds:
        raise ValueError(f"`seconds` must hold at least one time. Received: seconds={list(seconds)!r}")
    return dict(median_s=statistics.median(seconds), min_s=min(seconds), max_s=max(seconds), repeats=len(seconds))


def describe_error(error: BaseException) -> str:
    """The error's type and first line, short enough for a table cell."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first if len(first) <= 240 else first[:237] + '...'}"


def time_interleaved(candidates: Sequence[Candidate], repeats: int, min_repetition_s: float,
                     max_calls_per_repetition: int = 1000, block_until_done: Callable[[object], None] = lambda r: None,
                     warmup_calls: int = 1) -> Dict[str, Timings]:  # fmt: skip
    """Times `candidates` interleaved, after a warm-up; returns a `Timings` per candidate name.

    Warm-up: each candidate is called `warmup_calls` times (the first call
    traces and compiles; pass 0 for candidates already called), then once
    more, timed, to set how many calls (at most `max_calls_per_repetition`)
    one repetition makes so that it lasts at least `min_repetition_s` (short
    calls are dominated by timer resolution and dispatch jitter otherwise). A
    candidate that raises during warm-up is not timed; its `Timings.error`
    says why. Then `repeats` rounds, each timing every candidate once, in an
    order rotated by one each round, with the garbage collector off.
    `block_until_done(result)` runs before the clock stops (on GPUs: wait for
    the device; on CPUs calls are synchronous).
    """
    if repeats < 1:
        raise ValueError(f"`repeats` must be at least 1. Received: repeats={repeats}")
    results = {c.name: Timings() for c in candidates}
    live = []
    for candidate in candidates:
        timings = results[candidate.name]
        try:
            for index in range(warmup_calls):
                start = time.perf_counter()
                block_until_done(candidate.call())
                if index == 0:
                    timings.first_call_s = time.perf_counter() - start
            start = time.perf_counter()
            block_until_done(candidate.call())
            once = max(time.perf_counter() - start, 1e-7)
        except Exception as error:  # noqa: BLE001 - recorded, not hidden
            timings.error = describe_error(error)
            continue
        if not candidate.self_timed:
            calls = math.ceil(min_repetition_s / once)
            timings.calls_per_repetition = int(min(max_calls_per_repetition, max(1, calls)))
        live.append(candidate)

    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for round_index in range(repeats):
            shift = round_index % max(len(live), 1)
            for candidate in live[shift:] + live[:shift]:
                timings = results[candidate.name]
                if candidate.self_timed:
                    timings.seconds.append(float(candidate.call()))
                    continue
                calls, result, start = timings.calls_per_repetition, None, time.perf_counter()
                for _ in range(calls):
                    result = candidate.call()
                block_until_done(result)
                timings.seconds.append((time.perf_counter() - start) / calls)
                del result
    finally:
        if gc_was_enabled:
            gc.enable()
    return results
