"""Label-efficiency comparison of initialisations: the downstream yardstick of arXiv 2212.01893.

The paper judges pretraining by what it adds to a downstream task trained from few labels (METHOD.md, section 4):
the same network is fine-tuned from the pretrained weights and from random initialisation, with the same schedule,
for several seeds and label budgets, and the held-out scores are compared as mean +- std over seeds.

Results are given as ``{init: {labelled_volumes: {seed: value}}}``; :func:`label_efficiency_rows` turns them into one
row per (init, budget), :func:`pretraining_gain` tells whether the gain of one init over another at a budget exceeds
the seed spread, and :func:`plot_label_efficiency` draws one line with error bars per init.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from custom_nets.metrics.figures import pyplot, save_figure
from custom_nets.metrics.segmentation import mean_std

__all__ = ["label_efficiency_rows", "plot_label_efficiency", "pretraining_gain", "seed_summary"]

Results = Mapping[str, Mapping[int, Mapping[int, float]]]


def seed_summary(values_by_seed: Mapping[int, float]) -> dict[str, Any]:
    """Mean, sample std and count of the finite values over seeds, and the values ordered by seed."""
    values = [values_by_seed[seed] for seed in sorted(values_by_seed)]
    mean, std, count = mean_std(values)
    return {"mean": mean, "std": std, "trials": count, "values": values}


def label_efficiency_rows(results: Results) -> list[dict[str, Any]]:
    """One row per (init, labelled volumes): :func:`seed_summary` of its trials."""
    return [
        {"init": init, "labelled_volumes": int(budget), **seed_summary(by_budget[budget])}
        for init, by_budget in results.items()
        for budget in sorted(by_budget)
    ]


def pretraining_gain(
    rows: Sequence[Mapping[str, Any]], budget: int, init: str = "pretrained", baseline: str = "random"
) -> dict[str, Any]:
    """Gain of ``init`` over ``baseline`` at ``budget`` labelled volumes, judged against the seed spread.

    Returns ``{"labelled_volumes", "gain", "larger_std", "clear", "paired_std", "wins", "trials"}``: ``clear`` is True
    when the difference of the means exceeds the larger of the two sample standard deviations (the demo's target).
    The trials of one seed share their labelled volumes, so the per-seed differences are also given: their sample
    std (``paired_std``) and the number of seeds where ``init`` scored higher (``wins`` of ``trials``).

    Raises:
        KeyError: when either init has no row at ``budget``.
    """
    found = {row["init"]: row for row in rows if row["labelled_volumes"] == budget}
    missing = [name for name in (init, baseline) if name not in found]
    if missing:
        raise KeyError(f"no results for {missing} at {budget} labelled volumes.")
    gain = found[init]["mean"] - found[baseline]["mean"]
    larger_std = max(found[init]["std"], found[baseline]["std"])
    differences = [a - b for a, b in zip(found[init]["values"], found[baseline]["values"], strict=True)]
    return {
        "labelled_volumes": budget,
        "gain": gain,
        "larger_std": larger_std,
        "clear": bool(gain > larger_std),
        "paired_std": mean_std(differences)[1],
        "wins": sum(difference > 0 for difference in differences),
        "trials": len(differences),
    }


def plot_label_efficiency(
    rows: Sequence[Mapping[str, Any]], path: str | Path, metric: str = "Dice", title: str = ""
) -> Path:
    """PNG of ``metric`` (mean +- std over seeds) against labelled volumes, one line per initialisation."""
    plt = pyplot()

    inits = list(dict.fromkeys(row["init"] for row in rows))
    figure, axis = plt.subplots(figsize=(5.5, 4.0 + 0.25 * len(inits)))
    for index, init in enumerate(inits):
        chosen = sorted((row for row in rows if row["init"] == init), key=lambda row: row["labelled_volumes"])
        dodge = 2 ** (0.04 * (index - (len(inits) - 1) / 2))  # side by side on the log axis, so error bars stay apart
        axis.errorbar(
            [row["labelled_volumes"] * dodge for row in chosen],
            [row["mean"] for row in chosen],
            yerr=[row["std"] for row in chosen],
            marker="o",
            capsize=4,
            label=f"{init} (n = {chosen[0]['trials']} seeds)",
        )
    budgets = sorted({row["labelled_volumes"] for row in rows})
    axis.set_xscale("log", base=2)
    axis.set_xticks(budgets, [str(b) for b in budgets])
    axis.set_xlabel("labelled training volumes")
    axis.set_ylabel(f"held-out {metric} (mean +- std over seeds)")
    axis.grid(alpha=0.3)
    # below the axes: inside, it hid the error bars of the smallest budget
    axis.legend(title="initialisation", loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize="small")
    if title:
        axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)
