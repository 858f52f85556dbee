"""The exercises' figures: accuracy per epoch for each exercise, and every variant's final test accuracy."""

from __future__ import annotations

import statistics
from typing import Dict, List

from training import artifacts
from training.exercises.catalog import EXERCISES


def plot_exercise(path: str, key: str, rows_by_variant: Dict[str, List[Dict]]) -> None:
    """Train and test accuracy per epoch: the mean over seeds, the min-max as a band."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = artifacts.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name, rows in rows_by_variant.items():
        for ax, column in zip(axes, ("train_acc", "test_acc")):
            epochs = [row["epoch"] for row in rows[0]["history"]]
            values = np.array([[row[column] for row in r["history"]] for r in rows])
            line, = ax.plot(epochs, values.mean(axis=0), "o-", markersize=3, label=name)
            if len(rows) > 1:
                ax.fill_between(epochs, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    axes[0].set_title("train accuracy (training mode, running average)", fontsize=9)
    axes[1].set_title("test accuracy (moving averages)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{key}: {EXERCISES[key].question}", fontsize=9)
    fig.tight_layout()
    artifacts.save_figure(fig, path, dpi=90)


def plot_summary(path: str, grouped: Dict[str, Dict[str, List[Dict]]]) -> None:
    """Final test accuracy of every variant, one panel per exercise (mean, min-max as error bars)."""
    plt = artifacts.pyplot()
    fig, axes = plt.subplots(len(grouped), 1, figsize=(8, 1.2 + 0.32 * sum(len(v) for v in grouped.values()) + 0.5 * len(grouped)),
                             squeeze=False, gridspec_kw={"height_ratios": [len(v) for v in grouped.values()]})
    for ax, (key, rows_by_variant) in zip(axes[:, 0], grouped.items()):
        names = list(rows_by_variant)
        means, low, high = [], [], []
        for name in names:
            values = [r["test_acc"] for r in rows_by_variant[name]]
            mean = statistics.fmean(values)
            means.append(mean)
            # max(0, .): the mean of equal values can differ from them in the last bit.
            low.append(max(0.0, mean - min(values)))
            high.append(max(0.0, max(values) - mean))
        positions = list(range(len(names)))[::-1]
        ax.errorbar(means, positions, xerr=[low, high], fmt="o", capsize=3)
        ax.set_yticks(positions)
        ax.set_yticklabels(names, fontsize=8)
        ax.set_title(key, fontsize=9, loc="left")
        ax.grid(True, axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("test accuracy (mean, min-max over seeds)")
    fig.tight_layout()
    artifacts.save_figure(fig, path, dpi=90)
