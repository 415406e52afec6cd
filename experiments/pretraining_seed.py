"""What the pretraining seed alone moves in the demo's yardstick (held-out corpus, frozen protocol).

Runs ``make demo``'s pipeline (``custom_nets.pretraining_demo.run_demo``: the same corpora, fine-tuning seeds 0-2, 3 and
9 labelled volumes) once per pretraining seed, changing only the ``seed`` of the pretraining bundle
(``pretrain_overrides``), then prints each run's pretrained Dice and gain over random initialisation and their mean
and std over pretraining seeds. Nothing is tuned on these runs; they measure a source of spread. About 4 minutes per
seed on 2 cores. Run on 2026-11-29 for the code of 54a1e87 and of 7ccf63a (README, "Host and pretraining seed")::

    python experiments/pretraining_seed.py run 0 1 2      # workdirs pretraining_seed_<s>/ under OUT (default .)
    python experiments/pretraining_seed.py table 0 1 2

``GROUP_VIEWS=1`` in the environment adds ``group_views: true`` to the pretraining overrides (workdirs
``pretraining_seed_<s>_group_views/``): run on 2026-11-29 at ce0a884 against the per-view default, to see whether
encoding the views of one size in one batch (other batch-norm statistics) moves the yardstick.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

from custom_nets.pretraining_demo import run_demo

OUT = Path(os.environ.get("OUT", "."))
GROUP_VIEWS = os.environ.get("GROUP_VIEWS") == "1"


def workdir(seed: int) -> Path:
    return OUT / f"pretraining_seed_{seed}{'_group_views' if GROUP_VIEWS else ''}"


def frozen_dice(seed: int) -> dict[tuple[str, int], list[float]]:
    """``{(init, labelled volumes): per fine-tuning seed Dice}`` of one finished run."""
    report = json.loads((workdir(seed) / "report.json").read_text())
    rows = report["downstream"]["protocols"]["frozen"]["rows"]["dice_mean"]
    return {(row["init"], row["labelled_volumes"]): row["values"] for row in rows}


def table(seeds: list[int]) -> str:
    header = "| labelled | " + " | ".join(f"pretraining seed {s}" for s in seeds) + " | mean +- std |"
    lines = [header, "|---|" + "--:|" * (len(seeds) + 1)]
    for budget in (3, 9):
        cells, means = [], []
        for seed in seeds:
            dice = frozen_dice(seed)
            pretrained, random_init = dice[("pretrained", budget)], dice[("random", budget)]
            gain = statistics.mean(pretrained) - statistics.mean(random_init)
            means.append(statistics.mean(pretrained))
            cells.append(f"{means[-1]:.3f} ({gain:+.3f})")
        spread = statistics.stdev(means) if len(means) > 1 else float("nan")
        lines.append(f"| {budget} | " + " | ".join(cells) + f" | {statistics.mean(means):.3f} +- {spread:.3f} |")
    return "\n".join(
        lines + ["", "Pretrained Dice, frozen protocol, mean over fine-tuning seeds; gain over random init."]
    )


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("run", "table"):
        raise SystemExit(__doc__)
    seeds = [int(value) for value in argv[1:]]
    if argv[0] == "run":
        for seed in seeds:
            overrides = {"seed": seed, **({"group_views": True} if GROUP_VIEWS else {})}
            run_demo(workdir=workdir(seed), pretrain_overrides=overrides)
    print(table(seeds))


if __name__ == "__main__":
    main(sys.argv[1:])
