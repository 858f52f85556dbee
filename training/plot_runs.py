"""Plot several runs' test accuracy per epoch in one figure, and print their summary table.

    python -m training.plot_runs runs/a runs/b runs/c --out comparison.png

Each run folder needs history.json and summary.json (what training.train writes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence


def _load(run_dir: str):
    with open(os.path.join(run_dir, "history.json")) as handle:
        history = json.load(handle)
    with open(os.path.join(run_dir, "summary.json")) as handle:
        summary = json.load(handle)
    with open(os.path.join(run_dir, "config.json")) as handle:
        config = json.load(handle)["settings"]
    return history, summary, config


def label(config) -> str:
    return f"{config['norm']} lr={config['lr']:g} seed={config['seed']}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.plot_runs", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not os.path.exists(os.path.join(r, "summary.json"))]
    if missing:
        print(f"error: no finished run (summary.json) in: {', '.join(missing)}", file=sys.stderr)
        return 1

    from matplotlib.ticker import MaxNLocator

    from training import artifacts

    fig, ax = artifacts.pyplot().subplots(figsize=(7, 4.5))
    rows: List[str] = ["| run | test acc, moving averages | test acc, recomputed | train acc |", "|---|---|---|---|"]
    for run_dir in args.runs:
        history, summary, config = _load(run_dir)
        epochs = [row["epoch"] for row in history]
        line, = ax.plot(epochs, [row["test_acc"] for row in history], "o-", label=label(config), markersize=3)
        if "recomputed_batches" in summary:
            ax.plot([epochs[-1]], [summary["test_acc"]], "*", color=line.get_color(), markersize=11)
        recomputed = f"{summary['test_acc']:.4f}" if "recomputed_batches" in summary else "-"
        rows.append(
            f"| {label(config)} | {summary['test_acc_moving_averages']:.4f} | {recomputed} | {summary['train_acc']:.4f} |"
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (moving averages; * = recomputed statistics)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    artifacts.save_figure(fig, args.out, dpi=110)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
