"""Ratios, goals and the Markdown report, computed from the records alone.

Everything here reads the list of records that is also written as JSON, so
a report can be rebuilt from a saved `.json` file (`render(records)`). Goals
are evaluated by two functions, `_ratio_goal` (time over a reference's, for
every pair) and `_values_goal` (a figure per case under a limit); tables are
built by `records_table` (a row per record) and `layer_table` (a row per
case, a column per implementation).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pathlib
import shutil
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from bench.suites import GROUP_FIELDS, REFERENCE_IMPLEMENTATION

LAYER_COLUMNS = ("kerasbn", "kerasbn_fused", "kerasbn_generic", "keras", "scratch", "tf_fused_kernel")
LAYER_CASE = ("shape", "layout", "mode", "jit")
CORRECTNESS_TOLERANCE = 1e-4  # relative; float32 sums over a batch stay far below it


def _key(record: dict) -> Tuple:
    return tuple(json.dumps(record.get(field)) for field in GROUP_FIELDS)


def measurements(records: Iterable[dict], suite: Optional[str] = None, **fields) -> List[dict]:
    """The measurement records of `suite` (every suite when None) whose `fields` have the values given."""
    return [r for r in records if r.get("record") == "measurement" and suite in (None, r["suite"])
            and all(r.get(k) == v for k, v in fields.items())]  # fmt: skip


def _pairs(records, suite, name, reference, match, field="implementation", **fields) -> List[Tuple[dict, dict]]:
    """`(record, its reference)`: each record of `suite` whose `field` is `name` (and whose `fields` have the
    values given), with the record whose `field` is `reference` and that agrees with it on `match`."""
    pairs = []
    for record in measurements(records, suite, **{field: name}, **fields):
        other = measurements(records, suite, **{field: reference}, **{k: record.get(k) for k in match})
        pairs += [(record, other[0])] if other else []
    return pairs


def add_ratios(records: List[dict]) -> None:
    """Sets `ratio_to_keras` = median / the reference's median in the same group (None without one), and
    `min_ratio_to_keras` = min / its min: the fastest repetitions are the least disturbed ones."""
    reference = {_key(r): r for r in measurements(records)
                 if r.get("reference", r["implementation"] == REFERENCE_IMPLEMENTATION)}  # fmt: skip
    for record in measurements(records):
        base = reference.get(_key(record))
        record["ratio_to_keras"] = record["median_s"] / base["median_s"] if base else None
        record["min_ratio_to_keras"] = record["min_s"] / base["min_s"] if base else None


def _case(record: dict) -> str:
    text = f"({'x'.join(map(str, record['shape']))}) {record['layout']}"
    if record.get("network"):
        text = f"{record['network']} {record['mode']} {text}"
    if record.get("replicas", 1) != 1:
        text += f" {record['replicas']} replicas"
    return text + (" jit" if record.get("jit") else "")


# ------------------------------------------------------------------ goals


@dataclasses.dataclass
class GoalResult:
    """One row of the goals table: what the issue asks for, "met", "missed" or "not evaluated", and the numbers."""

    goal: str
    status: str
    detail: str


def _ratio_goal(goal: str, pairs: List[Tuple[dict, dict]], limit: float, what: str, missing: str,
                context: Optional[Callable[[dict], str]] = None) -> GoalResult:  # fmt: skip
    """`met` when time(a) / time(b) <= limit for every pair `(a, b)`; the detail names the worst.

    `missing` says why there is nothing to evaluate; `context(worst_record)`
    may add a note on the worst case (e.g. how fast the raw kernel was there,
    which bounds what any layer can reach).
    """
    if not pairs:
        return GoalResult(goal, "not evaluated", missing)
    ratios = sorted(((a["median_s"] / b["median_s"], a) for a, b in pairs), key=lambda t: -t[0])
    failing = [(ratio, r) for ratio, r in ratios if ratio > limit]

    def fmt(ratio: float) -> str:
        # Enough digits that a ratio just over the limit does not print as the limit.
        text = f"{ratio:.2f}"
        return f"{ratio:.3f}" if float(text) == round(limit, 2) and ratio != limit else text

    detail = f"worst {fmt(ratios[0][0])}x {what} on {_case(ratios[0][1])}"
    note = context(ratios[0][1]) if context else ""
    detail += f" ({note})" if note else ""
    if failing:
        detail += f"; {len(failing)} of {len(ratios)} cases above {limit:g}x"
        if len(failing) > 1:
            others = ", ".join(f"{_case(r)} {fmt(ratio)}x" for ratio, r in failing[1:4])
            detail += f" ({others}{', ...' if len(failing) > 4 else ''})"
    else:
        detail += f"; all {len(ratios)} cases at or below {limit:g}x"
    return GoalResult(goal, "missed" if failing else "met", detail)


def _values_goal(goal: str, values: Dict[str, Optional[float]], limit: float, cell: Callable[[str, float], str],
                 missing: str, judged: Optional[Sequence[str]] = None) -> GoalResult:  # fmt: skip
    """`met` when every value named in `judged` (all by default; None: not measured) is at most `limit`."""
    values = {name: value for name, value in values.items() if value is not None}
    scored = [value for name, value in values.items() if judged is None or name in judged]
    if not scored:
        return GoalResult(goal, "not evaluated", missing)
    detail = ", ".join(cell(name, value) for name, value in values.items())
    return GoalResult(goal, "met" if max(scored) <= limit else "missed", detail)


def goal_layer(records: List[dict]) -> List[GoalResult]:
    """The issue's train-step goals against keras and inference goal against the raw kernel."""
    missing = _why_not_evaluated(records, "layer")

    def kernel_there(record: dict) -> str:
        kernel = measurements(records, "layer", implementation="tf_fused_kernel", **{k: record[k] for k in LAYER_CASE})
        ratio = kernel[0].get("ratio_to_keras") if kernel else None
        return "" if ratio is None else f"the raw fused kernel there: {ratio:.2f}x of keras"

    def pairs(reference, mode, jit, families=("resnet", "lenet", "dense")):
        found = _pairs(records, "layer", "kerasbn", reference, LAYER_CASE, mode=mode, jit=jit)
        return [(a, b) for a, b in found if a.get("family") in families]

    results = []
    for jit in (False, True):
        suffix = " (jit_compile=True)" if jit else ""
        for families, limit, label in (
            (("resnet",), 0.5, "ResNet-sized 4-D shapes"),
            (("lenet", "dense"), 0.9, "LeNet shapes and 2-D"),
            (("resnet", "lenet", "dense"), 1.0, "every shape (never slower)"),
        ):
            results.append(_ratio_goal(f"kerasbn train step <= {limit:g}x keras on {label}{suffix}",
                                       pairs("keras", "train_step", jit, families), limit, "of keras", missing,
                                       kernel_there))  # fmt: skip
        results.append(_ratio_goal(f"kerasbn inference <= 1.05x tf.compat.v1.nn.fused_batch_norm{suffix}",
                                   pairs("tf_fused_kernel", "inference", jit), 1.05, "of the raw kernel", missing))
    return results


EXPORT_GOAL_THROUGHPUT, EXPORT_GOAL_BATCH = 1.3, 256  # folded over unfolded, at batch 256


def _export_pair(records: List[dict], batch: int) -> Tuple[Optional[dict], Optional[dict]]:
    """The (folded, unfolded) SavedModel measurements at `batch`; None where missing."""
    found = {r["implementation"]: r for r in measurements(records, "export") if r["shape"][0] == batch}
    return found.get("savedmodel_folded"), found.get("savedmodel_unfolded")


def goal_export(records: List[dict]) -> List[GoalResult]:
    """Folded SavedModel throughput over unfolded's at batch 256 (median times), batch 1 latency as context."""
    goal = f"Folded SavedModel >= {EXPORT_GOAL_THROUGHPUT:g}x the throughput of unfolded at batch {EXPORT_GOAL_BATCH}"
    folded, unfolded = _export_pair(records, EXPORT_GOAL_BATCH)
    if folded is None or unfolded is None:
        return [GoalResult(goal, "not evaluated", _why_not_evaluated(records, "export"))]
    speedup = unfolded["median_s"] / folded["median_s"]  # throughput ratio: the time ratio inverted
    detail = (f"folded {speedup:.2f}x the throughput of unfolded at batch {EXPORT_GOAL_BATCH} "
              f"({folded['examples_per_s']:.0f} vs {unfolded['examples_per_s']:.0f} examples/s, "
              f"{_ms(folded['median_s'])} vs {_ms(unfolded['median_s'])} ms; "
              f"fastest repetitions {unfolded['min_s'] / folded['min_s']:.2f}x)")  # fmt: skip
    folded_1, unfolded_1 = _export_pair(records, 1)
    if folded_1 is not None and unfolded_1 is not None:
        detail += (f"; batch 1 latency {_ms(folded_1['median_s'])} vs {_ms(unfolded_1['median_s'])} ms "
                   f"({unfolded_1['median_s'] / folded_1['median_s']:.2f}x)")  # fmt: skip
    return [GoalResult(goal, "met" if speedup >= EXPORT_GOAL_THROUGHPUT else "missed", detail)]


def goal_training(records: List[dict]) -> List[GoalResult]:
    missing = _why_not_evaluated(records, "training")
    return [_ratio_goal(f"LeNet-BN with kerasbn {label}", _pairs(records, "training", "kerasbn", reference,
                        ("replicas", "shape")), limit, f"of {reference}'s epoch time", missing)
            for reference, limit, label in (("keras", 1.0, "at least as fast per epoch as keras BN"),
                                            ("none", 1.15, "within 1.15x of no BN"))]  # fmt: skip


def _share_goal(goal: str, records: List[dict], limit: float) -> GoalResult:
    """`met` when kerasbn.convert's BN share of the 1-device train step is <= limit for every network."""
    shares = {r["network"]: r["bn_share"]
              for r in measurements(records, "models", variant="kerasbn.convert", mode="train_step", replicas=1)}
    result = _values_goal(goal, shares, limit, lambda network, share: f"{network} {share:.2f}",
                          _why_not_evaluated(records, "models"))  # fmt: skip
    if result.status != "not evaluated":
        result.detail = f"BN share {result.detail} (limit {limit:g})"
    return result


def goal_models(records: List[dict]) -> List[GoalResult]:
    """Issue 9's goals: kerasbn.convert's train step against stock, kerasbn.fold's inference against no BN."""
    missing = _why_not_evaluated(records, "models")

    def pairs(variant, reference, mode, **fields):
        return _pairs(records, "models", variant, reference, ("network", "mode", "replicas"), "variant", mode=mode,
                      **fields)  # fmt: skip

    results = [
        _ratio_goal(f"kerasbn.convert train step <= {limit:g}x stock: {network}{where}",
                    pairs("kerasbn.convert", "stock", "train_step", replicas=replicas, network=network), limit,
                    "of stock", missing)
        for network, limit, replicas, where in (
            ("resnet50", 0.78, 1, ", 1 device"), ("mobilenetv2", 0.55, 1, ", 1 device"),
            ("resnet50", 0.85, 2, ", 2 replicas"),
        )
    ]  # fmt: skip
    results.append(_share_goal("kerasbn.convert's BN share of the train step <= 1/4 of stock's, 1 device", records,
                               0.25))  # fmt: skip
    results.append(_ratio_goal("kerasbn.fold inference <= 1.05x no BN, every network",
                               pairs("kerasbn.fold", "no_bn", "inference", replicas=1), 1.05, "of no BN", missing))
    results.append(_share_goal("Stretch: BN share of the train step < 15% of stock's, 1 device", records, 0.15))
    return results


def _label(record: dict) -> str:
    """A strategy's name in the distributed goals and table, with its replicas where they are not 2."""
    return record["strategy"] + ("" if record["replicas"] == 2 else f" x{record['replicas']}")


def _distributed(records, mode: str) -> Dict[str, Dict[str, dict]]:
    """The distributed suite's `mode` records of the networks: {strategy label: {variant: record}}."""
    found: Dict[str, Dict[str, dict]] = {}
    for record in measurements(records, "distributed", mode=mode):
        if record["variant"] != "dynamic_batch":
            found.setdefault(_label(record), {})[record["variant"]] = record
    return found


def _sync_added(group: Dict[str, dict]) -> Optional[float]:
    """What synchronizing adds to kerasbn's step over what it adds to stock's (both minus kerasbn unsynchronized)."""
    if {"stock_sync", "kerasbn_sync", "kerasbn"} - set(group):
        return None
    unsync = group["kerasbn"]["median_s"]
    added = group["stock_sync"]["median_s"] - unsync
    return (group["kerasbn_sync"]["median_s"] - unsync) / added if added > 0 else float("inf")


def goal_distributed(records: List[dict]) -> List[GoalResult]:
    """Issues 14, 19, 20: collectives per synchronized layer, what synchronizing costs, inference, JAX's local path."""
    missing = _why_not_evaluated(records, "distributed")
    train, infer = _distributed(records, "train_step"), _distributed(records, "inference")

    def pairs(variant, reference, groups=train, where=""):  # of the strategies whose name holds `where`
        return [(g[variant], g[reference]) for name, g in groups.items()
                if where in name and {variant, reference} <= set(g)]  # fmt: skip

    def synchronized(field):  # of each synchronized variant, kerasbn_sync named by its strategy alone
        return {f"{name} {variant[13:]}".strip(): g[variant].get(field) for name, g in train.items()
                for variant in ("kerasbn_sync", "kerasbn_sync_generic", "kerasbn_sync_group") if variant in g}

    jax_local = {name: g["kerasbn"]["collectives"] - g["kerasbn"]["collectives_without_batch_norm"]
                 for name, g in train.items() if name.startswith("JAX") and "kerasbn" in g}  # fmt: skip
    jax_stock = ", ".join(f"{b['collectives_per_batch_norm']:g}" for _, b in pairs("kerasbn", "stock", where="JAX"))
    inference = _ratio_goal("kerasbn inference: 0 cross-replica calls per step and time <= stock's",
                            pairs("kerasbn", "stock", infer), 1.0, "of stock", missing)  # fmt: skip
    if inference.status != "not evaluated":
        calls = [(_label(a), a["cross_replica_calls"]) for a, _ in pairs("kerasbn", "stock", infer)]
        inference.detail += "; calls per step " + ", ".join(f"{name} {count}" for name, count in calls)
        inference.status = "missed" if any(count for _, count in calls) else inference.status
    return [
        _values_goal("kerasbn synchronized=True: <= 2 cross-replica calls per batch-norm layer per training step",
                     synchronized("calls_per_batch_norm"), 2, lambda name, value: f"{name} {value:g}", missing),
        _values_goal("kerasbn synchronized=True: <= 2 collectives per batch-norm layer per training step (TensorFlow "
                     "graph ops, JAX compiled HLO)", synchronized("collectives_per_batch_norm"), 2,
                     lambda name, value: f"{name} {value:g}", missing),
        _values_goal("2 workers: what synchronizing adds to kerasbn's step <= 1/2 of what it adds to stock's",
                     {name: _sync_added(group) for name, group in train.items()}, 0.5,
                     lambda name, value: f"{name} {value:.2f} of stock's", missing, ("MultiWorkerMirroredStrategy",)),
        _ratio_goal("kerasbn synchronized <= 0.8x stock synchronized, every TensorFlow strategy",
                    pairs("kerasbn_sync", "stock_sync"), 0.8, "of stock_sync", missing),
        _values_goal("JAX synchronized=False: 0 collectives per batch-norm layer, <= 1 per step for all moving "
                     "statistics (beyond the step without batch norm)", jax_local, 1,
                     lambda name, value: f"{name} {value:g} per step (stock per layer: {jax_stock})", missing),
        _ratio_goal("JAX, 2 processes: kerasbn's local step <= stock's", pairs("kerasbn", "stock", where="processes"),
                    1.0, "of stock", missing),
        inference,
        _ratio_goal("Unknown batch (no drop_remainder): kerasbn's rank-2 train step <= 1.05x the known batch's",
                    _pairs(records, "distributed", False, True, ("variant",), "reference", variant="dynamic_batch"),
                    1.05, "of the known batch's", missing),
    ]  # fmt: skip


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


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


Cell = Union[str, Callable[[dict], object]]


def records_table(records: Iterable[dict], columns: Sequence[Tuple[str, Cell]]) -> List[str]:
    """A table with a row per record; each column is `(header, field name or function of the record)`."""
    rows = [[cell(r) if callable(cell) else r[cell] for _, cell in columns] for r in records]
    return _table([header for header, _ in columns], rows)


def _field(name: str, spec: str = "", suffix: str = "") -> Callable[[Optional[dict]], str]:
    """A cell: the record's `name` formatted by `spec`, then `suffix`; "-" without a record or a value."""
    return lambda r: "-" if r is None or r.get(name) is None else format(r[name], spec) + suffix


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1e3:.3g}" if seconds * 1e3 < 100 else f"{seconds * 1e3:.0f}"


_ratio_cell = _field("ratio_to_keras", ".2f", "x")


def _spread(record: dict) -> str:
    return f"{_ms(record['min_s'])}-{_ms(record['max_s'])}"


def _median(record: dict) -> str:
    return _ms(record["median_s"])


def layer_table(records: List[dict], cell: Callable[[dict], str], extra: Optional[Tuple[str, Callable]] = None):
    """The layer suite's table: a row per case in run order, `cell(record)` per implementation ("skip" where
    it was skipped), and `extra = (header, function of {implementation: record})` as a last column."""
    groups: Dict[Tuple, dict] = {}
    for record in records:
        if record.get("suite") == "layer" and record.get("record") in ("measurement", "skipped"):
            groups.setdefault(_key(record), {})[record["implementation"]] = record
    rows = []
    for group in groups.values():
        first = next(iter(group.values()))
        measured = {name: r for name, r in group.items() if r["record"] == "measurement"}
        cells = [cell(measured[name]) if name in measured else "skip" if name in group else "-"
                 for name in LAYER_COLUMNS]  # fmt: skip
        rows.append(["x".join(map(str, first["shape"])), first["layout"], first["mode"],
                     "yes" if first["jit"] else "no", *cells, *([extra[1](measured)] if extra else [])])  # fmt: skip
    return _table([*LAYER_CASE, *LAYER_COLUMNS, *([extra[0]] if extra else [])], rows)


def _correctness_line(records: List[dict]) -> str:
    """Whether every implementation computed what keras computed (outputs compared before timing)."""
    compared = [r for r in measurements(records, "layer") if r.get("max_rel_diff_to_keras") is not None]
    if not compared:
        return "Outputs were not compared with keras's (no keras reference measured)."
    if disagree := [r for r in compared if r["max_rel_diff_to_keras"] > CORRECTNESS_TOLERANCE]:
        cases = ", ".join(f"{r['implementation']} on {_case(r)} {r['mode']} ({r['max_rel_diff_to_keras']:.1e})"
                          for r in disagree)  # fmt: skip
        return f"**Results differ** from keras's by more than {CORRECTNESS_TOLERANCE:g} (relative) for: {cases}"
    worst = max(compared, key=lambda r: r["max_rel_diff_to_keras"])
    where = f"{worst['max_rel_diff_to_keras']:.1e} at most ({worst['implementation']}, {_case(worst)} {worst['mode']})"
    return f"Same results: every implementation's outputs match keras's to a relative {where}."


def training_table(records: List[dict]) -> List[str]:
    """Part 3's table: per replica count and norm, the epoch's time against keras BN's and the throughput."""
    training = measurements(records, "training")
    return records_table(training, [
        ("replicas", "replicas"), ("norm", "implementation"), ("time vs keras", _ratio_cell),
        ("examples/s", _field("examples_per_s", ".0f")), ("ms/step", lambda r: f"{r['seconds_per_step'] * 1e3:.1f}"),
        ("epoch s (est.)", _field("epoch_s_estimate", ".1f")),
        (f"fit of {training[0]['steps'] if training else '-'} steps, ms min-max", _spread),
    ])  # fmt: skip


def export_table(records: List[dict]) -> List[str]:
    """Part 4's table: per batch size, each candidate's latency, throughput and ratios."""

    def vs_unfolded(r):
        unfolded = _export_pair(records, r["shape"][0])[1]
        return "-" if unfolded is None else f"{unfolded['median_s'] / r['median_s']:.2f}x"

    return records_table(measurements(records, "export"), [
        ("batch", lambda r: r["shape"][0]), ("implementation", "implementation"), ("median ms/call", _median),
        ("min-max ms", _spread), ("examples/s", _field("examples_per_s", ".0f")),
        ("throughput vs unfolded", vs_unfolded), ("time vs keras predict", _ratio_cell),
        ("max abs logit diff", _field("max_abs_logit_diff_to_keras", ".1e")),
        ("load avg (1/5/15 min)", lambda r: ", ".join(map(str, r.get("load_average") or "-"))),
    ])  # fmt: skip


def models_table(records: List[dict]) -> List[str]:
    """Issue 9's table: per network, timed step and replica count, kerasbn and no BN relative to stock."""
    stocks = measurements(records, "models", variant="stock")

    def other(stock, variant=None):  # kerasbn's variant by default: convert for training, fold for inference
        variant = variant or ("kerasbn.convert" if stock["mode"] == "train_step" else "kerasbn.fold")
        same = {k: stock[k] for k in ("network", "mode", "replicas")}
        return next(iter(measurements(records, "models", variant=variant, **same)), None)

    return records_table(sorted(stocks, key=lambda r: (r["mode"] != "train_step", r["replicas"])), [
        ("network", "network"), ("timed", "mode"), ("replicas", "replicas"), ("stock ms", _median),
        ("kerasbn vs stock", lambda s: "-" if other(s) is None else f"{other(s)['variant']} {_ratio_cell(other(s))}"),
        ("no BN vs stock", lambda s: _ratio_cell(other(s, "no_bn"))),
        ("kerasbn BN share", lambda s: _field("bn_share", ".2f")(other(s))),
        ("kerasbn vs no BN", lambda s: _field("ratio_to_bound", ".2f", "x")(other(s))), ("stock ms min-max", _spread),
    ])  # fmt: skip


def distributed_table(records: List[dict]) -> List[str]:
    """Issue 14's table: per strategy and step, each variant's time against stock and its cross-replica calls."""
    groups = [group for mode in ("train_step", "inference") for group in _distributed(records, mode).values()]
    rows = [r for group in groups for r in group.values()]
    rows += measurements(records, "distributed", variant="dynamic_batch")

    def sync_added(r):
        added = _sync_added(_distributed(records, r["mode"])[_label(r)]) if r["variant"] == "kerasbn_sync" else None
        return "-" if added is None else f"{added:.2f}"

    def network(cell):  # "-" in the unknown-batch rows, which time the layer alone
        return lambda r: "-" if r["variant"] == "dynamic_batch" else cell(r)

    return records_table(rows, [
        ("strategy", network(_label)), ("timed", "mode"),
        ("variant", lambda r: r["implementation"] if r["variant"] == "dynamic_batch" else r["variant"]),
        ("median ms", _median), ("vs stock", _ratio_cell), ("calls/step", network(_field("cross_replica_calls"))),
        ("calls/BN layer", network(_field("calls_per_batch_norm", "g"))),
        ("sync adds, vs stock's", network(sync_added)), ("collectives/step", network(_field("collectives"))),
        ("collectives/BN layer", network(_field("collectives_per_batch_norm", ".3g"))),
    ])  # fmt: skip


# (heading, cell per implementation, last column): the layer suite's tables.
LAYER_TABLES = (
    ("time relative to keras.layers.BatchNormalization", _ratio_cell,
     ("keras ms", lambda group: _ms(group.get("keras", {}).get("median_s")))),
    ("time over the memory-bandwidth floor (achieved GB/s)",
     lambda r: "-" if r.get("time_over_floor") is None else f"{r['time_over_floor']:.1f}x ({r['achieved_gbps']:.1f})",
     ("floor ms", lambda group: _ms(next(iter(group.values())).get("floor_s")) if group else "-")),
    ("median time in ms (min-max)", lambda r: f"{_median(r)} ({_spread(r)})", None),
)  # fmt: skip
# (suite, heading, table): the sections of the report that one suite's table makes.
SECTIONS = (
    ("training", "LeNet-BN training throughput", training_table),
    ("export", "Exported SavedModel inference: BN folded vs unfolded (time vs the Keras model's predict step)",
     export_table),
    ("models", "Real networks: stock keras BN vs kerasbn vs no BN", models_table),
    ("distributed", "Distributed: synchronized BN, cross-replica calls, unknown batch", distributed_table),
)  # fmt: skip
# (suite, module, its legend, how the suite names its records): the report's closing list of what was timed.
LEGENDS = (
    ("layer", "bench.implementations", "IMPLEMENTATIONS", "`{}`"),
    ("models", "bench.models_suite", "VARIANTS", "models suite `<network>/<train|infer>/<n>dev/{}`"),
    ("distributed", "bench.distributed_suite", "VARIANTS", "distributed suite `<strategy>/<step>/{}`"),
    ("export", "bench.export_suite", "IMPLEMENTATIONS", "export suite `{}`"),
)


def render(records: List[dict]) -> str:
    """The Markdown report of a run."""
    header = next(r for r in records if r.get("record") == "header")
    machine = header["machine"]
    lines = [
        f"# kerasbn benchmark: {header['date']} on {header['host']}",
        "",
        f"- Machine: {machine['cpu_model']}, {machine['cores']} cores, devices {', '.join(machine['devices'])}; "
        f"load average at start {machine.get('load_average_at_start')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()),
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
    if any(r.get("suite") == "layer" for r in records if r.get("record") in ("measurement", "skipped")):
        for index, (title, cell, extra) in enumerate(LAYER_TABLES):
            lines += ["", f"## Layer: {title}", "", *layer_table(records, cell, extra)]
            lines += ["", _correctness_line(records)] if index == 0 else []
    for suite, title, table in SECTIONS:
        lines += ["", f"## {title}", "", *table(records)] if measurements(records, suite) else []

    suites = [r for r in records if r.get("record") == "suite"]
    lines += ["", "## Suites", ""]
    lines += records_table(suites, [
        ("suite", "name"), ("status", lambda r: r["status"] + ("" if r["counts_as_done"] else " (STUB, not done)")),
        ("seconds", lambda r: f"{r['elapsed_s']:.0f}"), ("reason", "reason"), ("what", "description"),
    ])  # fmt: skip
    for record in (r for r in suites if r["notes"]):
        lines += ["", f"**{record['name']}**:", ""] + [f"- {note}" for note in record["notes"]]
    skips: Dict[str, List[str]] = {}
    for record in records:
        if record.get("record") == "skipped":
            reason = f"{record['suite']} / {record['implementation']}: {record['reason']}"
            skips.setdefault(reason, []).append(f"{_case(record)} {record['mode']}")
    if skips:
        lines += ["", "## Skipped measurements", ""]
        lines += [f"- {reason} ({len(where)} cases, e.g. {where[0]})" for reason, where in skips.items()]
    lines += ["", "## Implementations", ""]
    for suite, module, legend, label in LEGENDS:
        if suite == "layer" or measurements(records, suite):
            for name, text in getattr(importlib.import_module(module), legend).items():
                lines.append(f"- {label.format(name)}: {text if isinstance(text, str) else text[0]}")
    return "\n".join(lines) + "\n"


def write(records: List[dict], out: pathlib.Path) -> Tuple[pathlib.Path, pathlib.Path]:
    """Writes `<date>-<host>.md` and `.json` into `out` and copies them to `latest.*`.

    The repository tracks `latest.md` (the tables) only; the JSON records change with every run.
    """
    header = next(r for r in records if r.get("record") == "header")
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{header['date']}-{header['host']}"
    markdown_path, json_path = out / f"{stem}.md", out / f"{stem}.json"
    markdown_path.write_text(render(records), encoding="utf-8")
    json_path.write_text(json.dumps(records, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    shutil.copyfile(markdown_path, out / "latest.md")
    shutil.copyfile(json_path, out / "latest.json")
    return markdown_path, json_path
