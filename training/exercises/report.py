"""results.md from the records: per exercise a table of its variants (mean and min-max over seeds)."""

from __future__ import annotations

import os
import statistics
from typing import Dict, List, Optional, Sequence

from training import artifacts
from training.exercises.catalog import EXERCISES
from training.exercises.plots import plot_exercise, plot_summary


def group(records: List[Dict]) -> Dict[str, Dict[str, List[Dict]]]:
    """exercise -> variant -> records, in the order of EXERCISES."""
    grouped: Dict[str, Dict[str, List[Dict]]] = {}
    for exercise in EXERCISES.values():
        for variant in exercise.variants:
            rows = [r for r in records if r["exercise"] == exercise.key and r["variant"] == variant.name]
            if rows:
                grouped.setdefault(exercise.key, {})[variant.name] = sorted(rows, key=lambda r: r["seed"])
    return grouped


def spread(values: Sequence[Optional[float]], fmt: str = "{:.4f}") -> str:
    """'mean (min-max)' over seeds, or the single value; '-' when there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def exercise_table(rows_by_variant: Dict[str, List[Dict]]) -> List[str]:
    lines = [
        "| variant | test acc | test acc, moving averages | train acc (inference) | train - test | params | ms/step | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in rows_by_variant.items():
        lines.append(
            f"| {name} | {spread([r['test_acc'] for r in rows])} | {spread([r['test_acc_moving'] for r in rows])} "
            f"| {spread([r['train_acc_eval'] for r in rows])} "
            f"| {spread([r['train_acc_eval'] - r['test_acc'] for r in rows], '{:+.4f}')} "
            f"| {rows[0]['params']:,} | {statistics.median(r['step_ms'] for r in rows):.1f} | {len(rows)} |"
        )
    return lines


def bias_table(rows: List[Dict]) -> List[str]:
    lines = [
        "| layer | before a norm | bias grad RMS, start | kernel grad RMS, start | bias grad RMS, end "
        "| kernel grad RMS, end | largest change of the bias |",
        "|---|---|---|---|---|---|---|",
    ]
    layers = [row["layer"] for row in rows[0]["bias_gradients"]["layers"]]
    for index, layer in enumerate(layers):
        cells = [r["bias_gradients"]["layers"][index] for r in rows]

        def worst(key):
            return f"{max(c[key] for c in cells):.2e}"

        lines.append(
            f"| {layer} | {'yes' if cells[0]['before_norm'] else 'no'} | {worst('bias_grad_rms_start')} "
            f"| {worst('kernel_grad_rms_start')} | {worst('bias_grad_rms_end')} | {worst('kernel_grad_rms_end')} "
            f"| {worst('bias_max_abs_change')} |"
        )
    return lines


def write_report(out: str, records: List[Dict]) -> None:
    """results.md, one accuracy plot per exercise and summary.png, from the records."""
    grouped = group(records)
    lines = [
        "# The chapter's exercises, measured",
        "",
        "Test accuracy after training (BN statistics recomputed over training batches unless the variant says",
        "moving averages); train accuracy in inference mode on the first 10,000 training examples; mean",
        "(min-max) over seeds. ms/step: median of the epochs' time per training step (noisy on a shared machine).",
    ]
    step_file = artifacts.read_json(os.path.join(out, "step_times.json"))
    for key, rows_by_variant in grouped.items():
        exercise = EXERCISES[key]
        lines += ["", f"## {key}", "", exercise.question, ""] + exercise_table(rows_by_variant)
        if key == "bias":
            with_bias = [r for rows in rows_by_variant.values() for r in rows if "bias_gradients" in r]
            if with_bias:
                lines += ["", "Gradients reaching each bias (largest over seeds), on the first training batch:", ""]
                lines += bias_table(with_bias)
        if key == "learning-rate":
            lines += ["", "The largest usable rate: `python -m training.tune --compare-norms` (docs/guides/tuning.md)."]
        if key == "other-norms" and step_file:
            times = step_file["ms_per_step"]
            reference = times.get("BatchNorm, recomputed statistics (recipe)")
            lines += [
                "",
                f"Training step, batch {step_file['batch_size']}, timed interleaved "
                f"({step_file['rounds']} rounds of {step_file['steps']} steps, median):",
                "",
                "| model | ms/step | vs kerasbn.BatchNorm |",
                "|---|---|---|",
            ]
            for name, ms in times.items():
                lines.append(f"| {name} | {ms:.2f} | {ms / reference:.2f}x |" if reference else f"| {name} | {ms:.2f} | - |")
        plot_exercise(os.path.join(out, f"{key}.png"), key, rows_by_variant)
    if grouped:
        plot_summary(os.path.join(out, "summary.png"), grouped)
    artifacts.atomic_write_text(os.path.join(out, "results.md"), "\n".join(lines) + "\n")
