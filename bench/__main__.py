"""`python -m bench [--quick] [--suite NAME ...] [--repeats N] [--out DIR]`.

Runs the chosen suites (all by default) in one process, writes
`<out>/<date>-<host>.md` and `.json` plus `latest.md` / `latest.json`, and
prints the report. Exits 1 when a suite failed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import traceback

# Before TensorFlow or Keras is imported anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.setdefault("KERAS_BACKEND", "tensorflow") != "tensorflow":
    sys.exit("The benchmark measures TensorFlow kernels and needs the TensorFlow backend. "
             f"Received: KERAS_BACKEND={os.environ['KERAS_BACKEND']!r}")  # fmt: skip

from bench import load_suites  # noqa: E402
from bench.suites import DEFAULT_OUT, BenchConfig, SuiteResult, resolve  # noqa: E402


def parse_args(argv=None) -> BenchConfig:
    suites = load_suites()
    epilog = "Suites: " + "; ".join(f"{s.name}: {s.description}" for s in suites.values())
    parser = argparse.ArgumentParser(prog="python -m bench", epilog=epilog, description="Benchmark kerasbn.BatchNorm "
                                     "against keras, the raw fused kernel and the memory floor.")
    parser.add_argument("--quick", action="store_true", help="~2-minute smoke version: fewer shapes and repeats")
    parser.add_argument(
        "--suite", dest="suites", nargs="+", action="extend", default=[], choices=list(suites), metavar="NAME",
        help=f"suites to run (default: all): {', '.join(suites)}; the suites they require run too",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per measurement")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: bench/results)")
    args = parser.parse_args(argv)
    return BenchConfig(quick=args.quick, suites=tuple(args.suites), repeats=args.repeats, out=args.out)


def run(config: BenchConfig) -> list:
    """Runs the suites of `config`; returns every record, header first, ratios and floor filled in."""
    from bench import floor, report
    from bench.machine import header_record
    from bench.timing import describe_error

    run_start = time.perf_counter()
    header = header_record(config, datetime.datetime.now(datetime.timezone.utc))
    records, results = [header], {}
    for suite in resolve(config.suites):
        print(f"[bench] suite {suite.name}: {suite.description}", file=sys.stderr, flush=True)
        suite_start = time.perf_counter()
        try:
            result = suite.run(config, results)
        except Exception as error:  # noqa: BLE001 - one failing suite must not lose the others
            traceback.print_exc()
            result = SuiteResult(status="failed", reason=describe_error(error))
        results[suite.name] = result
        records.append(dict(record="suite", name=suite.name, description=suite.description, status=result.status,
                            reason=result.reason, counts_as_done=suite.counts_as_done,
                            elapsed_s=time.perf_counter() - suite_start, notes=result.notes))  # fmt: skip
        records.extend(result.records)
        if result.status != "ok":
            print(f"[bench] suite {suite.name} {result.status}: {result.reason}", file=sys.stderr, flush=True)
    for bandwidth in (r for r in records if r.get("record") == "bandwidth"):
        floor.add_floor(records, bandwidth["bandwidth_gbps"])
    report.add_ratios(records)
    header["elapsed_s"] = time.perf_counter() - run_start
    return records


def main(argv=None) -> int:
    config = parse_args(argv)
    from bench import report

    records = run(config)
    markdown_path, json_path = report.write(records, config.out)
    print("\n" + markdown_path.read_text(encoding="utf-8"))
    print(f"\nWrote {markdown_path} and {json_path} (and latest.md / latest.json) in {records[0]['elapsed_s']:.0f} s")
    failed = [r["name"] for r in records if r.get("record") == "suite" and r["status"] == "failed"]
    if failed:
        print(f"Suites failed: {failed}", file=sys.stderr)
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
