"""The registry of benchmark suites, the config every suite reads, and the records suites return.

A suite is a function of the run's `BenchConfig` and the results of the suites
that ran before it, returning a `SuiteResult`: a status and a list of records
(plain dicts, the rows of the JSON file). Register a new suite with:

    @register_suite("export", "SavedModel inference, folded against unfolded")
    def run_export(config: BenchConfig, previous: dict) -> SuiteResult:
        ...
        return SuiteResult(status="ok", records=[measurement(...), ...])

`requires` names suites whose results this one reads (run first, also when
not asked for); a placeholder registers with `counts_as_done=False`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results"

# Fields that, with `suite`, identify what was measured; two records that
# agree on them (and differ in `implementation`) are compared in ratios, with
# the one named REFERENCE_IMPLEMENTATION (or marked `reference`) as the base.
GROUP_FIELDS = ("suite", "network", "shape", "layout", "mode", "jit", "replicas", "strategy")
REFERENCE_IMPLEMENTATION = "keras"


@dataclasses.dataclass
class BenchConfig:
    """What `python -m bench` was asked to do.

    Attributes:
        quick: The few-minute smoke version: fewer shapes, networks, repeats and steps.
        suites: Names of the suites to run (and those they require); empty runs all.
        repeats: Timed repetitions per measurement; None: each suite's default.
        out: Folder the `.md` and `.json` files are written to.
    """

    quick: bool = False
    suites: Tuple[str, ...] = ()
    repeats: Optional[int] = None
    out: pathlib.Path = DEFAULT_OUT

    def __post_init__(self):
        if self.repeats is not None and (isinstance(self.repeats, bool) or self.repeats < 1):
            raise ValueError(f"`repeats` must be a positive integer or None. Received: repeats={self.repeats!r}")
        unknown = [name for name in self.suites if name not in SUITES]
        if unknown:
            raise ValueError(f"`suites` names unknown suites {unknown}; known: {list(SUITES)}. "
                             f"Received: suites={list(self.suites)}")  # fmt: skip
        self.out = pathlib.Path(self.out)

    def repeats_or(self, full: int, quick: int) -> int:
        """The `--repeats` value, else the suite's default for this kind of run."""
        if self.repeats is not None:
            return self.repeats
        return quick if self.quick else full


@dataclasses.dataclass
class SuiteResult:
    """What one suite produced: "ok", "skipped" or "failed" (with the `reason`), records, and notes for the
    report (how the suite measured)."""

    status: str = "ok"
    records: List[dict] = dataclasses.field(default_factory=list)
    reason: str = ""
    notes: List[str] = dataclasses.field(default_factory=list)


SuiteFunction = Callable[[BenchConfig, Dict[str, SuiteResult]], SuiteResult]


@dataclasses.dataclass(frozen=True)
class Suite:
    """A registered suite: `name` is what `--suite` calls it, and its records' `suite`."""

    name: str
    description: str
    run: SuiteFunction
    requires: Tuple[str, ...] = ()
    counts_as_done: bool = True


SUITES: Dict[str, Suite] = {}


def register_suite(name: str, description: str, requires: Sequence[str] = (), counts_as_done: bool = True):
    """Decorator adding a suite function to `SUITES` under `name` (`bench.load_suites` puts them in run order)."""

    def decorate(function: SuiteFunction) -> SuiteFunction:
        if name in SUITES:
            raise ValueError(f"A suite named {name!r} is already registered. Received: name={name!r}")
        missing = [r for r in requires if r not in SUITES]
        if missing:
            raise ValueError(f"Suite {name!r} requires {missing}, which must be registered before it. "
                             f"Received: requires={list(requires)}")  # fmt: skip
        SUITES[name] = Suite(name, description, function, tuple(requires), counts_as_done)
        return function

    return decorate


def resolve(names: Sequence[str]) -> List[Suite]:
    """The suites to run for `names` (all when empty), dependencies added, in registry order."""
    wanted = set(names or SUITES)
    pending = list(wanted)
    while pending:
        for dependency in SUITES[pending.pop()].requires:
            if dependency not in wanted:
                wanted.add(dependency)
                pending.append(dependency)
    return [suite for name, suite in SUITES.items() if name in wanted]


def _case(record, suite, implementation, shape, layout, mode, jit, replicas) -> dict:
    """The fields that name what a record measured (shared by measurements and skips)."""
    return dict(record=record, suite=suite, implementation=implementation, shape=list(shape), layout=layout,
                mode=mode, jit=bool(jit), replicas=int(replicas))  # fmt: skip


def measurement(suite: str, implementation: str, shape: Sequence[int], layout: str, mode: str, jit: bool,
                seconds: Sequence[float], replicas: int = 1, **extra) -> dict:  # fmt: skip
    """A measurement record from the per-repetition times of one implementation (ratios: `report.add_ratios`)."""
    from bench.timing import summarize

    case = _case("measurement", suite, implementation, shape, layout, mode, jit, replicas)
    return {**case, **summarize(seconds), "ratio_to_keras": None, **extra}


def skipped(suite: str, implementation: str, shape: Sequence[int], layout: str, mode: str, jit: bool, reason: str,
            replicas: int = 1, **extra) -> dict:  # fmt: skip
    """A record saying one measurement could not be taken here, and why."""
    return {**_case("skipped", suite, implementation, shape, layout, mode, jit, replicas), "reason": reason, **extra}


def timed_records(suite: str, timings: dict, label: Callable[[str], dict]) -> List[dict]:
    """A measurement per candidate `bench.timing.time_interleaved` timed, a skip (its error) per one it could not.

    `label(name)` gives the record's fields (shape, layout, mode, jit, any
    others), which may override the calls per repetition, first call's
    seconds and load average. Prints each median, to follow a long run.
    """
    load = [round(value, 2) for value in os.getloadavg()]
    records = [
        skipped(suite, name, reason=timing.error, **label(name)) if timing.error else measurement(
            suite, name, seconds=timing.seconds, **{"calls_per_repetition": timing.calls_per_repetition,
            "first_call_s": timing.first_call_s, "load_average": load, **label(name)},
        )
        for name, timing in timings.items()
    ]  # fmt: skip
    for r in records:
        what = f"{r['median_s'] * 1e3:.4g} ms" if "median_s" in r else f"skipped: {r['reason']}"
        case = f"{tuple(r['shape'])} {r['layout']} {r['mode']}{' jit' * r['jit']} {r['replicas']} replica(s)"
        print(f"[{suite}] {r['implementation']} {case}: {what}", file=sys.stderr, flush=True)
    return records
