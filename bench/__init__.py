"""kerasbn's benchmark: the layer against keras, the raw kernel and the memory floor.

    python -m bench                  # everything, about 30 minutes on a 2-core machine
    python -m bench --quick          # a few-minute smoke version (the tests run it)
    python -m bench --suite layer --repeats 9 --out /tmp/bench
    python -m bench --suite distributed   # synchronized BN, 2 replicas and 2 workers

Results go to bench/results/<date>-<host>.md and .json, copied to latest.md
(tracked: the tables) and latest.json (the raw records, git-ignored). The
suites run in the order of `SUITE_MODULES`, each module's docstring saying
what it measures (`python -m bench --help` lists them; `bench.suites` says how
to add one). A suite that needs several replicas measures in a fresh process
(`bench.workers`).
This module stays free of TensorFlow imports: `python -m bench` sets the
environment first, and the workers configure devices before TensorFlow starts.
"""

from bench.suites import SUITES, BenchConfig, Suite, SuiteResult, register_suite

SUITE_MODULES = (
    "bench.floor", "bench.layer_suite", "bench.training_suite", "bench.export_suite", "bench.models_suite",
    "bench.distributed_suite",
)  # fmt: skip


def load_suites() -> dict:
    """Imports the suite modules; `SUITES` sorted in the order of `SUITE_MODULES` (the run order)."""
    import importlib

    for module in SUITE_MODULES:
        importlib.import_module(module)
    ordered = sorted(SUITES.values(), key=lambda suite: SUITE_MODULES.index(suite.run.__module__))
    SUITES.clear()
    SUITES.update((suite.name, suite) for suite in ordered)
    return SUITES


__all__ = ["SUITES", "BenchConfig", "Suite", "SuiteResult", "load_suites", "register_suite"]
