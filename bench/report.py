"""Ratios, goals and the Markdown report, computed from the records alone.

Everything here reads the list of records that is also written as JSON, so
a report can be rebuilt from a saved `.json` file (`render(records)`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import shutil
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from bench.suites import GROUP_FIELDS, REFERENCE_IMPLEMENTATION

LAYER_COLUMNS = ("kerasbn", "kerasbn_fused", "kerasbn_generic", "keras", "scratch", "tf_fused_kernel")
CORRECTNESS_TOLERANCE = 1e-4  # relative; float32 sums over a batch stay far below it


def _key(record: dict) -> Tuple:
    return tuple(json.dumps(record.get(field)) for field in GROUP_FIELDS)


def measurements(records: Iterable[dict], suite: Optional[str] = None) -> List[dict]:
    return [r for r in records if r.get("record") == "measurement" and (suite is None or r["suite"] == suite)]


def add_ratios(records: List[dict]) -> None:
    """Sets `ratio_to_keras` = median / the keras median of the same group (None without one).

    Also `min_ratio_to_keras` = min / the keras min: on a busy machine the
    fastest repetition is the one least disturbed, so this second figure
    helps tell noise from a real difference.
    """
    reference = {
        _key(r): r
        for r in measurements(records)
        if r.get("reference", r["implementation"] == REFERENCE_IMPLEMENTATION)
    }
    for record in measurements(records):
        base = reference.get(_key(record))
        record["ratio_to_keras"] = record["median_s"] / base["median_s"] if base else None
        record["min_ratio_to_keras"] = record["min_s"] / base["min_s"] if base else None


def _find(records, suite, implementation, **fields) -> Optional[dict]:
    for record in measurements(records, suite):
        if record["implementation"] == implementation and all(record.get(k) == v for k, v in fields.items()):
            return record
    return None


def _case(record: dict) -> str:
    shape = "x".join(map(str, record["shape"]))
    text = f"({shape}) {record['layout']}"
    if record.get("network"):
        text = f"{record['network']} {record['mode']} {text}"
    if record.get("replicas", 1) != 1:
        text += f" {record['replicas']} replicas"
    return text + (" jit" if record.get("jit") else "")


# ------------------------------------------------------------------ goals


@dataclasses.dataclass
class GoalResult:
    """One row of the goals table.

    Attributes:
        goal: What the issue asks for.
        status: "met", "missed" or "not evaluated".
        detail: The numbers behind the status (the worst case first).
    """

    goal: str
    status: str
    detail: str


def _ratio_goal(
    goal: str,
    pairs: List[Tuple[dict, dict]],
    limit: float,
    what: str,
    context: Optional[Callable[[dict], str]] = None,
    missing: str = "no measurements for it in this run",
) -> GoalResult:
    """`met` when time(a) / time(b) <= limit for every pair; the detail names the worst.

    `context(worst_record)` may add a note on the worst case (e.g. how fast
    the raw kernel was there, which bounds what any layer can reach).
    """
    if not pairs:
        return GoalResult(goal, "not evaluated", missing)
    ratios = sorted(((a["median_s"] / b["median_s"], a) for a, b in pairs), key=lambda t: -t[0])
    worst_ratio, worst = ratios[0]
    failing = [(ratio, r) for ratio, r in ratios if ratio > limit]
    status = "missed" if failing else "met"

    def fmt(ratio: float) -> str:
        # Enough digits that a ratio just over the limit does not print as the limit.
        text = f"{ratio:.2f}"
        return f"{ratio:.3f}" if float(text) == round(limit, 2) and ratio != limit else text

    detail = f"worst {fmt(worst_ratio)}x {what} on {_case(worst)}"
    note = context(worst) if context else ""
    if note:
        detail += f" ({note})"
    if failing:
        detail += f"; {len(failing)} of {len(ratios)} cases above {limit:g}x"
        if len(failing) > 1:
            detail += " (" + ", ".join(f"{_case(r)} {fmt(ratio)}x" for ratio, r in failing[1:4])
            detail += ", ..." if len(failing) > 4 else ""
            detail += ")"
    else:
        detail += f"; all {len(ratios)} cases at or below {limit:g}x"
    return GoalResult(goal, status, detail)


def _layer_pairs(records, implementation, reference, mode, jit, families) -> List[Tuple[dict, dict]]:
    pairs = []
    for record in measurements(records, "layer"):
        if (
            record["implementation"] != implementation
            or record["mode"] != mode
            or record["jit"] != jit
            or record.get("family") not in families
        ):
            continue
        other = _find(records, "layer", reference, shape=record["shape"], layout=record["layout"], mode=mode, jit=jit)
        if other is not None:
            pairs.append((record, other))
    return pairs


def goal_layer(records: List[dict]) -> List[GoalResult]:
    """The issue's train-step goals against keras and inference goal against the raw kernel."""

    def kernel_there(record: dict) -> str:
        kernel = _find(
            records, "layer", "tf_fused_kernel",
            shape=record["shape"], layout=record["layout"], mode=record["mode"], jit=record["jit"],
        )  # fmt: skip
        if kernel is None or kernel.get("ratio_to_keras") is None:
            return ""
        return f"the raw fused kernel there: {kernel['ratio_to_keras']:.2f}x of keras"

    results = []
    for jit in (False, True):
        suffix = " (jit_compile=True)" if jit else ""
        for families, limit, label in (
            (("resnet",), 0.5, "ResNet-sized 4-D shapes"),
            (("lenet", "dense"), 0.9, "LeNet shapes and 2-D"),
            (("resnet", "lenet", "dense"), 1.0, "every shape (never slower)"),
        ):
            results.append(
                _ratio_goal(
                    f"kerasbn train step <= {limit:g}x keras on {label}{suffix}",
                    _layer_pairs(records, "kerasbn", "keras", "train_step", jit, families),
                    limit,
                    "of keras",
                    context=kernel_there,
                    missing=_why_not_evaluated(records, "layer"),
                )
            )
        results.append(
            _ratio_goal(
                f"kerasbn inference <= 1.05x tf.compat.v1.nn.fused_batch_norm{suffix}",
                _layer_pairs(records, "kerasbn", "tf_fused_kernel", "inference", jit, ("resnet", "lenet", "dense")),
                1.05,
                "of the raw kernel",
                missing=_why_not_evaluated(records, "layer"),
            )
        )
    return results


EXPORT_GOAL_THROUGHPUT = 1.3  # folded over unfolded, at batch 256
EXPORT_GOAL_BATCH = 256


def _export_pair(records: List[dict], batch: int) -> Tuple[Optional[dict], Optional[dict]]:
    """The (folded, unfolded) SavedModel measurements at `batch`; None where missing."""
    found = {}
    for record in measurements(records, "export"):
        if record["shape"][0] == batch and record["implementation"] in ("savedmodel_folded", "savedmodel_unfolded"):
            found[record["implementation"]] = record
    return found.get("savedmodel_folded"), found.get("savedmodel_unfolded")


def goal_export(records: List[dict]) -> List[GoalResult]:
    """Folded SavedModel throughput over unfolded's at batch 256 (median times), batch 1 latency as context."""
    goal = f"Folded SavedModel >= {EXPORT_GOAL_THROUGHPUT:g}x the throughput of unfolded at batch {EXPORT_GOAL_BATCH}"
    folded, unfolded = _export_pair(records, EXPORT_GOAL_BATCH)
    if folded is None or unfolded is None:
        return [GoalResult(goal, "not evaluated", _why_not_evaluated(records, "export"))]
    # Throughput ratio = time ratio inverted (same batch size).
    speedup = unfolded["median_s"] / folded["median_s"]
    best_case = unfolded["min_s"] / folded["min_s"]
    status = "met" if speedup >= EXPORT_GOAL_THROUGHPUT else "missed"
    detail = (
        f"folded {speedup:.2f}x the throughput of unfolded at batch {EXPORT_GOAL_BATCH} "
        f"({folded['examples_per_s']:.0f} vs {unfolded['examples_per_s']:.0f} examples/s, "
        f"{_ms(folded['median_s'])} vs {_ms(unfolded['median_s'])} ms; fastest repetitions {best_case:.2f}x)"
    )
    folded_1, unfolded_1 = _export_pair(records, 1)
    if folded_1 is not None and unfolded_1 is not None:
        detail += (
            f"; batch 1 latency {_ms(folded_1['median_s'])} vs {_ms(unfolded_1['median_s'])} ms "
            f"({unfolded_1['median_s'] / folded_1['median_s']:.2f}x)"
        )
    return [GoalResult(goal, status, detail)]


def goal_training(records: List[dict]) -> List[GoalResult]:
    results = []
    for reference, limit, label in (
        ("keras", 1.0, "at least as fast per epoch as keras BN"),
        ("none", 1.15, "within 1.15x of no BN"),
    ):
        goal = f"LeNet-BN with kerasbn {label}"
        pairs = []
        for record in measurements(records, "training"):
            if record["implementation"] == "kerasbn":
                other = _find(records, "training", reference, replicas=record["replicas"], shape=record["shape"])
                if other is not None:
                    pairs.append((record, other))
        if not pairs:
            results.append(GoalResult(goal, "not evaluated", _why_not_evaluated(records, "training")))
        else:
            results.append(_ratio_goal(goal, pairs, limit, f"of {reference}'s epoch time"))
    return results


def _models(records, variant: str, mode: str, replicas: int = 1, networks=None) -> List[dict]:
    return [
        r for r in measurements(records, "models")
        if (r["variant"], r["mode"], r["replicas"]) == (variant, mode, replicas)
        and (networks is None or r["network"] in networks)
    ]  # fmt: skip


def _share_goal(goal: str, records: List[dict], limit: float) -> GoalResult:
    """`met` when kerasbn.convert's BN share of the 1-device train step is <= limit for every network."""
    shares = [(r["network"], r["bn_share"]) for r in _models(records, "kerasbn.convert", "train_step")]
    shares = [(network, share) for network, share in shares if share is not None]
    if not shares:
        return GoalResult(goal, "not evaluated", _why_not_evaluated(records, "models"))
    status = "missed" if any(share > limit for _, share in shares) else "met"
    detail = ", ".join(f"{network} {share:.2f}" for network, share in shares)
    return GoalResult(goal, status, f"BN share {detail} (limit {limit:g})")


def goal_models(records: List[dict]) -> List[GoalResult]:
    """Issue 9's goals: kerasbn.convert's train step against stock, kerasbn.fold's inference against no BN."""
    missing = _why_not_evaluated(records, "models")

    def pairs(variant, reference, mode, replicas=1, networks=None):
        found = []
        for record in _models(records, variant, mode, replicas, networks):
            other = _models(records, reference, mode, replicas, (record["network"],))
            found += [(record, other[0])] if other else []
        return found

    results = [
        _ratio_goal(
            f"kerasbn.convert train step <= {limit:g}x stock: {network}{where}",
            pairs("kerasbn.convert", "stock", "train_step", replicas, (network,)), limit, "of stock", missing=missing,
        )
        for network, limit, replicas, where in (
            ("resnet50", 0.78, 1, ", 1 device"), ("mobilenetv2", 0.55, 1, ", 1 device"),
            ("resnet50", 0.85, 2, ", 2 replicas"),
        )
    ]  # fmt: skip
    share_goal = "kerasbn.convert's BN share of the train step <= 1/4 of stock's, 1 device"
    results.append(_share_goal(share_goal, records, 0.25))
    results.append(
        _ratio_goal(
            "kerasbn.fold inference <= 1.05x no BN, every network",
            pairs("kerasbn.fold", "no_bn", "inference"), 1.05, "of no BN", missing=missing,
        )
    )  # fmt: skip
    results.append(_share_goal("Stretch: BN share of the train step < 15% of stock's, 1 device", records, 0.15))
    return results


def _distributed(records, mode: str) -> Dict[str, Dict[str, dict]]:
    """The distributed suite's `mode` records of the networks: {strategy: {variant: record}}."""
    found: Dict[str, Dict[str, dict]] = {}
    for record in measurements(records, "distributed"):
        if record["mode"] == mode and record["variant"] != "dynamic_batch":
            found.setdefault(record["strategy"], {})[record["variant"]] = record
    return found


def _sync_added(group: Dict[str, dict]) -> Optional[float]:
    """What synchronizing adds to kerasbn's step over what it adds to stock's (both minus kerasbn unsynchronized)."""
    if {"stock_sync", "kerasbn_sync", "kerasbn"} - set(group):
        return None
    unsync = group["kerasbn"]["median_s"]
    added = group["stock_sync"]["median_s"] - unsync
    return (group["kerasbn_sync"]["median_s"] - unsync) / added if added > 0 else float("inf")


def goal_distributed(records: List[dict]) -> List[GoalResult]:
    """Issue 14's goals: calls per synchronized layer, the synchronization's cost on 2 workers, inference."""
    missing = _why_not_evaluated(records, "distributed")
    train, infer = _distributed(records, "train_step"), _distributed(records, "inference")
    results = []
    goal = "kerasbn synchronized=True: <= 2 cross-replica calls per batch-norm layer per training step"
    calls = {name: g["kerasbn_sync"]["calls_per_batch_norm"] for name, g in train.items() if "kerasbn_sync" in g}
    status = "not evaluated" if not calls else "met" if max(calls.values()) <= 2 else "missed"
    results.append(GoalResult(goal, status, ", ".join(f"{k} {v:g}" for k, v in calls.items()) or missing))
    goal = "2 workers: what synchronizing adds to kerasbn's step <= 1/2 of what it adds to stock's"
    added = {name: _sync_added(group) for name, group in train.items()}
    worker = added.get("MultiWorkerMirroredStrategy")
    status = "not evaluated" if worker is None else "met" if worker <= 0.5 else "missed"
    detail = ", ".join(f"{name} {value:.2f} of stock's" for name, value in added.items() if value is not None)
    results.append(GoalResult(goal, status, detail or missing))
    goal = "kerasbn inference: 0 cross-replica calls per step and time <= stock's"
    pairs = [(g["kerasbn"], g["stock"]) for g in infer.values() if {"kerasbn", "stock"} <= set(g)]
    result = _ratio_goal(goal, pairs, 1.0, "of stock", missing=missing)
    if pairs:
        calls = ", ".join(f"{a['strategy']} {a['cross_replica_calls']}" for a, _ in pairs)
        result.detail += f"; calls per step {calls}"
        result.status = "missed" if any(a["cross_replica_calls"] for a, _ in pairs) else result.status
    results.append(result)
    dynamic = [r for r in measurements(records, "distributed") if r["variant"] == "dynamic_batch"]
    pairs = [(a, b) for a in dynamic for b in dynamic if not a["reference"] and b["reference"]]
    goal = "Unknown batch (no drop_remainder): kerasbn's rank-2 train step <= 1.05x the known batch's"
    results.append(_ratio_goal(goal, pairs, 1.05, "of the known batch's", missing=missing))
    return results


def distributed_table(records: List[dict]) -> List[str]:
    """Issue 14's table: per strategy and step, each variant's time against stock and its cross-replica calls."""
    rows = []
    for mode in ("train_step", "inference"):
        for strategy, group in _distributed(records, mode).items():
            added = _sync_added(group)
            for variant, r in group.items():
                rows.append([strategy, mode, variant, _ms(r["median_s"]), _ratio_cell(r), r["cross_replica_calls"],
                             f"{r['calls_per_batch_norm']:g}", f"{added:.2f}" if variant == "kerasbn_sync" and added
                             is not None else "-"])  # fmt: skip
    rows += [["-", r["mode"], r["implementation"], _ms(r["median_s"]), _ratio_cell(r), "-", "-", "-"]
             for r in measurements(records, "distributed") if r["variant"] == "dynamic_batch"]  # fmt: skip
    return _table(["strategy", "timed", "variant", "median ms", "vs stock", "calls/step", "calls/BN layer",
                   "sync adds, vs stock's"], rows)  # fmt: skip


# Extension point: a function from the records to goal rows, one per issue part.
GOALS: List[Callable[[List[dict]], List[GoalResult]]] = [
    goal_layer, goal_training, goal_export, goal_models, goal_distributed,
]  # fmt: skip


def evaluate_goals(records: List[dict]) -> List[GoalResult]:
    return [row for goal in GOALS for row in goal(records)]


def _why_not_evaluated(records, suite) -> str:
    """Why a goal of `suite` has no numbers: the suite skipped, failed or did not run."""
    for record in records:
        if record.get("record") == "suite" and record["name"] == suite:
            if record["status"] != "ok":
                return f"{record['name']} suite {record['status']}: {record['reason']}"
            return "no measurements for it in this run"
    return f"{suite} suite not run"


# --------------------------------------------------------------- markdown


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"


def _layer_rows(records: List[dict], cell: Callable[[dict], str], extra: Callable[[List[dict]], List[str]]):
    """One table row per layer case, in run order: a cell per implementation, then `extra(measured)`."""
    groups: Dict[Tuple, dict] = {}
    for record in records:
        if record.get("suite") != "layer" or record.get("record") not in ("measurement", "skipped"):
            continue
        group = groups.setdefault(_key(record), {"first": record, "measured": {}, "skipped": set()})
        if record["record"] == "measurement":
            group["measured"][record["implementation"]] = record
        else:
            group["skipped"].add(record["implementation"])
    for group in groups.values():
        first, measured = group["first"], group["measured"]
        cells = [
            cell(measured[name]) if name in measured else ("skip" if name in group["skipped"] else "-")
            for name in LAYER_COLUMNS
        ]
        shape = "x".join(map(str, first["shape"]))
        yield [
            shape,
            first["layout"],
            first["mode"],
            "yes" if first["jit"] else "no",
            *cells,
            *extra(list(measured.values())),
        ]


def _ratio_cell(record: dict) -> str:
    ratio = record.get("ratio_to_keras")
    return "-" if ratio is None else f"{ratio:.2f}x"


def layer_ratio_table(records: List[dict]) -> List[str]:
    def extra(group):
        keras = next((r for r in group if r["implementation"] == "keras"), None)
        return [_ms(keras["median_s"]) if keras else "-"]

    return _table(
        ["shape", "layout", "mode", "jit", *LAYER_COLUMNS, "keras ms"],
        _layer_rows(records, _ratio_cell, extra),
    )


def machine_line(header: dict) -> str:
    machine = header["machine"]
    return f"{machine['cpu_model']}, {machine['cores']} cores, devices {', '.join(machine['devices'])}"


def _correctness_line(records: List[dict]) -> str:
    """Whether every implementation computed what keras computed (outputs compared before timing)."""
    compared = [r for r in measurements(records, "layer") if r.get("max_rel_diff_to_keras") is not None]
    if not compared:
        return "Outputs were not compared with keras's (no keras reference measured)."
    disagree = [r for r in compared if r["max_rel_diff_to_keras"] > CORRECTNESS_TOLERANCE]
    if disagree:
        cases = ", ".join(
            f"{r['implementation']} on {_case(r)} {r['mode']} ({r['max_rel_diff_to_keras']:.1e})" for r in disagree
        )
        return f"**Results differ** from keras's by more than {CORRECTNESS_TOLERANCE:g} (relative) for: {cases}"
    worst = max(compared, key=lambda r: r["max_rel_diff_to_keras"])
    return (
        "Same results: every implementation's outputs match keras's to a relative "
        f"{worst['max_rel_diff_to_keras']:.1e} at most ({worst['implementation']}, {_case(worst)} {worst['mode']})."
    )


def training_table(records: List[dict]) -> List[str]:
    """Part 3's table: per replica count and norm, the epoch's time against keras BN's and the throughput."""
    training = measurements(records, "training")
    rows = [[r["replicas"], r["implementation"], _ratio_cell(r), f"{r['examples_per_s']:.0f}",
             f"{r['seconds_per_step'] * 1e3:.1f}", f"{r['epoch_s_estimate']:.1f}",
             f"{_ms(r['min_s'])}-{_ms(r['max_s'])}"] for r in training]  # fmt: skip
    return _table(["replicas", "norm", "time vs keras", "examples/s", "ms/step", "epoch s (est.)",
                   f"fit of {training[0]['steps'] if training else '-'} steps, ms min-max"], rows)  # fmt: skip


def export_table(records: List[dict]) -> List[str]:
    """Part 4's table: per batch size, each candidate's latency, throughput and ratios."""
    rows = []
    for r in measurements(records, "export"):
        _, unfolded = _export_pair(records, r["shape"][0])
        vs_unfolded = "-" if unfolded is None else f"{unfolded['median_s'] / r['median_s']:.2f}x"
        rows.append([r["shape"][0], r["implementation"], _ms(r["median_s"]), f"{_ms(r['min_s'])}-{_ms(r['max_s'])}",
                     f"{r['examples_per_s']:.0f}", vs_unfolded, _ratio_cell(r),
                     f"{r['max_abs_logit_diff_to_keras']:.1e}", ", ".join(map(str, r.get("load_average") or "-"))])
    return _table(["batch", "implementation", "median ms/call", "min-max ms", "examples/s", "throughput vs unfolded",
                   "time vs keras predict", "max abs logit diff", "load avg (1/5/15 min)"], rows)  # fmt: skip


def models_table(records: List[dict]) -> List[str]:
    """Issue 9's table: per network, timed step and replica count, kerasbn and no BN relative to stock."""
    rows = []
    for stock in _models(records, "stock", "train_step") + _models(records, "stock", "train_step", 2) + _models(
        records, "stock", "inference"
    ):
        kerasbn_variant = "kerasbn.convert" if stock["mode"] == "train_step" else "kerasbn.fold"
        same = (stock["mode"], stock["replicas"], (stock["network"],))
        kerasbn = (_models(records, kerasbn_variant, *same) or [None])[0]
        bound = (_models(records, "no_bn", *same) or [None])[0]
        cells = ["-"] * 4
        if kerasbn is not None:
            cells[0] = f"{kerasbn_variant} {_ratio_cell(kerasbn)}"
            cells[2] = "-" if kerasbn.get("bn_share") is None else f"{kerasbn['bn_share']:.2f}"
            cells[3] = "-" if kerasbn.get("ratio_to_bound") is None else f"{kerasbn['ratio_to_bound']:.2f}x"
        if bound is not None:
            cells[1] = _ratio_cell(bound)
        rows.append(
            [stock["network"], stock["mode"], stock["replicas"], _ms(stock["median_s"]), *cells,
             f"{_ms(stock['min_s'])}-{_ms(stock['max_s'])}"]
        )  # fmt: skip
    return _table(
        ["network", "timed", "replicas", "stock ms", "kerasbn vs stock", "no BN vs stock", "kerasbn BN share",
         "kerasbn vs no BN", "stock ms min-max"],
        rows,
    )  # fmt: skip


# (suite, heading, table): the sections of the report and of the summary that one suite's table makes.
SECTIONS = (
    ("training", "LeNet-BN training throughput", training_table),
    ("export", "Exported SavedModel inference: BN folded vs unfolded (time vs the Keras model's predict step)",
     export_table),
    ("models", "Real networks: stock keras BN vs kerasbn vs no BN", models_table),
    ("distributed", "Distributed: synchronized BN, cross-replica calls, unknown batch", distributed_table),
)  # fmt: skip


def _sections(records: List[dict], heading: str) -> List[str]:
    lines = []
    for suite, title, table in SECTIONS:
        lines += ["", heading + title, "", *table(records)] if measurements(records, suite) else []
    return lines


def render(records: List[dict]) -> str:
    """The Markdown report of a run."""
    header = next(r for r in records if r.get("record") == "header")
    versions = header["versions"]
    lines = [
        f"# kerasbn benchmark: {header['date']} on {header['host']}",
        "",
        f"- Machine: {machine_line(header)}; load average at start {header['machine'].get('load_average_at_start')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- Command: `{header['command']}`"
        + (" (quick smoke run: a subset of shapes, few repeats)" if header["quick"] else ""),
        f"- Git commit: {header.get('git_commit') or 'unknown'}; started {header['started_utc']} UTC",
        "",
        "Absolute times on a shared machine are noisy; the implementations were timed interleaved in one "
        "process, so the **ratios** (time / keras.layers.BatchNormalization's time, same shape, layout, mode "
        "and jit; lower is faster) are the figures to read.",
        "",
        "## Goals",
        "",
    ]
    if header["quick"]:
        lines += ["Quick smoke run: a subset of shapes and few repetitions; do not quote these figures.", ""]
    lines += _table(["goal", "status", "numbers"], ([g.goal, g.status, g.detail] for g in evaluate_goals(records)))

    if measurements(records, "layer") or any(
        r.get("suite") == "layer" for r in records if r.get("record") == "skipped"
    ):
        lines += ["", "## Layer: time relative to keras.layers.BatchNormalization", ""]
        lines += layer_ratio_table(records)
        lines += ["", _correctness_line(records)]
        lines += ["", "## Layer: time over the memory-bandwidth floor (achieved GB/s)", ""]

        def floor_cell(record):
            if record.get("time_over_floor") is None:
                return "-"
            return f"{record['time_over_floor']:.1f}x ({record['achieved_gbps']:.1f})"

        def floor_extra(group):
            return [_ms(group[0].get("floor_s")) if group else "-"]

        lines += _table(
            ["shape", "layout", "mode", "jit", *LAYER_COLUMNS, "floor ms"],
            _layer_rows(records, floor_cell, floor_extra),
        )
        lines += ["", "## Layer: median time in ms (min-max)", ""]

        def time_cell(record):
            return f"{_ms(record['median_s'])} ({_ms(record['min_s'])}-{_ms(record['max_s'])})"

        lines += _table(
            ["shape", "layout", "mode", "jit", *LAYER_COLUMNS], _layer_rows(records, time_cell, lambda g: [])
        )

    lines += _sections(records, "## ")

    lines += ["", "## Suites", ""]
    suite_rows = []
    for record in records:
        if record.get("record") == "suite":
            status = record["status"] + ("" if record["counts_as_done"] else " (STUB, not done)")
            suite_rows.append(
                [record["name"], status, f"{record['elapsed_s']:.0f}", record["reason"] or "", record["description"]]
            )
    lines += _table(["suite", "status", "seconds", "reason", "what"], suite_rows)
    for record in records:
        if record.get("record") == "suite" and record["notes"]:
            lines += ["", f"**{record['name']}**:", ""] + [f"- {note}" for note in record["notes"]]

    skips: Dict[str, List[str]] = {}
    for record in records:
        if record.get("record") == "skipped":
            skips.setdefault(f"{record['suite']} / {record['implementation']}: {record['reason']}", []).append(
                _case(record) + f" {record['mode']}"
            )
    if skips:
        lines += ["", "## Skipped measurements", ""]
        for reason, where in skips.items():
            lines.append(f"- {reason} ({len(where)} cases, e.g. {where[0]})")
    lines += ["", "## Implementations", ""]
    from bench.implementations import IMPLEMENTATIONS

    lines += [f"- `{name}`: {text}" for name, text in IMPLEMENTATIONS.items()]
    for suite, module, legend, label in (
        ("models", "bench.models_worker", "VARIANTS", "models suite `<network>/<train|infer>/<n>dev/{}`"),
        ("distributed", "bench.distributed_worker", "VARIANTS", "distributed suite `<strategy>/<step>/{}`"),
        ("export", "bench.export_suite", "IMPLEMENTATIONS", "export suite `{}`"),
    ):
        if measurements(records, suite):
            names = getattr(importlib.import_module(module), legend)
            lines += [f"- {label.format(name)}: {text}" for name, text in names.items()]
    return "\n".join(lines) + "\n"


def summary(records: List[dict]) -> str:
    """What `python -m bench` prints at the end: machine, ratio table, goals."""
    header = next(r for r in records if r.get("record") == "header")
    lines = [f"Machine: {machine_line(header)}"]
    if measurements(records, "layer"):
        lines += ["", "Layer time relative to keras.layers.BatchNormalization (lower is faster):", ""]
        lines += layer_ratio_table(records)
    lines += _sections(records, "")
    lines += ["", "Goals:"]
    lines += [f"  [{g.status}] {g.goal}: {g.detail}" for g in evaluate_goals(records)]
    return "\n".join(lines)


def write(records: List[dict], out: pathlib.Path) -> Tuple[pathlib.Path, pathlib.Path]:
    """Writes `<date>-<host>.md` and `.json` into `out` and copies them to `latest.*`."""
    header = next(r for r in records if r.get("record") == "header")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{header['date']}-{header['host']}"
    markdown_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    markdown_path.write_text(render(records), encoding="utf-8")
    json_path.write_text(json.dumps(records, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    shutil.copyfile(markdown_path, out / "latest.md")
    shutil.copyfile(json_path, out / "latest.json")
    return markdown_path, json_path
